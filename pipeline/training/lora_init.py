"""LoRA A drawn independently of expert placement: ep=N starts from the adapters ep=1 starts from.

Called by `model_setup.configure_for_training` right after `model.lora.apply_lora`, on every rank.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from pipeline.distributed.expert_parallel import ExpertPlacement, expert_params


def placement_independent_lora_init(model: nn.Module, place: ExpertPlacement, seed: int) -> int:
    """Re-draw every LoRA A so that it does not depend on how the experts are placed.

    Drawn in one pass over the model, a rank holding experts 4..7 would give them the numbers a
    single process gives experts 0..3, and every later adapter would shift too: ep=2 would not train
    the model ep=1 trains. Here each A is drawn whole ([E, ...] for expert adapters) from a
    generator seeded by (seed, its name) and the rank keeps its experts' slice. Same distribution
    as PEFT's default (kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))); B stays 0.
    Returns how many tensors were drawn.
    """
    expert_names = {name for name, _ in expert_params(model)} if _has_experts(model) else set()
    drawn = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            # PEFT names attention A `...q_proj.lora_A.default.weight` and expert A
            # `...experts.lora_gate_up_A.default`: the adapter's name sits at a different depth.
            if not any(part.startswith("lora_") and part.endswith("_A") for part in name.split(".")):
                continue
            shape = (place.num_experts, *p.shape[1:]) if name in expert_names else tuple(p.shape)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            bound = 1.0 / float(shape[-1]) ** 0.5
            full = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
            if name in expert_names:
                full = full[place.first:place.first + place.num_local]  # [El, ...]
            p.copy_(full)
            drawn += 1
    return drawn


def _has_experts(model: nn.Module) -> bool:
    return any(name.endswith("moe.experts") for name, _ in model.named_modules())
