"""Output layouts beside the HF one (whose plan, index and configs are model/checkpoint.py's): the
mistral-inference consolidated names, RoPE row order and params.json."""

from __future__ import annotations

import re

import torch

from model.config import MixtralConfig

# generation_config.json names the transformers version of the released Mixtral-8x7B-Instruct-v0.1 file.
RELEASED_TRANSFORMERS_VERSION = "4.36.0.dev0"


# HF per-expert names -> mistral-inference consolidated names (FORMATS.md section 4). A different
# format, not a second HF<->native table: it maps names that model/checkpoint.py produced.
CONSOLIDATED_NAMES: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.feed_forward.gate.weight"),
    (
        r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight",
        r"layers.\1.feed_forward.experts.\2.\3.weight",
    ),
)


def consolidated_name(hf_name: str) -> str:
    for pattern, replacement in CONSOLIDATED_NAMES:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, replacement, hf_name)
    raise ValueError(f"consolidated export: no mistral-inference name for {hf_name!r}")


def hf_to_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from HF's rotate_half order (j, j + hd/2) back to interleaved pairs (2j, 2j + 1).

    Inverse of transformers' convert_mixtral_weights_to_hf permute (FORMATS.md section 5).
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # [n_heads, 2, hd/2, cols] -> [n_heads, hd/2, 2, cols]: row (half h, index j) goes to 2j + h
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def params_json(config: MixtralConfig) -> dict:
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "moe": {"num_experts_per_tok": config.num_experts_per_tok, "num_experts": config.num_local_experts},
    }
    if config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    return params


def consolidated_tensor(
    hf_name: str, tensor: torch.Tensor, config: MixtralConfig
) -> tuple[str, torch.Tensor]:
    if hf_name.endswith("self_attn.q_proj.weight"):
        tensor = hf_to_interleaved_rope(tensor, config.num_attention_heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        tensor = hf_to_interleaved_rope(tensor, config.num_key_value_heads)
    return consolidated_name(hf_name), tensor
