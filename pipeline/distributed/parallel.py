"""Parallelism applied from outside the model: the one place that knows about ranks.

Order, fixed: validate the `parallel:` section against the launch (world size, expert count) ->
build the model with only this rank's experts -> LoRA -> expert-parallel dispatch + DeepSpeed
expert tags -> activation checkpointing -> ZeRO-3 leaf marking -> DeepSpeed (through accelerate).

    acc = parallel.make_accelerator(recipe.parallel, train=..., ...)      # before anything else
    placement = parallel.placement(recipe.parallel, num_experts)          # this rank's experts
    model = load_local_experts(path, placement)   # or Mixtral(cfg) + shard_experts(model, placement)
    model = apply_lora(model, ...)                                        # optional
    stats = parallel.apply(model, recipe.parallel, placement)             # EP hooks, tags, leaf modules
    optimizer = parallel.moe_param_groups(optimizer)                      # DeepSpeed expert groups
    model, optimizer = acc.prepare(model, optimizer)

Expert parallelism runs on DeepSpeed's classic MoE path (ZeRO 1/2): our own all_to_all dispatch
(pipeline/distributed/expert_parallel.py) plus DeepSpeed's expert-parameter convention, so that DeepSpeed
broadcasts expert weights only inside an expert-data-parallel group and reduces expert grads only
across ranks holding the same experts. Why not AutoEP: it replaces our MoE block with its own
router and forward (no padding mask, no router logits, so no aux loss or expert counts from the
model), and LoRA on its experts relies on DeepSpeed internals; the classic path keeps the model,
its losses and PEFT's expert LoRA layer untouched. ZeRO-3 runs without EP, MoE blocks as leaf
modules (their experts run in a data-dependent order).

NOTE: DeepSpeed only turns its expert handling on when some module is an instance of
`deepspeed.moe.layer.MoE` (runtime/engine.py `_configure_distributed_model`). Without that, tagged
expert params are silently broadcast from rank 0 and averaged across EP ranks
(shared/PARALLEL_FACTS.md). `_DeepSpeedExpertMarker` is a parameter-free such module; the
multi-process test checks that expert weights stay different across EP ranks after a step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import nn

from pipeline.distributed.comm import group_device
from pipeline.distributed.expert_parallel import (
    EP_GROUP_NAME,
    ExpertParallelStats,
    ExpertPlacement,
    experts_modules,
    gather_expert_tensor,
    install_dispatch,
    tag_expert_params,
)

if TYPE_CHECKING:
    from pipeline.preflight import LaunchSpec


class ParallelError(ValueError):
    """The `parallel:` section does not fit the launch or the model; the message says what to change."""


@dataclass
class ParallelSection:
    """Recipe section `parallel:`. Process count and machines come from the accelerate config."""

    # Process-group backend: "auto" is nccl with CUDA, gloo without.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Experts of each layer are split over groups of this many ranks (1 = every rank holds all).
    expert_parallel_size: int = 1
    # null or 0 = plain data parallel through accelerate (no DeepSpeed); 1/2/3 = DeepSpeed ZeRO stage.
    zero_stage: int | None = None
    # Keep optimizer state (and under ZeRO-3 the params) in CPU memory.
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def deepspeed(self) -> bool:
        return bool(self.zero_stage)

    def __post_init__(self):
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be null or 0 (no DeepSpeed), 1, 2 or 3, got {self.zero_stage}")
        if self.expert_parallel_size < 1:
            raise ValueError(f"parallel.expert_parallel_size must be >= 1, got {self.expert_parallel_size}")
        if self.expert_parallel_size > 1 and self.zero_stage not in (1, 2):
            raise ValueError(
                f"parallel.expert_parallel_size={self.expert_parallel_size} needs parallel.zero_stage 1 or 2 "
                f"(got {self.zero_stage}): expert parallelism runs on DeepSpeed's MoE path, which ZeRO-3 and "
                "plain DDP do not have; use zero_stage: 2, or expert_parallel_size: 1 with zero_stage: 3"
            )
        if self.offload_optimizer and not self.zero_stage:
            raise ValueError("parallel.offload_optimizer needs DeepSpeed: set parallel.zero_stage to 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("parallel.offload_params needs parallel.zero_stage: 3 (only ZeRO-3 partitions params)")


def validate(section: ParallelSection, *, num_experts: int, world_size: int) -> None:
    """Checks that need the launch and the model; run before building anything."""
    ep = section.expert_parallel_size
    if num_experts % ep != 0:
        raise ParallelError(
            f"parallel.expert_parallel_size={ep} must divide the number of experts ({num_experts}); "
            f"choose one of {[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
        )
    if world_size % ep != 0:
        raise ParallelError(
            f"parallel.expert_parallel_size={ep} must divide the number of processes ({world_size}); "
            "change it or the accelerate config's num_processes"
        )


def require_shared_directory(path: str | os.PathLike, what: str) -> None:
    """Startup check: every process sees the directory rank 0 writes into (a no-op in one process).

    Checkpoints are one directory that rank 0 creates and renames and every rank writes its shard
    into; the final model and the DPO reference log-probs are written by rank 0 and read by the
    others. With node-local disks, node 1 would fail at the first save, hours in. Rank 0 writes a
    probe file with a fresh token under `path`; each rank looks for it under its own `path`; one
    all_reduce tells every rank which ranks could not, and all of them raise. `what` names the recipe
    key in the message. Every rank must call.
    """
    import secrets
    from pathlib import Path

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = Path(path) / f".shared-fs-probe-{token[0]}"
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    blind = torch.zeros(world, dtype=torch.int32, device=group_device())  # [world] 1 = cannot see the probe
    blind[rank] = 0 if probe.is_file() and probe.read_text() == token[0] else 1
    dist.all_reduce(blind)
    if rank == 0:
        probe.unlink()
    ranks = [r for r, flag in enumerate(blind.tolist()) if flag]
    if ranks:
        raise ParallelError(
            f"{what}={path}: processes {ranks} of {world} do not see the files rank 0 writes there. Every "
            f"rank writes its checkpoint shard into one directory under {what} and reads what rank 0 wrote: "
            f"a multi-node run needs {what} on a filesystem shared by all nodes (NFS, Lustre, ...), at the "
            "same path on every node"
        )


def require_cpu_adam() -> None:
    """Startup check for `parallel.offload_optimizer`: DeepSpeed's CPU Adam op loads.

    Unless DeepSpeed was installed with it prebuilt, the op is compiled on first use with the host's
    C++ compiler and ninja (~73 s measured on a 2-core host) and cached in torch's extensions dir
    (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later runs load it in a second.
    """
    from deepspeed.ops.op_builder import CPUAdamBuilder

    try:
        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # the builder raises RuntimeError, the compiler step CalledProcessError, ...
        raise ParallelError(
            f"parallel.offload_optimizer=true steps the optimizer with DeepSpeed's CPU Adam, which cannot be "
            f"built here ({type(err).__name__}: {err}). It is compiled on first use: install a C++ compiler "
            "(g++; apt-get install build-essential) and ninja (pip install ninja) on every node, and make "
            "TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) writable; or install DeepSpeed with "
            "the op prebuilt (DS_BUILD_CPU_ADAM=1 pip install deepspeed); or set parallel.offload_optimizer=false"
        ) from err


def check_launch(section: ParallelSection, launch: LaunchSpec) -> None:
    """The accelerate config and the recipe must describe the same DeepSpeed setup.

    `launch`: `LaunchSpec.from_env()` in the launched process, `LaunchSpec.from_config_file()` in the
    plan (pipeline/preflight.py runs this among its checks, in both).
    """
    if not launch.deepspeed:
        if section.deepspeed and launch.num_processes > 1:
            raise ParallelError(
                f"parallel.zero_stage={section.zero_stage} but the launch config does not use DeepSpeed; "
                f"launch with recipes/accelerate/zero{section.zero_stage}*.yaml"
            )
        if section.deepspeed and not launch.launched:
            # accelerate would set up DeepSpeed with no process group, and its first barrier fail with
            # "Default process group has not been initialized".
            raise ParallelError(
                f"parallel.zero_stage={section.zero_stage} runs DeepSpeed, which needs a launcher: accelerate "
                f"launch --config_file recipes/accelerate/zero{section.zero_stage}*.yaml -m pipeline.<stage> ...; "
                "for one process without a launcher set parallel.zero_stage=null"
            )
        return
    launched = {
        "zero_stage": launch.zero_stage if launch.zero_stage is not None else section.zero_stage or 0,
        "offload_optimizer": launch.offload_optimizer_device != "none",
        "offload_params": launch.offload_param_device != "none",
    }
    wrong = [f"parallel.{k}={launched[k]}" for k in launched if launched[k] != getattr(section, k)]
    if wrong:
        raise ParallelError(
            f"the accelerate config launches DeepSpeed with {', '.join(wrong)} but the recipe says otherwise; "
            f"pass {' '.join(wrong).lower()} or use the matching recipes/accelerate/*.yaml"
        )


def deepspeed_config(
    section: ParallelSection, *, micro_batch_size: int, grad_accum_steps: int, bf16: bool,
    max_grad_norm: float | None = None,
) -> dict:
    """The DeepSpeed JSON for a ZeRO stage. The engine steps inside `accelerator.backward`, so it
    also does the clipping (0 = none; accelerate would otherwise fill in 1.0)."""
    zero: dict = {"stage": section.zero_stage}
    if section.zero_stage in (1, 2):
        # DeepSpeed's MoE path asserts both (runtime/zero/stage_1_and_2.py `_configure_moe_settings`).
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    if section.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if section.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if section.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # Under offload the trainer builds DeepSpeed's CPU Adam itself (optim.build_optimizer). With
        # this flag on, accelerate would rebuild any client optimizer as a CPU Adam from its defaults
        # (accelerate/utils/deepspeed.py `map_pytorch_optim_to_deepspeed`): ours would lose adamw_mode.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


# How long a collective waits for every rank. torch's and DeepSpeed's default is 10 minutes, but the
# other ranks wait in a barrier while rank 0 writes the final model (93 GB for a full Mixtral-8x7B,
# 16 minutes at 100 MB/s on a shared filesystem) or eval's rank 0 prepares the data.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


def init_process_state(backend: str, *, deepspeed: bool) -> bool:
    """accelerate's shared process state for this launch; returns whether it is CPU data parallel.

    Without CUDA, accelerate picks no backend and believes it runs alone (PARALLEL_FACTS.md); an
    explicit backend fixes the count, but plain data parallel must also be told it runs on CPUs:
    otherwise its distributed type stays NO, so `prepare` wraps no DDP and `reduce` and
    `wait_for_everyone` do nothing, and every process trains alone on its own rows. DeepSpeed sets
    its own type, and must not be told (accelerate skips DeepSpeed's init for CPU runs).
    """
    from accelerate import PartialState

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
            # accelerate's simple launcher sets MASTER_ADDR only for several processes, yet starts one.
            raise ParallelError(
                "accelerate launch started one process for a multi-process CPU config: its MULTI_CPU type "
                "needs mpirun; use distributed_type: MULTI_GPU with use_cpu: true (recipes/accelerate/cpu_ddp.yaml)"
            )
        return False
    cpu = not deepspeed and not torch.cuda.is_available()
    PartialState(backend=backend, cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)
    return cpu


def make_accelerator(
    section: ParallelSection,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    max_grad_norm: float | None = None,
    mixed_precision: str = "no",
    log_with: str | None = None,
    project_dir: str | None = None,
):
    """The run's Accelerator, with a DeepSpeed plugin built from the recipe when zero_stage > 0."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs

    if section.offload_optimizer:
        require_cpu_adam()
    # The launch was checked against the recipe by the stage's preflight (pipeline/preflight.py).
    # The DeepSpeed config is built from the recipe; accelerate refuses a config object while its
    # launch config also names DeepSpeed fields, which the preflight checked agree.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    cpu = init_process_state(section.backend, deepspeed=section.deepspeed)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    plugin = None
    if section.deepspeed:
        ds = deepspeed_config(section, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                              bf16=mixed_precision == "bf16", max_grad_norm=max_grad_norm)
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
    # Without DeepSpeed, accelerate would divide every loss by its accumulation steps: the trainer
    # already normalises by the global batch. DeepSpeed's engine counts them itself (config above).
    # DDP would broadcast the module's buffers from rank 0 before every forward; the only buffers
    # are a 4-bit base's (model/quant.py NF4Experts: identical on every rank, 24 GB for 8x7B).
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    acc = Accelerator(mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir,
                      deepspeed_plugin=plugin, cpu=cpu, kwargs_handlers=[ddp],
                      gradient_accumulation_steps=grad_accum_steps if plugin is not None else 1)
    return acc


def placement(section: ParallelSection, num_experts: int) -> ExpertPlacement:
    """This rank's experts (all of them without EP). Validates against the launch first."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    validate(section, num_experts=num_experts, world_size=world)
    ep = section.expert_parallel_size
    # EP groups are blocks of consecutive ranks, as DeepSpeed builds them (utils/groups.py).
    return ExpertPlacement(num_experts=num_experts, ep_size=ep, ep_rank=rank % ep)


def expert_groups(ep_size: int):
    """(EP group, expert-data-parallel group) of this rank, created through DeepSpeed's registry."""
    import deepspeed
    from deepspeed.utils import groups

    if not dist.is_initialized():
        raise ParallelError("expert parallelism needs a distributed launch (accelerate launch / torchrun)")
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    name = EP_GROUP_NAME.format(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def _marker_class():
    from deepspeed.moe.layer import MoE

    class _DeepSpeedExpertMarker(MoE):
        """Parameter-free module that makes DeepSpeed's engine honour our expert-param tags."""

        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own experts and gate
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = EP_GROUP_NAME.format(ep_size)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            if use_data_before_expert_parallel_:
                raise ParallelError("use_data_before_expert_parallel is not supported with our EP groups")
            expert_groups(self.ep_size)

        def forward(self, *args, **kwargs):
            raise RuntimeError("_DeepSpeedExpertMarker only marks the model for DeepSpeed; it has no forward")

    return _DeepSpeedExpertMarker


def apply(model: nn.Module, section: ParallelSection, place: ExpertPlacement) -> ExpertParallelStats | None:
    """EP dispatch + DeepSpeed expert tags (ep > 1), ZeRO-3 leaf modules; call after LoRA.

    Activation checkpointing is the model's switch (`model.gradient_checkpointing`); it recomputes
    the dispatch too, which is a collective every rank repeats in the same order, so it composes.
    Returns the all_to_all / load counters (None without EP).
    """
    stats = None
    if section.expert_parallel_size > 1:
        ep_group, _ = expert_groups(section.expert_parallel_size)
        stats = install_dispatch(model, place, ep_group)
        tag_expert_params(model, place)
        if section.zero_stage in (1, 2):
            model.add_module("deepspeed_expert_marker", _marker_class()(place.num_experts, place.ep_size))
    if section.zero_stage == 3:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
        from deepspeed.utils import set_z3_leaf_modules

        from model.moe import MoEBlock

        # Experts run in a data-dependent order; ZeRO-3 must gather a block's params all at once.
        set_z3_leaf_modules(model, [MoEBlock])
        # The chunked LM loss (DPO always) multiplies by lm_head.weight in the model's own forward,
        # outside lm_head's: gathered for the model's forward and backward, not lm_head's alone.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        register_external_parameter(base, base.lm_head.weight)
    return stats


def moe_param_groups(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Split the optimizer's groups into dense and expert groups, as DeepSpeed ZeRO-1/2 requires.

    Done in place, before the first step (no state to move). A no-op without tagged params.
    """
    # Checked before importing DeepSpeed, which single-process and DDP runs never need.
    if not any(getattr(p, "allreduce", True) is False for g in optimizer.param_groups for p in g["params"]):
        return optimizer
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if optimizer.state:
        raise ParallelError("split the optimizer's expert groups before its first step")
    groups = [dict(g, name=g.get("name", f"group{i}")) for i, g in enumerate(optimizer.param_groups)]
    # Moving the expert params out can empty a group; ZeRO drops empty groups, and an lr schedule
    # built on the optimizer would then have more groups than the optimizer.
    split = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer.param_groups[:] = [g for g in split if g["params"]]
    return optimizer


def full_state_dict(model: nn.Module, place: ExpertPlacement, ep_group, *, trainable_only: bool = False,
                    main_only: bool = False, dtypes: dict[str, torch.dtype] | None = None):
    """The whole model's tensors: expert tensors gathered from their EP group (every rank must call).

    Names are the model's own (`named_parameters`); expert params come back with all E experts, on
    the CPU. `main_only`: other ranks return {} (they still take part in the gathers), so a full
    model only ever exists on rank 0. `dtypes`: see `master_or_module_copy`. Under ZeRO-3 see
    `consolidated_state_dict`.
    """
    expert_names = set()
    if place.ep_size > 1:
        for name, module in experts_modules(model):
            expert_names.update(f"{name}.{p}" for p, _ in module.named_parameters())
    out = {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = master_or_module_copy(name, p, dtypes)
        t = gather_expert_tensor(t, ep_group) if name in expert_names else t
        if not main_only or not dist.is_initialized() or dist.get_rank() == 0:
            out[name] = t.to("cpu", copy=True)
    return out


def master_or_module_copy(name: str, p: nn.Parameter, dtypes: dict[str, torch.dtype] | None) -> torch.Tensor:
    """What to save of parameter `p`: the optimizer's fp32 master copy, in the dtype the stage built
    `p` with (`dtypes[name]`), when DeepSpeed has cast the module copy for mixed precision; else `p`.

    Under DeepSpeed bf16 the module holds bf16 copies of every weight, fp32 adapters included, and
    the fp32 master weights live (partitioned) in the ZeRO optimizer; a bf16 adapter is not what
    trained, nor what a one-process run saves. A collective over `p`'s data-parallel group (every
    rank calls, in the same order).
    """
    built = (dtypes or {}).get(name, p.dtype)
    if not p.requires_grad or built == p.dtype:
        return p.detach()
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(p)  # full tensor (this rank's experts under EP), fp32
    if master is None:
        raise ParallelError(f"{name}: DeepSpeed holds it as {p.dtype} but has no fp32 master copy of it")
    return master.to(built)


def expert_load_imbalance(stats: ExpertParallelStats, ep_group) -> dict[str, float]:
    """Rows each EP rank computed since the last reset, and max/mean across the EP group; resets.

    Once per step: the gather runs on the group's device and its result comes to the host in one read.
    """
    device = group_device(ep_group)
    rows = torch.zeros(1, dtype=torch.float64, device=device)
    if stats.local_expert_rows is not None:
        rows += stats.local_expert_rows.sum().to(device, torch.float64)
    per_rank = [torch.empty_like(rows) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(per_rank, rows, group=ep_group)
    loads = torch.cat(per_rank).tolist()
    sent = float(stats.all_to_all_bytes)
    stats.reset()
    mean = sum(loads) / len(loads)
    return {
        "ep/all_to_all_bytes": sent,
        "ep/rank_rows_max": max(loads),
        "ep/rank_rows_min": min(loads),
        "ep/load_imbalance": max(loads) / mean if mean > 0 else 1.0,
    }


def consolidated_state_dict(accelerator, model: nn.Module, section: ParallelSection, place: ExpertPlacement,
                            *, trainable_only: bool,
                            dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The whole (unwrapped) model's tensors on rank 0, {} elsewhere; every rank must call.

    EP: expert tensors gathered from the EP group. ZeRO-3: the trainable params only, one at a time
    (`sharded_load.trainable_state_dict`), or for full fine-tuning DeepSpeed's 16-bit gather, module
    by module onto rank 0 (`stage3_gather_16bit_weights_on_model_save`). Otherwise every rank
    already holds everything. Trained tensors DeepSpeed cast for mixed precision come from the fp32
    master copy, in the dtype the stage built them with (`dtypes`, name -> dtype; `master_or_module_copy`).
    """
    inner = accelerator.unwrap_model(model)
    if section.zero_stage == 3 and trainable_only:
        from pipeline.distributed.sharded_load import trainable_state_dict

        return trainable_state_dict(inner, dtypes)
    if section.zero_stage == 3:
        state = accelerator.get_state_dict(model)
        masters = {n: master_or_module_copy(n, p, dtypes) for n, p in inner.named_parameters()
                   if p.requires_grad and (dtypes or {}).get(n, p.dtype) != p.dtype}
        if not accelerator.is_main_process:
            return {}
        state.update(masters)
        trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
        return {n: t.cpu() for n, t in state.items() if not trainable_only or n in trainable}
    ep_group = expert_groups(place.ep_size)[0] if place.ep_size > 1 else None
    return full_state_dict(inner, place, ep_group, trainable_only=trainable_only, main_only=True, dtypes=dtypes)
