"""Supervised fine-tuning of Mixtral (LoRA on attention + experts, or full), on the shared trainer.

    python -m pipeline.sft recipes/tiny/sft.yaml [key=value ...]          # CPU demo (make sft)
    accelerate launch --config_file recipes/accelerate/<config>.yaml \\
        -m pipeline.sft recipes/mixtral-8x7b/sft_lora.yaml model.checkpoint=/models/Mixtral-8x7B-v0.1

Reads the token rows ``pipeline.prep`` wrote to ``data.output_dir`` and writes ``output_dir``:

    adapter_config.json + adapter_model.safetensors   LoRA (PEFT format), or
    config.json + model*.safetensors                  full fine-tuning (save_pretrained)
    base/                                             the random-init base weights (model.preset only)
    recipe.yaml  metrics.jsonl  manifest.json  checkpoints/step-*/  wandb/

The loss is next-token cross-entropy on the answer tokens, averaged over every label token of the
global batch, plus ``router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from data_prep.dataset import load_prepared, no_eval_note
from model.checkpoint import save_pretrained
from model.losses import IGNORE_INDEX, shift_labels
from pipeline import parallel, sharded_load
from pipeline.checkpointing import latest_checkpoint, write_json
from pipeline.config import build, load_recipe_dict, redact_env_secrets, save_recipe, to_dict
from pipeline.expert_parallel import ExpertPlacement, shard_experts
from pipeline.optim import freeze_router
from pipeline.parallel import placement_independent_lora_init
from pipeline.preflight import LaunchSpec, preflight
from pipeline.recipe import SPEED_ONLY_KEYS, SFTRecipe, quantization_record
from pipeline.rundir import record, start_training_run
from pipeline.tracking import METRICS_FILE, Tracker, redacted_config
from pipeline.trainer import TaskOutput, Trainer, stage_main

# Mixtral has no pad id; padded positions are masked out everywhere, so any valid id works.
PAD_ID = 0


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Packed rows of different lengths -> right-padded [B, S] tensors; padding: document id -1 (the
    model's one padding encoding), label IGNORE_INDEX.

    Rows without position_ids / document_ids (one conversation per row) get 0..n-1 and document 0.
    """
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), PAD_ID, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "document_ids": torch.full((len(rows), width), -1, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        batch["labels"][i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        batch["position_ids"][i, :n] = torch.as_tensor(row.get("position_ids") or range(n), dtype=torch.long)
        batch["document_ids"][i, :n] = torch.as_tensor(row.get("document_ids") or [0] * n, dtype=torch.long)
    return batch


class SFTTask:
    """Packed SFT rows -> padded tensors -> CE sum over answer tokens + router losses."""

    def __init__(self, *, aux_coef: float, z_coef: float, logits_chunk_size: int | None):
        self.aux_coef = aux_coef
        self.z_coef = z_coef
        self.logits_chunk_size = logits_chunk_size

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return collate_rows(rows)

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        # The labels the model's loss scores (it shifts them inside, HF convention).
        return int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            document_ids=batch["document_ids"],
            labels=batch["labels"],
            loss_reduction="sum",
            logits_chunk_size=self.logits_chunk_size,
        )
        return TaskOutput(
            loss_sum=out.loss,
            extra=self.aux_coef * out.aux_loss + self.z_coef * out.z_loss,
            tokens=int((batch["document_ids"] >= 0).sum()),
            sums={"loss": out.loss.detach()},
            means={"aux_loss": out.aux_loss.detach(), "z_loss": out.z_loss.detach()},
            expert_counts=out.expert_counts,
        )


# ----------------------------------------------------------------------------------------------
# Steps of a run
# ----------------------------------------------------------------------------------------------


def load_recipe(path: str, overrides: list[str]) -> SFTRecipe:
    raw = load_recipe_dict(path, overrides)
    return build(SFTRecipe, raw, source=str(path))


def load_datasets(recipe: SFTRecipe):
    return load_prepared(recipe.data, stage="sft")


def data_fingerprint(recipe: SFTRecipe, train, eval_set) -> dict:
    manifest = Path(recipe.data.output_dir) / "manifest.json"
    prep = json.loads(manifest.read_text()) if manifest.is_file() else {}
    return {
        "output_dir": recipe.data.output_dir,
        "prep_fingerprint": prep.get("fingerprint"),
        "train_fingerprint": train._fingerprint,
        "eval_fingerprint": eval_set._fingerprint if eval_set is not None else None,
        "train_rows": len(train),
        "eval_rows": len(eval_set) if eval_set is not None else 0,
    }


def build_model(recipe: SFTRecipe, output_dir: Path, is_main: bool,
                place: ExpertPlacement | None = None,
                load_base: Callable[[Callable[[str], nn.Module]], nn.Module] | None = None) -> nn.Module:
    """Base weights (this rank's experts only under EP, this rank's partitions only under ZeRO-3)
    -> `configure_for_training`: the one place a model is set up.
    `parallel.apply` comes after (run()).

    ``load_base(load)`` replaces ``model.checkpoint``/``model.preset`` as the source of the base
    weights (the DPO stage loads the SFT model with it); ``load(path)`` reads a checkpoint the way
    this run holds it (pipeline/sharded_load.py). The rest of the order is shared.
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


def configure_for_training(model: nn.Module, recipe: SFTRecipe, place: ExpertPlacement | None) -> nn.Module:
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
    as ``model.named_parameters()`` names them but with every expert (pipeline.parallel).
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


def write_manifest(recipe: SFTRecipe, output_dir: Path, *, files: list[str], data: dict,
                   final: dict[str, float], steps: int, model_config: dict) -> None:
    import peft
    import transformers

    base_dir = recipe.model.checkpoint or str((output_dir / "base").resolve())
    manifest = {
        "stage": "sft",
        "kind": "lora" if recipe.lora.enabled else "full",
        "base": {"checkpoint": base_dir, "preset": recipe.model.preset, "config": model_config},
        "adapter_dir" if recipe.lora.enabled else "model_dir": str(output_dir.resolve()),
        "files": files,
        "quantization": quantization_record(recipe.model),
        "lora": {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "target_modules": recipe.lora.target_modules,
                 "train_router": recipe.lora.train_router} if recipe.lora.enabled else None,
        "data": data,
        "steps": steps,
        "final_metrics": {k: v for k, v in final.items() if not k.startswith("expert_load/")},
        "recipe": "recipe.yaml",
        "metrics": METRICS_FILE,
        "versions": {"torch": torch.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(output_dir / "manifest.json", json.loads(redact_env_secrets(json.dumps(manifest))))


def run(recipe: SFTRecipe) -> Path:
    """The whole stage; returns the output directory."""
    from accelerate.utils import set_seed

    out = Path(recipe.output_dir)
    # 0. Every startup check of this recipe under this launch (the ones `make plan` runs); they
    #    need no process group, so a wrong size is one clear error on every rank.
    preflight(recipe, LaunchSpec.from_env())
    # 1. Where we start: the main process locks and claims the output dir and decides: resume a
    #    checkpoint, or start over (pipeline/rundir.py).
    accelerator = parallel.make_accelerator(
        recipe.parallel, micro_batch_size=recipe.train.micro_batch_size,
        grad_accum_steps=recipe.train.grad_accum_steps, max_grad_norm=recipe.train.max_grad_norm,
        mixed_precision=recipe.train.mixed_precision,
        log_with="wandb" if recipe.tracking.report_to == "wandb" else None, project_dir=str(out),
    )
    start = start_training_run(
        out, "sft", resume=recipe.train.resume, overwrite=recipe.train.overwrite_output_dir,
        recipe=to_dict(recipe), ignore=SPEED_ONLY_KEYS, is_main=accelerator.is_main_process,
        latest_checkpoint=latest_checkpoint)
    resume_from = start.resume_from
    if start.note:
        accelerator.print(f"sft: {start.note}")
    if accelerator.is_main_process:
        save_recipe(recipe, out / "recipe.yaml")
    parallel.require_shared_directory(out, "output_dir")
    set_seed(recipe.train.seed)

    # 2. Data and model.
    train, eval_set = load_datasets(recipe)
    if eval_set is None:
        accelerator.print(f"sft: {no_eval_note(recipe.data)}")
    place = parallel.placement(recipe.parallel, _num_experts(recipe))
    model = build_model(recipe, out, accelerator.is_main_process, place)
    ep_stats = parallel.apply(model, recipe.parallel, place)
    model_config = (model.get_base_model() if recipe.lora.enabled else model).config.to_hf()
    n_train = sharded_load.parameter_count(p for p in model.parameters() if p.requires_grad)
    n_all = sharded_load.model_parameter_count(model)
    accelerator.print(f"sft: {n_train:,} trainable of {n_all:,} parameters; {len(train)} train rows, "
                      f"{len(eval_set) if eval_set is not None else 0} eval rows; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")

    # 3. Train.
    tracker = Tracker(
        accelerator, out, report_to=recipe.tracking.report_to, project=recipe.tracking.project,
        run_name=recipe.tracking.run_name, tags=recipe.tracking.tags, config=redacted_config(recipe),
        resume_step=_checkpoint_step(resume_from),
    )
    trainer = Trainer(
        accelerator=accelerator, model=model, task=SFTTask(
            aux_coef=recipe.model.router_aux_loss_coef, z_coef=recipe.model.router_z_loss_coef,
            logits_chunk_size=recipe.model.logits_chunk_size),
        train_data=train, eval_data=eval_set, config=recipe.train, output_dir=out, tracker=tracker,
        resume_from=resume_from, progress_bar=recipe.tracking.progress_bar,
        log_expert_load=recipe.tracking.log_expert_load,
        step_metrics=None if ep_stats is None else (
            lambda: parallel.expert_load_imbalance(ep_stats, parallel.expert_groups(place.ep_size)[0])),
    )
    final = trainer.train()

    # 4. Artifacts for the next stage: rank 0 writes the whole model, gathered from EP/ZeRO-3 shards,
    # trained tensors from DeepSpeed's fp32 master copy.
    state_dict = None
    if recipe.parallel.deepspeed:
        state_dict = parallel.consolidated_state_dict(accelerator, trainer.model, recipe.parallel, place,
                                                      trainable_only=recipe.lora.enabled,
                                                      dtypes=trainer.param_dtypes)
    if accelerator.is_main_process:
        files = save_final(accelerator.unwrap_model(trainer.model), out, recipe.lora.enabled, state_dict)
        write_manifest(recipe, out, files=files, data=data_fingerprint(recipe, train, eval_set),
                       final=final, steps=trainer.step, model_config=model_config)
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "eval_loss") if k in final)
        accelerator.print(f"sft: done after {trainer.step} steps ({summary}); output in {out.resolve()}")
    accelerator.wait_for_everyone()
    tracker.finish()
    start.release()
    return out


def _num_experts(recipe: SFTRecipe) -> int:
    from model import MixtralConfig

    if recipe.model.checkpoint is not None:
        config = Path(recipe.model.checkpoint) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"model.checkpoint={recipe.model.checkpoint}: no config.json there")
        return int(json.loads(config.read_text())["num_local_experts"])
    return MixtralConfig.preset(recipe.model.preset).num_local_experts


def _checkpoint_step(path: Path | None) -> int | None:
    if path is None:
        return None
    return json.loads((path / "state.json").read_text())["step"]


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run)


if __name__ == "__main__":
    raise SystemExit(main())
