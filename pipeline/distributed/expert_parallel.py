"""Expert parallelism for the native Mixtral: partition, dispatch, combine (model-free helpers).

Shape legend as in docs/interfaces.md; here also P = EP group size, El = E / P local experts,
M = rows this rank computes for its local experts (from every rank of its EP group).

Rank r of an EP group of size P owns experts [r * El, (r + 1) * El). The model is left as it is:
`MoEBlock` still routes every token over all E experts and calls `moe.experts(x_sorted,
tokens_per_expert)` with rows sorted by global expert. A forward pre-hook on that module sends each
row to the rank that owns its expert (`all_to_all`, uneven splits) and hands the local experts
their rows sorted by local expert; a forward hook sends the results back to where they came from.
This is the partition / dispatch / combine shape of torchtitan's `ExpertParallel`, and because the
hooks sit on whatever module is at `moe.experts` (the plain `MixtralExperts` or PEFT's
`ExpertLoraLayer` around it), LoRA on the experts runs under EP unchanged.

Routing stays dropless (every slot is computed) and the router, its aux loss and the expert counts
are computed from the rank's own tokens exactly as without EP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from model.checkpoint import load_pretrained
from pipeline.distributed.comm import group_device

# DeepSpeed's expert-parameter convention (deepspeed/moe/utils.py `is_moe_param`): params with
# `allreduce = False` have their grads reduced over the expert-data-parallel group named `group_name`.
EP_GROUP_NAME = "ep_size_{}"


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts a rank owns: a contiguous block of `num_local` experts."""

    num_experts: int
    ep_size: int
    ep_rank: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"expert_parallel_size={self.ep_size} must divide the number of experts ({self.num_experts})"
            )
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} is outside the EP group of size {self.ep_size}")

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first(self) -> int:
        return self.ep_rank * self.num_local

    @property
    def expert_ids(self) -> list[int]:
        return list(range(self.first, self.first + self.num_local))


class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` of rows with uneven splits; backward sends grads back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Send `send_splits[p]` consecutive rows of x to rank p of `group`; receive `recv_splits[p]` from it."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def local_order(counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Row order that regroups received rows by local expert.

    counts [P, El]: rows received from source rank p for local expert j; the received rows are laid
    out source-major (p, then j). Returns [M] indices (on counts' device) that lay them out
    expert-major (j, then p), keeping each source's rows in order. ``total`` = M, when the caller
    already has it on the host: then nothing here waits for the device. Pure, so it is tested on its own.
    """
    P, El = counts.shape
    flat = counts.reshape(-1)  # [P * El] rows per (source, expert) segment, source-major
    segments = torch.arange(P * El, device=counts.device)  # [P * El]
    segment_of_row = torch.repeat_interleave(segments, flat, output_size=total)  # [M]
    expert_major = (segments % El) * P + segments // El  # [P * El] rank of segment (p, j) once sorted by (j, p)
    return torch.argsort(expert_major[segment_of_row], stable=True)  # [M]


@dataclass
class ExpertParallelStats:
    """Communication and load counters since the last `reset`, for tracking."""

    all_to_all_bytes: int = 0  # bytes this rank sent in forward dispatch + combine
    local_expert_rows: torch.Tensor | None = None  # [El] rows computed per local expert, summed over layers
    calls: int = field(default=0)

    def reset(self) -> None:
        self.all_to_all_bytes, self.local_expert_rows, self.calls = 0, None, 0


class ExpertParallelDispatch:
    """The pre/post forward hooks on one layer's `moe.experts` module (dispatch, then combine)."""

    def __init__(self, placement: ExpertPlacement, group, stats: ExpertParallelStats):
        self.placement = placement
        self.group = group
        self.device = group_device(group)  # where the count exchange runs (CUDA under NCCL)
        self.stats = stats
        self._pending: list[tuple[list[int], list[int], torch.Tensor]] = []

    def dispatch(self, module: nn.Module, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x_sorted, tokens_per_expert = args  # [N, H], [E]
        P, El = self.placement.ep_size, self.placement.num_local
        if tokens_per_expert.shape != (self.placement.num_experts,):
            raise ValueError(
                f"expert parallel dispatch expects tokens_per_expert [E={self.placement.num_experts}], "
                f"got {tuple(tokens_per_expert.shape)}"
            )
        send_counts = tokens_per_expert.detach().to(self.device, torch.long).reshape(P, El)  # [P, El] rows per owner
        recv_counts = torch.empty_like(send_counts)  # [P, El] rows from each source for my experts
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # The layer's one host sync: an uneven all_to_all takes its split sizes as Python ints. Send and
        # receive counts come over together; backward reuses these splits (saved in _AllToAll's ctx).
        sent, got = torch.stack([send_counts, recv_counts]).tolist()  # [P][El] each
        send_splits, recv_splits = [sum(row) for row in sent], [sum(row) for row in got]
        received = all_to_all_rows(x_sorted, send_splits, recv_splits, self.group)  # [M, H] source-major
        order = local_order(recv_counts, total=sum(recv_splits)).to(received.device)  # [M]
        self._pending.append((send_splits, recv_splits, order))

        local_counts = recv_counts.sum(0)  # [El]
        # Activation checkpointing re-runs this forward inside backward: count each step's tokens once
        # (the counters are per forward; recomputation repeats the same traffic).
        if torch._C._current_graph_task_id() == -1:
            row_bytes = x_sorted.shape[1] * x_sorted.element_size()
            self.stats.all_to_all_bytes += 2 * row_bytes * (sum(send_splits) - send_splits[self.placement.ep_rank])
            self.stats.local_expert_rows = (
                local_counts if self.stats.local_expert_rows is None else self.stats.local_expert_rows + local_counts
            )
            self.stats.calls += 1
        # index_select: its backward is a plain index_add (advanced indexing sorts the indices first).
        return received.index_select(0, order), local_counts.to(tokens_per_expert.device)

    def combine(self, module: nn.Module, args: tuple, y_local: torch.Tensor) -> torch.Tensor:
        send_splits, recv_splits, order = self._pending.pop()
        y_source_major = torch.empty_like(y_local).index_copy(0, order, y_local)  # [M, H]
        return all_to_all_rows(y_source_major, recv_splits, send_splits, self.group)  # [N, H]


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `...moe.experts` module of every MoE layer (the LoRA wrapper if LoRA is applied)."""
    found = [(name, mod) for name, mod in model.named_modules() if name.endswith("moe.experts")]
    if not found:
        raise ValueError("no '*.moe.experts' modules found: expert parallelism needs the native Mixtral MoE blocks")
    return found


def _base_experts(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def shard_experts(model: nn.Module, placement: ExpertPlacement) -> None:
    """Keep only this rank's experts in every `MixtralExperts` (for a model built with all E), and
    record them in `model.expert_ids` (what model/checkpoint reads and writes).

    On the meta device it allocates nothing: `load_local_experts` applies it there, so that only the
    local experts are ever allocated and read. On a materialised model (random init: the same seed
    on every rank gives the same full init, then each rank keeps its block) the others are dropped.
    """
    lo, hi = placement.first, placement.first + placement.num_local
    for name, module in experts_modules(model):
        base = _base_experts(module)
        if base is not module:
            raise ValueError(f"{name}: shard the experts before applying LoRA (adapters are built per local expert)")
        if base.gate_up_proj.shape[0] != placement.num_experts:
            raise ValueError(
                f"{name}: holds {base.gate_up_proj.shape[0]} experts, expected all {placement.num_experts} to shard"
            )
        with torch.no_grad():
            base.gate_up_proj = nn.Parameter(base.gate_up_proj[lo:hi].clone())  # [El, 2F, H]
            base.down_proj = nn.Parameter(base.down_proj[lo:hi].clone())  # [El, H, F]
        base.num_experts = placement.num_local
    model.expert_ids = placement.expert_ids


def load_local_experts(path: str | os.PathLike, placement: ExpertPlacement, *, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", **options) -> nn.Module:
    """The Mixtral checkpoint at `path` holding only this rank's experts: built on the meta device,
    sharded there, then allocated and read; other ranks' experts are neither allocated nor read.
    `options`: `model.checkpoint.load_pretrained`'s (quantization, quantize_device)."""
    return load_pretrained(path, dtype=dtype, device=device, on_meta=lambda model: shard_experts(model, placement),
                           **options)


def expert_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter under a `moe.experts` module (expert weights and expert LoRA A/B)."""
    out = []
    for name, module in experts_modules(model):
        out.extend((f"{name}.{pname}", p) for pname, p in module.named_parameters())
    return out


def tag_expert_params(model: nn.Module, placement: ExpertPlacement) -> int:
    """Mark expert params the DeepSpeed way so their grads are reduced over expert-data-parallel ranks only.

    Every such parameter must carry the local experts as its leading dim (that is also how they are
    gathered back into a full model). Returns how many parameters were tagged.
    """
    params = expert_params(model)
    for name, p in params:
        if p.shape[0] != placement.num_local:
            raise ValueError(
                f"{name}: shape {tuple(p.shape)} does not lead with the {placement.num_local} local experts"
            )
        p.allreduce = False
        p.group_name = EP_GROUP_NAME.format(placement.ep_size)
    return len(params)


def install_dispatch(model: nn.Module, placement: ExpertPlacement, group) -> ExpertParallelStats:
    """Hook dispatch/combine onto every `moe.experts` module; returns the shared stats counters."""
    stats = ExpertParallelStats()
    modules = dict(model.named_modules())
    for name, module in experts_modules(model):
        held = _base_experts(module).gate_up_proj.shape[0]
        if held != placement.num_local:
            raise ValueError(f"{name}: holds {held} experts, expected the {placement.num_local} local ones")
        block = modules[name.rpartition(".")[0]]
        if getattr(block, "expert_parallel", False):
            raise ValueError(f"{name}: expert-parallel dispatch is already installed")
        hooks = ExpertParallelDispatch(placement, group, stats)
        module.register_forward_pre_hook(hooks.dispatch)
        module.register_forward_hook(hooks.combine)
        # The block refuses to run with only some experts unless told the dispatch is in place.
        block.expert_parallel = True
    return stats


def gather_expert_tensor(local: torch.Tensor, group) -> torch.Tensor:
    """[El, ...] on each EP rank -> [E, ...] in expert order (rank 0's block first)."""
    local = local.to(group_device(group)).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=0)
