"""Memory of rank 0 around training: loading the model (checkpoint read, random init, ZeRO-3's
partitioned build, DPO's policy and reference pass), DeepSpeed's set-up (`prepare`), and the final
consolidation and save on the main process."""

from __future__ import annotations

from pipeline.plan.activations import forward_only_peak, logits_lines
from pipeline.plan.lines import BYTES, GB, Line, Moment, partition_of
from pipeline.plan.setup import Counts, Setup
from pipeline.preflight import Pairing

SHARD_BYTES = 5e9  # save_pretrained's max_shard_size: one shard's tensors are copied at a time


def checkpoint_read_line(config) -> Line:
    """The bytes of one HF tensor being read (the embedding / LM head or one expert's w1)."""
    n = max(config.vocab_size, config.intermediate_size) * config.hidden_size
    return Line("checkpoint read buffer (one tensor)", n * BYTES.get(config.torch_dtype, 2),
                "the largest tensor of a shard", host=True, tensor=False)


def load_and_final_moments(p: Pairing, setup: Setup, counts: Counts, persistent: list[Line],
                           partition: int, gather: list[Line]) -> list[Moment]:
    """Loading and DeepSpeed's set-up (before the first step) and the end of the run, on rank 0.

    ``gather``: ZeRO-3's gathered parameters, still whole after the last forward (the coordinator
    keeps those its step trace reuses soon; measured on CPU: the lm_head and the last layer's
    gate_up_proj when `Trainer.train` returns)."""
    config, recipe = p.config, p.recipe
    on_cpu = setup.device == "cpu"  # host and device are one memory: nothing is moved
    base_b = BYTES[recipe.model.dtype]
    train_bytes = setup.adapter_bytes if setup.lora else setup.param_bytes
    built = counts.local_frozen * base_b + counts.local_trainable * (4 if setup.lora else base_b)
    read = checkpoint_read_line(config)
    moments: list[Moment] = []

    # ---- load: the model as built, before anything moves to the GPU -----------------------------
    if setup.zero == 3:
        moments += zero3_load_moments(p, setup, counts, persistent[0])
    elif recipe.model.preset if p.stage == "sft" else False:
        # random init: every rank draws the whole fp32 model, the main process writes it as base/
        whole = Line("whole model, random init in fp32", counts.total * 4, f"{counts.total:,} x 4 B",
                     kind="weights", host=not on_cpu)
        shard = Line("base/ shard being written (main process)", min(counts.total * base_b, SHARD_BYTES),
                     "one save_pretrained shard", kind="weights", host=not on_cpu, main_only=True)
        moments.append(Moment("load", "model loaded", [whole, shard]))
    else:
        moments.append(Moment("load", "model loaded", [
            Line(f"model as built on the host ({recipe.model.dtype} base, fp32 adapters)", built,
                 f"{counts.local:,} params", kind="weights", host=not on_cpu), read]))
    if p.stage == "dpo":
        on_device = built if setup.zero != 3 else (partition_of(counts.total, setup.processes) * setup.param_bytes
                                                   + adapters_whole(setup, counts).bytes)
        moments += dpo_load_moments(p, setup, counts, on_device)

    # ---- prepare: DeepSpeed's engine and optimizer ---------------------------------------------
    weights = persistent[0]
    if setup.zero == 3:
        # stage3.py allocates its reduce bucket and gradient partitions with the optimizer
        moments.append(Moment("prepare", "ZeRO-3 optimizer initialised",
                              [ln for ln in persistent if ln.kind != "comm" or "bucket" in ln.what]))
    elif setup.zero in (1, 2):
        # stage_1_and_2.py: the flat copy exists next to the parameters until they are re-pointed
        # into it; then the fp32 master partition and, for a moment, an fp32 gradient partition.
        moments.append(Moment("prepare", "flattening the trainable parameters", [
            weights, Line("flat copy of the trainable parameters", counts.local_trainable * train_bytes,
                          f"{counts.local_trainable:,} x {train_bytes} B", kind="weights")]))
        moments.append(Moment("prepare", "optimizer state initialised", [
            weights, persistent[1], Line("fp32 gradient partition (initialisation)", partition * 4,
                                         f"{partition:,} x 4 B", kind="optimizer", host=setup.offload_optimizer)]))
    elif setup.zero == 0:
        moments.append(Moment("prepare", "model on the device", [ln for ln in persistent if ln.kind != "optimizer"]))

    # ---- final: consolidation and saving on the main process -------------------------------------
    final = [*persistent, *gather]
    trainable_total = counts.trainable
    if setup.zero == 3 and setup.lora:
        final.append(Line("adapter gathered on the main process", trainable_total * 4,
                          f"{trainable_total:,} x 4 B (the frozen base is not gathered)",
                          kind="weights", host=not on_cpu, main_only=True))
    elif setup.zero == 3:
        final.append(Line("16-bit state dict gathered on the main process", counts.total * setup.param_bytes,
                          f"every parameter, {counts.total:,} x {setup.param_bytes} B "
                          "(DeepSpeed's 16-bit gather; the adapter is picked from it)",
                          kind="weights", host=not on_cpu, main_only=True))
    elif setup.zero in (1, 2):
        # Every DeepSpeed run consolidates (parallel.consolidated_state_dict): the experts gathered
        # under EP, trained tensors from the fp32 master copy in the dtype they were built with.
        n = trainable_total if setup.lora else counts.total
        b = train_bytes if setup.lora else setup.param_bytes
        final.append(Line("state dict with every expert on the main process", n * b,
                          f"{n:,} x {b} B ({'adapters' if setup.lora else 'the whole model'})",
                          kind="weights", host=not on_cpu, main_only=True))
    if not setup.lora:
        final.append(Line("save_pretrained shard copy", min(counts.total * setup.param_bytes, SHARD_BYTES),
                          "one shard's tensors", kind="weights", host=not on_cpu, main_only=True))
    moments.append(Moment("final", "consolidating and saving", final))
    return moments


def adapters_whole(setup: Setup, counts: Counts) -> Line:
    """LoRA adapters, made whole in every process after the base is built; DeepSpeed's prepare
    partitions them."""
    n = counts.trainable if setup.lora else 0
    # (on the base layer's device: the GPU under zero.Init, model/lora.py)
    return Line("adapters, whole until prepare", n * 4, f"{n:,} x 4 B (fp32)", kind="weights")


def zero3_load_moments(p: Pairing, setup: Setup, counts: Counts, weights: Line) -> list[Moment]:
    """ZeRO-3 builds under deepspeed.zero.Init (pipeline/distributed/sharded_load.py): each module's parameters
    are partitioned as the module is made, so a rank holds its partitions (where the engine will
    keep them: the GPU, or the host with parameter offload) and, for a moment, one module whole."""
    on_cpu = setup.device == "cpu"
    dp = setup.processes
    # The base only (ZeRO-3 has no expert parallelism: the whole model), every tensor partitioned;
    # the small ones become whole again and the adapters are partitioned in prepare.
    base = partition_of(counts.total, dp) * setup.param_bytes
    partitions = Line("partitions as built under zero.Init", base,
                      f"{counts.total:,} / {dp} x {setup.param_bytes} B", kind="weights", host=weights.host)
    lora = [adapters_whole(setup, counts)] if setup.lora else []
    if p.stage == "sft" and p.recipe.model.preset:
        # random_init: each parameter drawn whole in fp32 on the CPU, this rank's slice kept; the
        # draw before stays referenced (by the generator's consumer) while the next is allocated.
        # The main process also copies every draw into the base/ shard it writes (save_pretrained:
        # one shard's tensors at a time), so at a shard's end: the shard and the last draw.
        base_b = BYTES[p.recipe.model.dtype]
        pair = counts.largest_pair
        drawing = Line("two consecutive parameters drawn whole (fp32)", pair * 4,
                       f"largest consecutive pair {pair:,} x 4 B", kind="weights", host=not on_cpu)
        shard = Line("base/ shard being written (main process)", min(counts.total * base_b, SHARD_BYTES),
                     f"min(model {counts.total:,} x {base_b} B, one save_pretrained shard {SHARD_BYTES / GB:.0f} GB)",
                     kind="weights", host=not on_cpu, main_only=True)
        last = Line("the draw being copied into the shard (fp32)", counts.largest_tensor * 4,
                    f"largest parameter {counts.largest_tensor:,} x 4 B", kind="weights", host=not on_cpu)
        return [Moment("load", "random init drawn (each rank)", [partitions, drawing]),
                Moment("load", "random init written to base/ (main process)", [partitions, shard, last]),
                Moment("load", "adapters made", [partitions, *lora])]
    # load_partitions: every rank reads only its partitions' bytes of each tensor, through one
    # staging buffer (a dtype conversion's chunk) and, with the partitions on a GPU, a host
    # landing buffer of one tensor's partition.
    from pipeline.safetensors_io import READ_CHUNK_BYTES

    read = [Line("checkpoint read staging buffer", READ_CHUNK_BYTES,
                 f"safetensors_io.READ_CHUNK_BYTES ({READ_CHUNK_BYTES:,} B)", kind="other", host=True)]
    if weights.host is False and not on_cpu:
        # a checkpoint tensor's overlap with this rank's partition: the embedding / LM head (one
        # tensor each) or one expert's w1, w3 or w2 (a slice of the fused expert parameter)
        c = p.config
        H, V, F, E = c.hidden_size, c.vocab_size, c.intermediate_size, c.num_local_experts
        bounce = max(partition_of(V * H, dp), min(F * H, partition_of(2 * E * F * H, dp)))
        read.append(Line("host landing buffer (a tensor's part in this partition)", bounce * setup.param_bytes,
                         f"max(V*H / {dp}, min(F*H, E*2F*H / {dp})) = {bounce:,} x {setup.param_bytes} B",
                         kind="other", host=True))
    return [Moment("load", "partitions read from the checkpoint", [partitions, *read]),
            Moment("load", "adapters made", [partitions, *lora])]


def dpo_load_moments(p: Pairing, setup: Setup, counts: Counts, built: float) -> list[Moment]:
    """DPO before its engine: the policy (and a frozen copy) on the device, the reference pass."""
    recipe, config = p.recipe, p.config
    on_device = Line("policy moved to the device (as built)", built, "before DeepSpeed casts it",
                     kind="weights")
    lines = [on_device]
    if not recipe.lora.enabled and not recipe.dpo.precompute_ref_log_probs:
        lines.append(Line("frozen reference copy", counts.local * setup.param_bytes, "copy.deepcopy of the policy",
                          kind="weights"))
    moments = [Moment("load", "policy on the device", lines)]
    if recipe.dpo.precompute_ref_log_probs:
        tokens = 2 * recipe.dpo.ref_batch_size * setup.seq
        ref_setup = Setup(**{**setup.__dict__, "rows": 2 * recipe.dpo.ref_batch_size})
        moments.append(Moment("load", "reference log-probs pass", [
            on_device,
            Line("reference forward (no grad)", forward_only_peak(setup, config, tokens),
                 f"dpo.ref_batch_size {recipe.dpo.ref_batch_size} pairs = {tokens:,} tokens", kind="activations"),
            logits_lines(ref_setup, config, trained_head=False, tokens=tokens, grad=False)]))
    return moments
