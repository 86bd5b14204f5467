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

from pathlib import Path

import torch
from torch import nn

from model.losses import IGNORE_INDEX, shift_labels
from pipeline.config import build, load_recipe_dict
from pipeline.recipe import SFTRecipe, quantization_record
from pipeline.run_record import write_training_record
from pipeline.stage import StageState, TrainingStage, run_training_stage, stage_main
from pipeline.training.batches import collate_rows
from pipeline.training.model_setup import build_model
from pipeline.training.trainer import TRAINING_ERRORS, TaskOutput


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


def load_recipe(path: str, overrides: list[str]) -> SFTRecipe:
    return build(SFTRecipe, load_recipe_dict(path, overrides), source=str(path))


class SFTStage(TrainingStage):
    """SFT's parts of the shared order (pipeline/stage.py): a base from a checkpoint or a preset's
    random init (saved as base/), the SFT task, the base named in the run record."""

    name = "sft"

    def build_model(self, out: Path, is_main: bool, place) -> nn.Module:
        return build_model(self.recipe, out, is_main, place)

    def make_task(self, state: StageState) -> SFTTask:
        m = self.recipe.model
        return SFTTask(aux_coef=m.router_aux_loss_coef, z_coef=m.router_z_loss_coef,
                       logits_chunk_size=m.logits_chunk_size)

    def write_record(self, out: Path, *, files, data, final, steps, model_config) -> None:
        recipe = self.recipe
        base_dir = recipe.model.checkpoint or str((out / "base").resolve())
        write_training_record(
            out, stage="sft", lora=recipe.lora, quantization=quantization_record(recipe.model),
            base={"checkpoint": base_dir, "preset": recipe.model.preset, "config": model_config},
            files=files, data=data, final=final, steps=steps)


def run(recipe: SFTRecipe) -> Path:
    """The whole stage (pipeline/stage.py's order); returns the output directory."""
    return run_training_stage(recipe, SFTStage(recipe))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run, errors=TRAINING_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
