"""Optimizer parameter groups and learning-rate schedules.

Groups are by name so that logging, freezing and DeepSpeed's expert-parallel tagging can all find
the router and the expert weights the same way:

- ``router``: ``*.moe.gate.*`` (the [E, H] router, or PEFT's trained copy of it);
- ``experts``: ``*.moe.experts.*`` (fused expert weights and their LoRA A/B);
- ``no_decay``: norms, biases and embeddings: decaying a norm gain or an embedding row pulls it
  towards zero, which is not a regulariser for those (as in GPT-2/LLaMA training code);
- ``decay``: everything else.

Weight decay applies to ``router``, ``experts`` and ``decay``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

ROUTER_MARK = ".moe.gate."
EXPERTS_MARK = ".moe.experts."


def is_router_param(name: str) -> bool:
    return ROUTER_MARK in f".{name}."


def is_expert_param(name: str) -> bool:
    return EXPERTS_MARK in f".{name}."


def is_no_decay_param(name: str, param: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    # A ZeRO-3 partitioned parameter's own shape is [0]: its real one is ds_shape.
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim < 2 or leaf == "bias" or "norm" in name or "embed_tokens" in name


def param_group_name(name: str, param: torch.Tensor) -> str:
    if is_router_param(name):
        return "router"
    if is_expert_param(name):
        return "experts"
    if is_no_decay_param(name, param):
        return "no_decay"
    return "decay"


def freeze_router(model: nn.Module) -> int:
    """Stop gradients to every router parameter; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if is_router_param(name):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """Trainable parameters split into named AdamW groups (empty groups left out)."""
    groups: dict[str, list[torch.Tensor]] = {"decay": [], "no_decay": [], "router": [], "experts": []}
    for name, param in named_params:
        if param.requires_grad:
            groups[param_group_name(name, param)].append(param)
    return [
        {"name": key, "params": params, "weight_decay": 0.0 if key == "no_decay" else weight_decay}
        for key, params in groups.items()
        if params
    ]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier on the peak lr for optimizer step ``step`` (0-based: the lr used by update step+1).

    1. Linear warmup from 1/(warmup+1) to 1 over ``warmup_steps`` updates (never a zero-lr update).
    2. Then ``cosine`` or ``linear`` decay from 1 to ``min_ratio`` at ``total_steps``; ``constant`` stays 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * shape


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
    cpu_adam: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; `cpu_adam`: DeepSpeed's CPU Adam (the same AdamW update, in its
    compiled vectorised op), for optimizer state offloaded to host memory, where torch's AdamW
    would step 46.7B parameters in eager Python loops (`parallel.require_cpu_adam` checks it builds)."""
    groups = param_groups(model.named_parameters(), weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters: check lora.* and model.freeze_router")
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                         min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
