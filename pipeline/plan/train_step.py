"""Memory of a training stage's rank 0 (SFT, DPO) at the moments a step peaks: weights, ZeRO's
partitions and buffers (as DeepSpeed's stage_1_and_2.py / stage3.py allocate them), gradients,
optimizer state, activations, the loss's logits, eval during training; and a 4-bit (QLoRA) base.
The phases around the step come from `load_and_save`."""

from __future__ import annotations

from pipeline.plan.activations import activations, forward_only_peak, logits_lines
from pipeline.plan.lines import BYTES, Line, Moment, partition_of
from pipeline.plan.load_and_save import load_and_final_moments
from pipeline.plan.setup import Counts, Setup
from pipeline.preflight import Pairing


def training_moments(p: Pairing, setup: Setup, counts: Counts, *, routing: str, checkpointing: bool) -> list[Moment]:
    """Every moment of loading, set-up, a training step, eval and the end at which rank 0's memory
    peaks, with the lines alive then."""
    config = p.config
    z = setup.zero_config
    dp = setup.processes
    train_bytes = setup.adapter_bytes if setup.lora else setup.param_bytes
    frozen_b = counts.local_frozen * setup.param_bytes
    trainable_b = counts.local_trainable * train_bytes
    host_opt = setup.offload_optimizer
    host_params = setup.offload_params

    def group_partitions():
        for name, (n, expert) in counts.groups.items():
            yield name, partition_of(n, dp // setup.ep if expert else dp)

    partition = sum(n for _, n in group_partitions())  # this rank's share of the trainable elements
    largest_group = max((n for _, n in group_partitions()), default=0)

    # ---- weights ------------------------------------------------------------------------------
    if setup.zero == 3:
        partitioned = counts.local - counts.persistent
        weight_b = (partition_of(partitioned, dp) + counts.persistent) * setup.param_bytes
        weights = Line("weights (ZeRO-3 partition)", weight_b,
                       f"{partitioned:,} / {dp} + {counts.persistent:,} small ones whole, x {setup.param_bytes} B",
                       kind="weights", host=host_params)
    else:
        where = f"{counts.local:,} params on rank 0" + (f" (1/{setup.ep} of the experts)" if setup.ep > 1 else "")
        weights = Line("weights", frozen_b + trainable_b,
                       f"{where}: frozen x {setup.param_bytes} B + trainable x {train_bytes} B", kind="weights")

    # ---- optimizer state and gradients that persist through a step ------------------------------
    persistent = [weights]
    step_temps: list[Line] = []
    grads_end: list[Line] = []  # gradients at the end of backward
    backward_comm: list[Line] = []  # alive during backward only
    grad_transient = 0.0  # a parameter's gradient before DeepSpeed copies it into its bucket
    # torch's AdamW: its for-loop on the CPU, foreach on CUDA; offloaded state is stepped in place by
    # DeepSpeed's CPU Adam (pipeline/training/optim.py, `Trainer._offloads_optimizer`).
    adam_cpu = setup.device == "cpu"
    if setup.zero:
        master = Line("fp32 master weights (partition)", partition * 4,
                      f"{partition:,} trainable elements on this rank x 4 B", kind="optimizer", host=host_opt)
        adam = Line("Adam m and v (partition)", partition * 8, f"{partition:,} x 8 B", kind="optimizer", host=host_opt)
        persistent += [master, adam]
        grad_b = setup.param_bytes
        bucket = Line("ZeRO reduce bucket", z.reduce_bucket_size * grad_b,
                      f"reduce_bucket_size {z.reduce_bucket_size:,.0f} x {grad_b} B", kind="comm")
        step_group = largest_group if setup.zero != 3 else min(largest_group, int(z.sub_group_size))
        step_temps.append(Line("fp32 gradient partition of a group", step_group * 4,
                               f"{step_group:,} x 4 B", kind="optimizer", host=host_opt))
        if not host_opt:  # (DeepSpeed's CPU Adam updates in place)
            temps = 2 if adam_cpu else 1  # torch AdamW: sqrt and its quotient (CPU loop) / foreach sqrt
            step_temps.append(Line("AdamW temporaries", temps * step_group * 4,
                                   f"{temps} x {step_group:,} x 4 B ({'for-loop' if adam_cpu else 'foreach'})",
                                   kind="optimizer"))
        if setup.zero == 3:
            persistent.append(bucket)
            persistent.append(Line("gradient partitions", partition * grad_b, f"{partition:,} x {grad_b} B",
                                   kind="grads", host=host_opt))
            # stage3.py `initialize_optimizer_states`: the fp32 gradients the optimizer reads are kept,
            # one buffer per sub-group with offload (all of the partition), else one buffer of the
            # largest sub-group shared by all.
            fp32_grads = partition if host_opt else step_group
            persistent.append(Line("fp32 gradient buffer", fp32_grads * 4, f"{fp32_grads:,} x 4 B",
                                   kind="grads", host=host_opt))
            step_temps = [t for t in step_temps if t.what != "fp32 gradient partition of a group"]
            # A leaf MoE block is fetched whole and the next modules are prefetched (prefetch_bucket_size
            # elements); once the step's trace is known, a parameter used again within
            # max_reuse_distance elements is not released (stage3's parameter coordinator): a model
            # smaller than that stays gathered whole; Mixtral-8x7B keeps about one layer + the head.
            gathered = min(counts.local, max(counts.largest_unit + z.prefetch_bucket_size, z.max_reuse_distance))
            persistent_gather = Line(
                "gathered parameters", gathered * setup.param_bytes,
                f"min(model, max(largest unit {counts.largest_unit:,} + prefetch {z.prefetch_bucket_size:,.0f}, "
                f"reuse distance {z.max_reuse_distance:,.0f})) x {setup.param_bytes} B", kind="comm")
            grad_transient = counts.largest_unit_trainable * grad_b
        else:
            if host_opt:
                # ZeRO-Offload: fp32 grads, a bf16 copy for the update, bf16 accumulation, pinned on the host
                persistent += [
                    Line("fp32 gradient partition (offload)", partition * 4, f"{partition:,} x 4 B",
                         kind="grads", host=True),
                    Line("16-bit copy for the update (offload)", partition * setup.param_bytes,
                         f"{partition:,} x {setup.param_bytes} B", kind="optimizer", host=True),
                    Line("device staging buffer (offload)", counts.largest_trainable * grad_b,
                         f"largest tensor {counts.largest_trainable:,} x {grad_b} B", kind="comm"),
                ]
                if setup.grad_accum > 1:
                    persistent.append(Line("accumulated gradients (offload)", partition * grad_b,
                                           f"{partition:,} x {grad_b} B", kind="grads", host=True))
                step_temps = [t for t in step_temps if t.what != "fp32 gradient partition of a group"]
            elif setup.zero == 1:
                # ZeRO-1 partitions the optimizer state only: every gradient stays whole
                grads_end.append(Line("gradients (ZeRO-1: whole)", counts.local_trainable * grad_b,
                                      f"{counts.local_trainable:,} x {grad_b} B", kind="grads"))
            else:
                grads_end.append(Line("gradients of this rank's partition", partition * grad_b,
                                      f"{partition:,} x {grad_b} B", kind="grads"))
            backward_comm.append(bucket)
            grad_transient = counts.largest_trainable * grad_b
    else:
        adam_bytes = 2 * counts.local_trainable * train_bytes
        persistent.append(Line("AdamW m and v", adam_bytes, f"{counts.local_trainable:,} x 2 x {train_bytes} B",
                               kind="optimizer"))
        grads_end.append(Line("gradients", trainable_b, f"{counts.local_trainable:,} x {train_bytes} B", kind="grads"))
        if setup.processes > 1:
            # torch DDP's reducer keeps its buckets (a copy of every gradient) as long as the model
            persistent.append(Line("DDP gradient buckets", trainable_b, "a second copy of the gradients",
                                   kind="comm"))
        largest = counts.largest_trainable if adam_cpu else max(n for n, _ in counts.groups.values())
        temps = 2 if adam_cpu else 1
        step_temps.append(Line("AdamW temporaries", temps * largest * train_bytes,
                               f"{temps} x {largest:,} x {train_bytes} B", kind="optimizer"))
        grad_transient = counts.largest_unit_trainable * train_bytes if not setup.lora else 0

    # ---- activations and logits of a micro-batch ------------------------------------------------
    act = activations(setup, config, routing=routing, checkpointing=checkpointing)
    tokens = setup.rows * setup.seq
    trained_head = not setup.lora
    logits = logits_lines(setup, config, trained_head=trained_head, tokens=tokens)
    saved = Line("activations kept for backward", act.saved, act.how, kind="activations")
    accumulated = grads_end if setup.grad_accum > 1 else []
    gather = [persistent_gather] if setup.zero == 3 else []
    moments = [
        Moment("train", "loss backward (logits chunk)", persistent + accumulated + gather + [saved, logits]),
        Moment("train", "backward of the last layer", persistent + accumulated + gather + backward_comm + [
            saved, Line("layer backward transients", act.backward_peak, "d gate_up [M, 2F] + d rows [M, H]",
                        kind="activations"),
            Line("gradients being produced (a layer's)", grad_transient, "before they reach the bucket",
                 kind="grads")]),
        Moment("train", "optimizer step", persistent + grads_end + step_temps),
    ]
    # eval during training: nothing kept for backward; a layer's tensors, then the loss's
    moments.append(Moment("train", "eval forward (a layer)", persistent + gather + [
        Line("eval forward (no grad)", forward_only_peak(setup, config, tokens), "one layer's tensors",
             kind="activations")]))
    moments.append(Moment("train", "eval loss (logits chunk)", persistent + gather + [
        logits_lines(setup, config, trained_head=False, tokens=tokens, grad=False)]))
    moments += load_and_final_moments(p, setup, counts, persistent, partition, gather)
    if p.recipe.model.quantization is not None:
        quantized_base(p, setup, counts, weights, moments)
    return moments


# 4-bit NF4 with double quantization (model/quant.py): 4 bits a value, an 8-bit absmax per 64 values,
# an fp32 absmax (and offset) per 256 of those.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


def quantized_base(p: Pairing, setup: Setup, counts: Counts, weights: Line, moments: list[Moment]) -> None:
    """QLoRA (model.quantization): the attention projections and expert stacks held 4-bit, plus one
    expert's [2F, H] block dequantized at a time; loading holds the rest in the recipe's dtype and
    quantizes each weight as it is read (on the GPU), about one layer's expert stacks at a time."""
    from model.quant import is_quantized_name

    config, dtype = p.config, p.recipe.model.dtype
    frozen = [(n.replace(".base_layer", ""), t.numel()) for n, t in p.meta_model().named_parameters()
              if not t.requires_grad]
    quantized = sum(n for name, n in frozen if is_quantized_name(name))
    block = 2 * config.intermediate_size * config.hidden_size * setup.act
    rest = counts.local_frozen - quantized
    trained = counts.local_trainable * setup.adapter_bytes
    weights.bytes = quantized * NF4_BYTES + rest * setup.param_bytes + block + trained
    weights.how = (f"{quantized:,} 4-bit (NF4, double quant) x {NF4_BYTES:.4f} B + {rest:,} frozen x "
                   f"{setup.param_bytes} B + one dequantized expert block [2F, H] + trainable x {setup.adapter_bytes} B")
    local_experts = config.num_local_experts // setup.ep
    layer_stacks = 3 * local_experts * config.intermediate_size * config.hidden_size * BYTES[dtype]
    for moment in moments:
        for line in moment.lines:
            if line.what.startswith("model as built on the host"):
                on_host = rest * BYTES[dtype] + layer_stacks + (quantized * NF4_BYTES if setup.device == "cpu" else 0)
                line.bytes = on_host
                line.how = (f"{rest:,} unquantized params in {dtype} + one layer's expert stacks before they are "
                            "quantized" + (" + the 4-bit weights" if setup.device == "cpu" else
                                           " (the 4-bit weights go to the GPU as they are made)"))
