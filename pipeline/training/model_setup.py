"""The training model of a stage, set up in one order, and its final save; shared by SFT and DPO
(and the preflight, which runs `configure_for_training` on a meta-device base).

    starting_config         the config of the model a recipe starts from (before any weight)
    build_model             base weights (checkpoint, preset or a stage's own `load_base`) -> quantize
                            -> configure_for_training; `parallel.apply` comes after, in the stage
    configure_for_training  activation checkpointing -> router freezing or LoRA -> compile
    save_final              adapter or full model into the output dir, atomically
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from model.checkpoint import save_pretrained
from pipeline.distributed import sharded_load
from pipeline.distributed.expert_parallel import ExpertPlacement, shard_experts
from pipeline.distributed.parallel import ParallelSection
from pipeline.recipe import LoraSection, TrainSection
from pipeline.run_record import SFT_DIR_HINT, RunRecord
from pipeline.rundir import record
from pipeline.training.lora_init import placement_independent_lora_init
from pipeline.training.optim import freeze_router


class TrainingRecipe(Protocol):
    """What model setup reads of a stage recipe (SFTRecipe, DPORecipe): ``model`` is the stage's own
    model section (dtype, quantization, gradient_checkpointing, freeze_router, compile and, for a
    base of its own, checkpoint / preset)."""

    model: object
    stage: str
    lora: LoraSection
    parallel: ParallelSection
    train: TrainSection


def build_model(recipe: TrainingRecipe, output_dir: Path, is_main: bool,
                place: ExpertPlacement | None = None,
                load_base: Callable[[Callable[[str], nn.Module]], nn.Module] | None = None) -> nn.Module:
    """Base weights (this rank's experts only under EP, this rank's partitions only under ZeRO-3)
    -> `configure_for_training`: the one place a model is set up.
    `parallel.apply` comes after (the stage's run()).

    ``load_base(load)`` replaces ``model.checkpoint``/``model.preset`` as the source of the base
    weights (the DPO stage loads the SFT model with it); ``load(path)`` reads a checkpoint the way
    this run holds it (pipeline/distributed/sharded_load.py). The rest of the order is shared.
    """
    from model import MixtralConfig

    m = recipe.model
    dtype = getattr(torch, m.dtype)
    sharded_experts = place is not None and place.ep_size > 1
    zero3 = sharded_load.zero3_config() if recipe.parallel.zero_stage == 3 else None
    load = sharded_load.checkpoint_loader(dtype, place, zero3, m.quantization)
    if load_base is not None:
        model = load_base(load)
    elif m.checkpoint is not None:
        model = load(m.checkpoint)
    else:
        # Every rank draws the same full init (same seed), the main process saves it as the base,
        # then each rank keeps its experts (EP) or its partitions (ZeRO-3).
        model = sharded_load.random_init(MixtralConfig.preset(m.preset), dtype, zero3,
                                         save_to=output_dir / "base" if is_main else None)
        if sharded_experts:
            shard_experts(model, place)
    if m.quantization is not None and getattr(model, "quantization", None) is None:
        from model.quant import quantize_model

        # A preset (drawn whole, then quantized: presets are small) or a base that load_base merged.
        model = quantize_model(model, m.quantization, sharded_load.quantization_device())
    model = configure_for_training(model, recipe, place)
    if zero3 is not None:
        sharded_load.match_engine_dtype(model, zero3)
    return model


def starting_config(recipe: TrainingRecipe):
    """(MixtralConfig, where it was read) of the model a training recipe starts from, before any
    weight is read: SFT's ``model.checkpoint`` config.json or ``model.preset``; DPO's SFT output,
    through its run record (pipeline/run_record.py)."""
    from model import MixtralConfig

    m = recipe.model
    if recipe.stage == "dpo":
        record = RunRecord.read(m.sft_dir, missing_hint=SFT_DIR_HINT)
        source = record.path if record.base_config is not None else record.config_file()
        return MixtralConfig.from_hf(record.model_config()), str(source)
    if m.checkpoint is None:
        return MixtralConfig.preset(m.preset), f"preset {m.preset}"
    path = Path(m.checkpoint) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.checkpoint={m.checkpoint}: no config.json there")
    return MixtralConfig.from_hf(path), str(path)


def configure_for_training(model: nn.Module, recipe: TrainingRecipe, place: ExpertPlacement | None) -> nn.Module:
    """A loaded base -> activation checkpointing -> router freezing or LoRA (fp32 adapters whose A
    do not depend on the expert placement). The preflight runs it on a meta-device base."""
    m = recipe.model
    model.gradient_checkpointing = m.gradient_checkpointing
    if recipe.lora.enabled:
        from model.lora import apply_lora

        for param in model.parameters():
            param.requires_grad_(False)
        model = apply_lora(model, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout,
                           recipe.lora.target_modules, train_router=recipe.lora.train_router)
        # The same adapters whatever the expert placement, so ep=N trains what ep=1 trains.
        placement_independent_lora_init(
            model, place or ExpertPlacement(model.get_base_model().config.num_local_experts, 1, 0),
            recipe.train.seed)
        # Adapters train in fp32 even over a bf16 base: bf16 updates of small LoRA deltas round away.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    elif m.freeze_router:
        freeze_router(model)
    if m.compile:
        # After LoRA, whose layers are then compiled with the rest; a deepcopy (DPO's frozen
        # reference) drops the compiled call and runs eager.
        (model.get_base_model() if recipe.lora.enabled else model).compile_blocks()
    return model


def save_final(model: nn.Module, output_dir: Path, lora: bool,
               state_dict: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Adapter (PEFT format) or full model into ``output_dir``: written aside, then renamed in.

    ``state_dict``: the consolidated tensors when ``model`` holds only a shard (EP, ZeRO-3), named
    as ``model.named_parameters()`` names them but with every expert (pipeline.distributed.parallel).
    """
    tmp = output_dir / ".tmp-final"
    if tmp.exists():
        shutil.rmtree(tmp)
    if lora:
        model.save_pretrained(tmp, state_dict=state_dict)  # PEFT's adapter files
    elif state_dict is None:
        save_pretrained(model, tmp)
    else:
        from model import Mixtral

        full = Mixtral(model.config, device="meta")
        full.load_state_dict(state_dict, strict=False, assign=True)
        missing = [n for n, p in full.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"save_final: the consolidated state dict lacks {missing[:3]}")
        save_pretrained(full, tmp)
    names = sorted(p.name for p in tmp.iterdir())
    record(output_dir, names)  # listed before they land: starting over deletes them, and only them
    for name in names:
        os.replace(tmp / name, output_dir / name)
    tmp.rmdir()
    return names
