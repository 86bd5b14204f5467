"""Memory of `pipeline.eval` on rank 0: the model read onto the device, a perplexity batch and the
passkey prefill at its longest length."""

from __future__ import annotations

from pipeline.plan.activations import forward_only_peak
from pipeline.plan.lines import Line, Moment
from pipeline.plan.load_and_save import checkpoint_read_line
from pipeline.plan.setup import Counts, Setup
from pipeline.preflight import Pairing


def eval_moments(p: Pairing, setup: Setup, counts: Counts) -> list[Moment]:
    """`pipeline.eval`: each model on rank 0's device, its experts only under expert parallelism
    (`evaluation.models.load_model_dir`: a LoRA run's adapters are merged one parameter at a time
    in fp32 on the device, `adapter_merge.load_merged`; not in this table: the merge's transient,
    at most two fp32 copies of one fused expert stack of the rank, 2 x 0.47 GB at EP 8 by shape)."""
    config, recipe = p.config, p.recipe
    where = "whole model" if setup.ep == 1 else f"rank 0's 1/{setup.ep} of the experts"
    weights = Line(f"weights ({where})", counts.local * setup.param_bytes,
                   f"{counts.local:,} x {setup.param_bytes} B", kind="weights")
    moments = [Moment("load", "model read onto the device", [weights, checkpoint_read_line(config)])]
    tokens = setup.rows * setup.seq
    V = config.vocab_size
    moments.append(Moment("eval", f"perplexity batch ({setup.rows} x {setup.seq} tokens)", [
        weights, Line("forward (no grad)", forward_only_peak(setup, config, tokens), "one layer's tensors",
                      kind="activations"),
        Line("logits [B, S, V], fp32 copy, log-softmax", tokens * V * (setup.act + 8),
             f"{tokens:,} x {V:,} x ({setup.act} + 8) B", kind="logits")]))
    if recipe.passkey.enabled:
        L = max(recipe.passkey.lengths)
        kv = L * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * setup.act
        moments.append(Moment("eval", f"passkey prefill at {L:,} tokens", [
            weights, Line("KV cache", kv, f"{L:,} tokens x {config.num_hidden_layers} layers x k, v", kind="activations"),
            Line("prefill forward (no grad)", forward_only_peak(setup, config, L), "one layer's tensors",
                 kind="activations"),
            Line("prefill logits [1, L, V]", L * V * setup.act, f"{L:,} x {V:,} x {setup.act} B", kind="logits")]))
    return moments
