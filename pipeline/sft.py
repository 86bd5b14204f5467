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
from pathlib import Path

import torch
from torch import nn

from data_prep.dataset import load_prepared, no_eval_note
from model.losses import IGNORE_INDEX, shift_labels
from pipeline import parallel, sharded_load
from pipeline.batches import collate_rows
from pipeline.checkpointing import latest_checkpoint
from pipeline.config import build, load_recipe_dict, save_recipe, to_dict
from pipeline.model_setup import build_model, save_final
from pipeline.preflight import LaunchSpec, preflight
from pipeline.recipe import SPEED_ONLY_KEYS, SFTRecipe, quantization_record
from pipeline.run_record import write_training_record
from pipeline.rundir import start_training_run
from pipeline.tracking import Tracker, redacted_config
from pipeline.trainer import TaskOutput, Trainer, stage_main


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


def write_manifest(recipe: SFTRecipe, output_dir: Path, *, files: list[str], data: dict,
                   final: dict[str, float], steps: int, model_config: dict) -> None:
    base_dir = recipe.model.checkpoint or str((output_dir / "base").resolve())
    write_training_record(
        output_dir, stage="sft", lora=recipe.lora, quantization=quantization_record(recipe.model),
        base={"checkpoint": base_dir, "preset": recipe.model.preset, "config": model_config},
        files=files, data=data, final=final, steps=steps)


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
