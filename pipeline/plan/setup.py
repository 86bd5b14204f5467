"""What the launch runs, read from the (recipe, launch) pairing: precision, device, process and
expert-parallel counts, DeepSpeed's ZeRO configuration (`Setup`), and the parameter counts of the
whole model and of rank 0's model, built on the meta device as the launch builds it (`Counts`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.plan.lines import BYTES
from pipeline.preflight import Pairing


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
