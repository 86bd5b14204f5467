"""Before a GPU-hour is spent: does a (stage recipe, launch) pairing start, and does it fit?

    python -m pipeline.plan RECIPE --config_file ACCELERATE_YAML [--gpu-memory-gb 80]
        [--host-memory-gb N] [--model-preset NAME] [--device cuda|cpu] [key=value ...]
    make plan RECIPE=recipes/mixtral-8x7b/sft_lora.yaml CONFIG=recipes/accelerate/zero2_ep8.yaml

Without --config_file the launch is a plain `python -m pipeline.STAGE` (one process). The model is
read as the launch reads it (the recipe's checkpoint config.json, SFT manifest or preset);
`--model-preset mixtral-8x7b` plans for a checkpoint that is not on this machine.

1. Every startup check of the real launch runs first (`pipeline.preflight`, on the meta device): an
   invalid pairing prints the reason and exits 2.
2. The model is built on the meta device as rank 0 builds it (its experts under expert parallelism,
   LoRA, router freezing); the parameter counts come from it.
3. Memory, per GPU and per node, at the moments a step peaks (forward, the loss's logits chunks, the
   backward of the last layer, the optimizer step) and in the phases around training (loading,
   DeepSpeed's set-up, the final consolidation). Sizes follow the code that runs: DeepSpeed's own
   ZeRO configuration (its defaults and ours, from `parallel.deepspeed_config`) and its buffers as
   `runtime/zero/stage_1_and_2.py` and `stage3.py` allocate them, and the tensors each layer saves
   for backward (`model/`, listed in `layer_activations`).

The last line is `plan: fits|does not fit: peak X GB per GPU of Y GB; host Z GB per node`; exit 0
fits, 1 does not fit, 2 the recipe and launch cannot start together. GB = 10^9 bytes.

What it assumes (said again in its output): the worst case of the recipe, not of a dataset: every row
is data.max_seq_len tokens and every token but a row's first carries a label; "balanced" routing
gives each expert-parallel rank the rows it sends, "worst case" sends it every token's slots that
its experts can take. It does not model the CUDA caching allocator's fragmentation, and the CUDA
context / NCCL / cuBLAS workspace is an assumed `CUDA_RESERVE_GB`.

    from pipeline.plan import plan
    result = plan(recipe, launch, model_config=MixtralConfig.preset("mixtral-8x7b"))
    print(result.render()); result.fits
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.preflight import LaunchSpec, Pairing, PreflightError, load_stage_recipe, preflight

GB = 1e9
# CUDA context, NCCL communicators and cuBLAS workspaces of one process: not measured here (no GPU);
# an H100 process with NCCL typically holds 0.5-1.5 GB outside PyTorch's allocator.
CUDA_RESERVE_GB = 1.5
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INDEX = 8  # int64 index tensors


# ------------------------------------------------------------------------------------------------
# Lines, moments, phases
# ------------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One tensor (or family of tensors) alive at a moment: what, how many bytes, and the arithmetic."""

    what: str
    bytes: float
    how: str = ""
    kind: str = "other"  # weights | grads | optimizer | activations | logits | comm | other
    # On the host: of each process (summed over the node), or of the main process only.
    host: bool = False
    main_only: bool = False
    # A torch tensor (seen by the CPU allocator probe); False for read buffers outside torch.
    tensor: bool = True


@dataclass
class Moment:
    phase: str  # load | prepare | train | final
    name: str
    lines: list[Line]

    def gpu(self) -> float:
        return sum(line.bytes for line in self.lines if not line.host)

    def host_per_node(self, processes_per_node: int) -> float:
        return sum(line.bytes * (1 if line.main_only else processes_per_node)
                   for line in self.lines if line.host)

    def one_process(self) -> float:
        """Every torch tensor of the main process, wherever it lives (a CPU launch: one memory)."""
        return sum(line.bytes for line in self.lines if line.tensor)


# ------------------------------------------------------------------------------------------------
# What the launch runs: precision, device, counts
# ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The facts of a pairing the memory depends on."""

    stage: str
    device: str  # cuda | cpu
    processes: int
    per_node: int
    nodes: int
    zero: int  # 0 = no DeepSpeed
    ep: int
    offload_optimizer: bool
    offload_params: bool
    bf16: bool  # DeepSpeed bf16 (the module cast to bf16) or autocast
    param_bytes: int  # frozen base weights on the device
    adapter_bytes: int  # LoRA adapters on the device
    act: int  # activation bytes
    lora: bool
    lora_r: int
    lora_dropout: float
    lora_targets: tuple[str, ...]
    checkpointing: bool
    rows: int  # rows per micro-batch
    seq: int
    chunk: int | None  # logits_chunk_size
    grad_accum: int
    zero_config: object = None  # deepspeed's DeepSpeedZeroConfig


def setup_of(p: Pairing, device: str) -> Setup:
    from pipeline.distributed.parallel import deepspeed_config

    recipe, launch, section = p.recipe, p.launch, p.section
    if p.stage == "eval":
        size = BYTES[recipe.dtype]
        # one process, or a launch whose processes split each layer's experts (`parallel:`)
        return Setup(stage="eval", device=device, processes=launch.num_processes,
                     per_node=launch.processes_per_machine, nodes=launch.num_machines, zero=0,
                     ep=section.expert_parallel_size,
                     offload_optimizer=False, offload_params=False, bf16=size == 2, param_bytes=size,
                     adapter_bytes=size, act=size, lora=False, lora_r=0, lora_dropout=0.0, lora_targets=(),
                     checkpointing=False, rows=recipe.data.batch_size, seq=eval_seq_len(recipe), chunk=None,
                     grad_accum=1)
    train = recipe.train
    mixed = train.mixed_precision
    bf16 = mixed == "bf16" or (mixed == "auto" and device == "cuda")
    zero = section.zero_stage or 0
    base = BYTES[recipe.model.dtype]
    # DeepSpeed's engine casts the whole module (adapters too) to bf16 (runtime/engine.py
    # `_configure_distributed_model`); without DeepSpeed the adapters stay fp32 over the base.
    param_bytes, adapter_bytes = (2, 2) if zero and bf16 else (base, 4)
    act = 2 if bf16 or base == 2 else 4
    zero_config = None
    if zero:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        ds = deepspeed_config(section, micro_batch_size=train.micro_batch_size,
                              grad_accum_steps=train.grad_accum_steps, bf16=bf16)
        if zero == 3:
            # The stages size ZeRO-3's buffers and gathers to the model (sharded_load.build_partitioned).
            from model import Mixtral
            from pipeline.distributed.sharded_load import size_zero3_buffers
            from pipeline.preflight import model_config

            size_zero3_buffers(ds, Mixtral(model_config(p), device="meta"))
        zero_config = DeepSpeedZeroConfig(**ds["zero_optimization"])
    rows = train.micro_batch_size * (2 if p.stage == "dpo" else 1)
    return Setup(
        stage=p.stage, device=device, processes=launch.num_processes, per_node=launch.processes_per_machine,
        nodes=launch.num_machines, zero=zero, ep=section.expert_parallel_size,
        offload_optimizer=section.offload_optimizer, offload_params=section.offload_params, bf16=bf16,
        param_bytes=param_bytes, adapter_bytes=adapter_bytes, act=act, lora=recipe.lora.enabled,
        lora_r=recipe.lora.r, lora_dropout=recipe.lora.dropout, lora_targets=tuple(recipe.lora.target_modules),
        checkpointing=recipe.model.gradient_checkpointing, rows=rows, seq=recipe.data.max_seq_len,
        chunk=recipe.model.logits_chunk_size if p.stage == "sft" else (recipe.model.logits_chunk_size or 0),
        grad_accum=train.grad_accum_steps, zero_config=zero_config,
    )


def eval_seq_len(recipe) -> int:
    """Rows of the held-out split are as long as the prep recipe's data.max_seq_len (4096 if unknown)."""
    if recipe.data.prep_recipe and Path(recipe.data.prep_recipe).is_file():
        from pipeline.config import load_recipe_dict

        return int(load_recipe_dict(recipe.data.prep_recipe).get("data", {}).get("max_seq_len", 4096))
    return 4096


@dataclass
class Counts:
    """Parameter counts of the whole model and of rank 0's model (its experts under EP)."""

    total: int
    active: int  # per token: dense + top-k of E experts
    trainable: int
    local: int
    # Rank 0's trainable elements per optimizer group and whether the group is expert-parallel.
    groups: dict[str, tuple[int, bool]] = field(default_factory=dict)
    local_frozen: int = 0
    local_expert: int = 0
    largest_trainable: int = 0  # one tensor
    largest_tensor: int = 0
    # Two consecutive parameters of the whole model (`init_weights` order): alive together while a
    # ZeRO-3 random init draws the second (`sharded_load._drawn_partitions`).
    largest_pair: int = 0
    # ZeRO-3 fetches a leaf MoE block whole: its elements and its trainable ones.
    largest_unit: int = 0
    largest_unit_trainable: int = 0
    persistent: int = 0  # ZeRO-3: tensors under param_persistence_threshold stay whole

    @property
    def local_trainable(self) -> int:
        return sum(n for n, _ in self.groups.values())


def count_parameters(p: Pairing, setup: Setup) -> Counts:
    """From the meta models: the whole one (all experts) and rank 0's (as the launch builds it)."""
    from model import Mixtral
    from pipeline.training.optim import param_groups

    config = p.config
    whole = Mixtral(config, device="meta")
    total = sum(t.numel() for t in whole.parameters())
    expert_total = sum(t.numel() for n, t in whole.named_parameters() if ".moe.experts." in f".{n}.")
    sizes = [t.numel() for t in whole.parameters()]
    largest_pair = max(a + b for a, b in zip(sizes, sizes[1:] + [0], strict=True))
    active = total - expert_total + expert_total * config.num_experts_per_tok // config.num_local_experts
    if p.stage == "eval":
        largest = max(t.numel() for t in whole.parameters())
        local_expert = expert_total // setup.ep  # rank 0's experts under expert parallelism
        local = total - expert_total + local_expert
        return Counts(total=total, active=active, trainable=0, local=local, local_frozen=local,
                      local_expert=local_expert, largest_tensor=largest)
    model = p.meta_model()
    named = list(model.named_parameters())
    trainable = sum(t.numel() for _, t in named if t.requires_grad)
    if setup.ep > 1:
        # Rank 0 holds 1/ep of the experts; the adapters of the others are as many again.
        expert_trainable = sum(t.numel() for n, t in named if t.requires_grad and ".moe.experts." in f".{n}.")
        trainable += expert_trainable * (setup.ep - 1)
    groups = {}
    for group in param_groups(named, 0.0):
        expert = group["name"] == "experts" and setup.ep > 1
        groups[group["name"]] = (sum(t.numel() for t in group["params"]), expert)
    threshold = setup.zero_config.param_persistence_threshold if setup.zero == 3 else 0
    units = [sum(t.numel() for t in layer.moe.parameters()) for layer in _layers(model)]
    unit_trainable = [sum(t.numel() for t in layer.moe.parameters() if t.requires_grad) for layer in _layers(model)]
    return Counts(
        total=total, active=active, trainable=trainable, local=sum(t.numel() for _, t in named),
        groups=groups,
        local_frozen=sum(t.numel() for _, t in named if not t.requires_grad),
        local_expert=sum(t.numel() for n, t in named if ".moe.experts." in f".{n}."),
        largest_trainable=max((t.numel() for _, t in named if t.requires_grad), default=0),
        largest_tensor=max(t.numel() for _, t in named),
        largest_pair=largest_pair,
        largest_unit=max(units + [t.numel() for _, t in named]),
        largest_unit_trainable=max(unit_trainable + [t.numel() for _, t in named if t.requires_grad]),
        persistent=sum(t.numel() for _, t in named if t.numel() <= threshold),
    )


def _layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.layers


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------


@dataclass
class LayerShape:
    T: int  # tokens of the micro-batch on this rank
    H: int
    nh: int
    nkv: int
    D: int
    E: int
    K: int
    F: int
    s: int  # activation bytes
    M: int  # rows this rank's experts compute
    ep: bool
    cuda: bool  # CUDA kernels (grouped GEMM, PEFT-style LoRA); else the CPU kernels (fused expert LoRA)
    trained_base: bool  # full fine-tuning: norms, projections, router and experts take gradients
    lora_attention: tuple[str, ...] = ()
    lora_experts: bool = False
    r: int = 16
    dropout: bool = False

    @property
    def N(self) -> int:
        return self.T * self.K

    @property
    def dropout_bytes(self) -> int:
        """Per element of a dropout: its output and its mask (bool from CUDA's fused kernel; the
        CPU's dropout multiplies by a noise tensor of the input's dtype)."""
        return self.s + (1 if self.cuda else self.s)


def layer_saved(x: LayerShape) -> list[tuple[str, float]]:
    """The tensors one decoder layer keeps for backward (model/transformer.py, attention.py, moe.py,
    lora.py), beyond its input. Checked against the tensors autograd saves, on CPU (tests)."""
    T, H, s, N, M = x.T, x.H, x.s, x.N, x.M
    out: list[tuple[str, float]] = []

    def norm(tag: str) -> None:
        # bf16 keeps its fp32 upcast (the fp32 input is the input itself); the gain's gradient
        # needs the normalised input.
        out.append((f"{tag}: rsqrt [T] fp32" + (", fp32 upcast [T, H]" if s == 2 else ""),
                    T * 4 + (T * H * 4 if s == 2 else 0)))
        if x.trained_base:
            out.append((f"{tag}: normalised input [T, H]", T * H * s))

    q, kv = x.nh * x.D, x.nkv * x.D
    # A frozen projection keeps no input; its LoRA A keeps it, or its dropout's output instead.
    lora_reads_input = not x.dropout
    norm("input norm")
    if x.trained_base or (lora_reads_input and {"q_proj", "k_proj", "v_proj"} & set(x.lora_attention)):
        out.append(("attention input [T, H]", T * H * s))
    for proj, width_in in (("q", H), ("k", H), ("v", H), ("o", q)):
        if f"{proj}_proj" in x.lora_attention:
            out.append((f"{proj}_proj LoRA A output [T, r]", T * x.r * s))
            if x.dropout:
                out.append((f"{proj}_proj LoRA dropout output and mask [T, in]", T * width_in * x.dropout_bytes))
    # (The per-document index tensors are the batch's layout, made once per batch, not per layer.)
    out.append(("attention q, k, v per document [T, (nh+2nkv) D], output, logsumexp",
                T * (q + 2 * kv) * s + T * q * s + T * x.nh * 4))
    if x.trained_base or (lora_reads_input and "o_proj" in x.lora_attention):
        out.append(("o_proj input [T, nh D]", T * q * s))
    out.append(("residual after attention [T, H]", T * H * s))
    norm("post-attention norm")
    if x.trained_base:
        out.append(("router input [T, H]", T * H * s))
    out.append(("router: fp32 softmax [T, E], top-k ids, renormalised weights [T, K] and their sum",
                T * (x.E * 4 + x.K * (INDEX + 4) + 4)))
    out.append(("dispatch indices, slot weights [T K]", N * (2 * INDEX + s)))
    # The CPU's fused expert LoRA keeps its inputs whatever is frozen; CUDA's grouped GEMMs keep
    # an input only for a trained weight or a LoRA A reading it.
    keeps_inputs = x.trained_base or not x.cuda or (x.lora_experts and lora_reads_input)
    if keeps_inputs:
        out.append(("expert input rows [M, H]", M * H * s))
    out.append(("expert gate_up [M, 2F]", M * 2 * x.F * s))
    if keeps_inputs:
        out.append(("expert SwiGLU output [M, F]", M * x.F * s))
    if x.lora_experts:
        out.append(("expert LoRA low-rank rows [M, 3r]", M * 3 * x.r * s))
        if x.dropout:
            out.append(("expert LoRA dropout outputs and masks [M, H + F]", M * (H + x.F) * x.dropout_bytes))
    if x.ep:
        out.append(("expert outputs kept for the combine [M, H], row order", M * (H * s + INDEX)))
    # The combine adds the weighted rows into zeros (index_add): the MoE output itself is not kept.
    out.append(("expert outputs and weighted outputs [T K, H]", 2 * N * H * s))
    return out


def layer_backward_extra(x: LayerShape) -> float:
    """Above the saved tensors, the largest moment of a layer's backward: the SwiGLU backward's
    d(gate_up) [M, 2F] and then the expert input gradient [M, H], after the combine's [T K, H]
    tensors were released."""
    return x.M * (2 * x.F + x.H) * x.s - 2 * x.N * x.H * x.s


def layer_forward_extra(x: LayerShape) -> float:
    """Above the saved tensors, the largest moment of a layer's forward: the weighted expert
    outputs before the scatter; CUDA's unfused expert LoRA also holds base + LoRA gate_up."""
    if x.cuda and x.lora_experts:
        return 2 * x.M * 2 * x.F * x.s
    return x.M * x.H * x.s


def layer_no_grad_peak(x: LayerShape) -> float:
    """One layer's forward without autograd (eval, DPO's reference pass): x_sorted, gate_up, the
    SwiGLU output and the expert output live together (gate_up until the experts' forward returns),
    next to a few [T, H] tensors of the layer."""
    experts = x.M * (2 * x.H + 3 * x.F) * x.s
    if x.cuda and x.lora_experts:
        experts = max(experts, x.M * (x.H + 3 * 2 * x.F) * x.s)
    return experts + 4 * x.T * x.H * x.s + x.T * (x.E * (x.s + 4) + x.K * 16)


def layer_shape(setup: Setup, config, *, tokens: int, routing: str) -> LayerShape:
    ep, K, E = setup.ep, config.num_experts_per_tok, config.num_local_experts
    N = tokens * K
    if ep > 1 and routing == "worst":
        # Every EP rank's tokens send as many slots here as this rank's E/ep experts can take.
        M = ep * tokens * min(K, E // ep)
    else:
        M = N
    targets = setup.lora_targets if setup.lora else ()
    return LayerShape(
        T=tokens, H=config.hidden_size, nh=config.num_attention_heads, nkv=config.num_key_value_heads,
        D=config.head_dim, E=E, K=K, F=config.intermediate_size, s=setup.act, M=M, ep=ep > 1,
        cuda=setup.device == "cuda", trained_base=not setup.lora,
        lora_attention=tuple(t for t in targets if t.endswith("_proj")),
        lora_experts="experts" in targets, r=setup.lora_r, dropout=setup.lora_dropout > 0,
    )


@dataclass
class Activations:
    """A training micro-batch's activations on one rank."""

    saved: float  # kept for backward when the loss starts its backward
    backward_peak: float  # above `saved - one layer` during the backward of a layer
    forward_peak: float
    how: str


def activations(setup: Setup, config, *, routing: str, checkpointing: bool) -> Activations:
    tokens = setup.rows * setup.seq
    x = layer_shape(setup, config, tokens=tokens, routing=routing)
    per_layer = sum(b for _, b in layer_saved(x))
    L = config.num_hidden_layers
    stream = tokens * x.H * x.s  # one layer's input
    rope = 2 * tokens * x.D * x.s + tokens * (3 * INDEX)  # cos, sin, the batch's document layout
    head = tokens * x.H * x.s * (3 if x.s == 2 else 2) + tokens * 4  # final norm's saved tensors
    if checkpointing:
        saved = L * stream + rope + head
        bwd = per_layer + layer_backward_extra(x)
        how = f"{L} layer inputs [T={tokens:,}, H] x {x.s} B; one layer recomputed in backward"
    else:
        saved = L * (stream + per_layer) + rope + head
        bwd = layer_backward_extra(x)
        how = f"{L} layers x {per_layer / GB:.3f} GB saved (T={tokens:,}, M={x.M:,} expert rows)"
    return Activations(saved=saved, backward_peak=bwd, forward_peak=layer_forward_extra(x), how=how)


def forward_only_peak(setup: Setup, config, tokens: int) -> float:
    """No-grad forward (eval, DPO's reference pass): one layer's tensors at a time."""
    return layer_no_grad_peak(layer_shape(setup, config, tokens=tokens, routing="balanced"))


def logits_lines(setup: Setup, config, *, trained_head: bool, tokens: int, grad: bool = True) -> Line:
    """The LM head and loss of one micro-batch (model/losses.py), the largest [C, V] moment."""
    V, H = config.vocab_size, config.hidden_size
    labelled = tokens - setup.rows  # every token but each row's first predicts a label
    s = setup.act
    if setup.chunk:
        n = -(-labelled // setup.chunk)
        C = -(-labelled // n)
        hidden = labelled * H * s  # the labelled rows of hidden, gathered once
        if not grad:
            # checkpointed chunks run plainly: logits, their fp32 copy, log_softmax
            return Line("logits chunk (no grad)", C * V * (s + 4 + (4 if s == 2 else 0)) + hidden,
                        f"{n} chunk(s) of {C:,} tokens x V={V:,}", kind="logits")
        if trained_head:
            # backward recomputes a chunk: log-probs + incoming + outgoing grad in fp32
            return Line("logits chunk, recomputed in backward", 12 * C * V + 2 * hidden,
                        f"{n} chunk(s) of {C:,} tokens x V={V:,} x 12 B", kind="logits")
        # frozen head: logits, fp32 copy (bf16) and log-probs of a chunk in forward; d hidden kept
        return Line("logits chunk, frozen head (forward)", C * V * (s + 4 + (4 if s == 2 else 0)) + 2 * hidden,
                    f"{n} chunk(s) of {C:,} tokens x V={V:,}", kind="logits")
    if not grad:
        return Line("logits (no grad)", tokens * V * (s + 4 + (4 if s == 2 else 0)),
                    f"[T={tokens:,}, V={V:,}] logits + fp32 copy + log-probs", kind="logits")
    return Line("logits [T, V] and their log-softmax backward", tokens * V * (12 + (s if s == 2 else 0)),
                f"[T={tokens:,}, V={V:,}] x (12 B fp32 + the logits)", kind="logits")


# ------------------------------------------------------------------------------------------------
# Memory of one rank, by phase and moment
# ------------------------------------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def _partition(n: int, dp: int) -> int:
    return -(-n // dp)


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
            yield name, _partition(n, dp // setup.ep if expert else dp)

    partition = sum(n for _, n in group_partitions())  # this rank's share of the trainable elements
    largest_group = max((n for _, n in group_partitions()), default=0)

    # ---- weights ------------------------------------------------------------------------------
    if setup.zero == 3:
        partitioned = counts.local - counts.persistent
        weight_b = (_partition(partitioned, dp) + counts.persistent) * setup.param_bytes
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
        on_device = built if setup.zero != 3 else (_partition(counts.total, setup.processes) * setup.param_bytes
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
    base = _partition(counts.total, dp) * setup.param_bytes
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
        bounce = max(_partition(V * H, dp), min(F * H, _partition(2 * E * F * H, dp)))
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


def eval_moments(p: Pairing, setup: Setup, counts: Counts) -> list[Moment]:
    """`pipeline.eval`: each model on rank 0's device, its experts only under expert parallelism
    (`eval.load_model_dir` reads onto the device; adapters merged there, layer by layer)."""
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


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------

KINDS = (("weights", "weights"), ("grads", "gradients"), ("optimizer", "optimizer state"),
         ("activations", "activations"), ("logits", "logits / loss"), ("comm", "communication buffers"),
         ("other", "other"))


@dataclass
class Plan:
    pairing: Pairing
    setup: Setup
    counts: Counts
    moments: list[Moment]  # the recipe's checkpointing, worst-case routing (what the verdict uses)
    balanced: list[Moment]  # the same with balanced routing
    activation_table: dict[tuple[bool, str], float]
    gpu_memory: float
    host_memory: float | None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def peak_moment(self) -> Moment:
        return max(self.moments, key=lambda m: m.gpu() if self.setup.device == "cuda" else m.one_process())

    @property
    def reserve(self) -> float:
        return CUDA_RESERVE_GB * GB if self.setup.device == "cuda" else 0.0

    @property
    def peak_gpu(self) -> float:
        m = self.peak_moment
        return (m.gpu() if self.setup.device == "cuda" else m.one_process()) + self.reserve

    @property
    def peak_host(self) -> float:
        return max(m.host_per_node(self.setup.per_node) for m in self.moments)

    @property
    def fits(self) -> bool:
        host_ok = self.host_memory is None or self.peak_host <= self.host_memory
        return self.peak_gpu <= self.gpu_memory and host_ok

    def phase_peaks(self, moments: list[Moment] | None = None) -> dict[str, float]:
        """Per phase, the largest moment of all torch tensors of the main process (a CPU launch's
        measure: bench/plan_probe.py)."""
        out: dict[str, float] = {}
        for m in moments or self.moments:
            out[m.phase] = max(out.get(m.phase, 0.0), m.one_process())
        return out

    def verdict(self) -> str:
        host = f"host {self.peak_host / GB:,.1f} GB per node"
        if self.host_memory is not None:
            host += f" of {self.host_memory / GB:,.0f} GB"
        where = "per GPU" if self.setup.device == "cuda" else "per process"
        return (f"plan: {'fits' if self.fits else 'does not fit'}: peak {self.peak_gpu / GB:,.1f} GB {where} "
                f"of {self.gpu_memory / GB:,.0f} GB; {host}")

    def render(self) -> str:
        s, c, p = self.setup, self.counts, self.pairing
        parallel = "no DeepSpeed" if not s.zero else f"DeepSpeed ZeRO-{s.zero}"
        if s.offload_optimizer or s.offload_params:
            parallel += " + offload " + " and ".join(
                x for x, on in (("optimizer", s.offload_optimizer), ("params", s.offload_params)) if on)
        if s.ep > 1:
            parallel += f", expert parallel {s.ep}"
        precision = "bf16" if s.bf16 else "fp32"
        out = [
            f"plan for {self.source}",
            f"  {s.stage}: {s.processes} process(es) on {s.nodes} node(s), {parallel}, {precision}, {s.device}",
            f"  model ({p.config_source}): {c.total:,} parameters, {c.active / 1e9:.2f}B active per token"
            + (f"; {c.trainable:,} trainable" if s.stage != "eval" else ""),
        ]
        if s.stage != "eval":
            out.append(f"  rank 0 holds {c.local:,} parameters, {c.local_trainable:,} trainable "
                       f"({s.rows} rows x {s.seq} tokens per micro-batch, grad accumulation {s.grad_accum})")
        out.append("  startup checks: all passed" + (f"; not run: {'; '.join(p.skipped)}" if p.skipped else ""))
        peak = self.peak_moment
        out.append("")
        out.append(f"per {'GPU' if s.device == 'cuda' else 'process'} (rank 0) at its peak: {peak.phase}, {peak.name}")
        for kind, label in KINDS:
            lines = [ln for ln in peak.lines if ln.kind == kind and (s.device == "cpu" or not ln.host) and ln.tensor]
            if lines:
                out.append(f"  {label:<24}{_gb(sum(ln.bytes for ln in lines)):>12}   "
                           + "; ".join(f"{ln.what}: {ln.how}" if ln.how else ln.what for ln in lines))
        if self.reserve:
            out.append(f"  {'CUDA context (assumed)':<24}{_gb(self.reserve):>12}   CUDA, NCCL, cuBLAS outside "
                       "PyTorch's allocator; not measured here")
        out.append(f"  {'total':<24}{_gb(self.peak_gpu):>12}")
        if s.stage != "eval":
            out.append("")
            out.append(f"activations of one micro-batch ({s.rows * s.seq:,} tokens), kept for backward + "
                       "a layer's backward:")
            out.append(f"  {'':<34}{'balanced routing':>18}{'worst-case routing':>20}")
            for ckpt in (False, True):
                label = f"checkpointing {'on' if ckpt else 'off'}" + (" (recipe)" if ckpt == s.checkpointing else "")
                out.append(f"  {label:<34}{_gb(self.activation_table[ckpt, 'balanced']):>18}"
                           f"{_gb(self.activation_table[ckpt, 'worst']):>20}")
        out.append("")
        out.append(f"per {'GPU' if s.device == 'cuda' else 'process'} by moment (worst-case routing"
                   f"{'; balanced in brackets' if s.ep > 1 else ''}):")
        for m, b in zip(self.moments, self.balanced, strict=True):
            value = m.gpu() + self.reserve if s.device == "cuda" else m.one_process()
            other = b.gpu() + self.reserve if s.device == "cuda" else b.one_process()
            extra = f"  ({_gb(other)})" if s.ep > 1 and abs(other - value) > 0.5e6 else ""
            out.append(f"  {m.phase + ': ' + m.name:<58}{_gb(value):>12}{extra}")
        if s.device == "cuda":
            out.append("")
            out.append(f"host RAM per node ({s.per_node} process(es)):")
            seen = set()
            for m in self.moments:
                host = m.host_per_node(s.per_node)
                key = (m.phase, round(host))
                if host and key not in seen:
                    seen.add(key)
                    lines = "; ".join(f"{ln.what}" for ln in m.lines if ln.host)
                    out.append(f"  {m.phase + ': ' + m.name:<58}{_gb(host):>12}   {lines}")
        if self.notes:
            out.append("")
            out += [f"note: {n}" for n in self.notes]
        out.append(self.verdict())
        return "\n".join(out)


def plan(recipe, launch: LaunchSpec, *, model_config=None, config_source: str = "", device: str | None = None,
         gpu_memory_gb: float = 80.0, host_memory_gb: float | None = None, source: str = "") -> Plan:
    """Run every startup check (raises on an invalid pairing) and plan rank 0's memory."""
    pairing = preflight(recipe, launch, model_config=model_config, config_source=config_source)
    device = device or ("cpu" if launch.use_cpu else "cuda")
    setup = setup_of(pairing, device)
    counts = count_parameters(pairing, setup)
    if setup.stage == "eval":
        moments = eval_moments(pairing, setup, counts)
        balanced, table = moments, {}
    else:
        moments = training_moments(pairing, setup, counts, routing="worst", checkpointing=setup.checkpointing)
        balanced = training_moments(pairing, setup, counts, routing="balanced", checkpointing=setup.checkpointing)
        table = {}
        for ckpt in (False, True):
            for routing in ("balanced", "worst"):
                a = activations(setup, pairing.config, routing=routing, checkpointing=ckpt)
                table[ckpt, routing] = a.saved + a.backward_peak
    result = Plan(pairing=pairing, setup=setup, counts=counts, moments=moments, balanced=balanced,
                  activation_table=table, gpu_memory=gpu_memory_gb * GB,
                  host_memory=None if host_memory_gb is None else host_memory_gb * GB, source=source)
    result.notes = notes_for(result)
    return result


def notes_for(result: Plan) -> list[str]:
    s = result.setup
    notes = ["worst case of the recipe: every row data.max_seq_len tokens, every token but a row's first "
             "labelled; GB = 10^9 bytes; the CUDA caching allocator's fragmentation is not modelled"]
    if s.stage == "eval":
        notes.append("eval: each process holds the whole model" if s.ep == 1 else
                     f"eval: each process holds the dense weights and 1/{s.ep} of the experts; every process "
                     "runs the passkey and routing prompts, balanced routing assumed")
    return notes


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides, as the stage takes them")
    parser.add_argument("--config_file", "--config-file", dest="config_file", default=None,
                        help="the accelerate config of the launch (default: one process, python -m)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--host-memory-gb", type=float, default=None)
    parser.add_argument("--model-preset", default=None,
                        help="plan with this MixtralConfig preset (a checkpoint that is not on this machine)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cpu for an accelerate config with use_cpu, else cuda")
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"arguments {bad} are not key=value")
    try:
        recipe = load_stage_recipe(args.recipe, args.overrides)
        launch = LaunchSpec.from_config_file(args.config_file) if args.config_file else LaunchSpec.single()
        model_config, config_source = None, ""
        if args.model_preset:
            from model import MixtralConfig

            model_config, config_source = MixtralConfig.preset(args.model_preset), f"preset {args.model_preset}"
        result = plan(recipe, launch, model_config=model_config, config_source=config_source, device=args.device,
                      gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                      source=f"{args.recipe} under {args.config_file or 'python -m (one process)'}")
    except FileNotFoundError as err:
        print(f"plan: invalid: {err} (plan for a checkpoint that is not on this machine with "
              "--model-preset NAME, e.g. mixtral-8x7b)", file=sys.stderr)
        return 2
    except (PreflightError, ValueError) as err:
        print(f"plan: invalid: {err}", file=sys.stderr)
        return 2
    print(result.render())
    return 0 if result.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
