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

from torch import nn

from pipeline.config import build, load_recipe_dict
from pipeline.recipe import SFTRecipe, quantization_record
from pipeline.run_record import write_training_record
from pipeline.stage import StageState, TrainingStage, run_training_stage, stage_main
from pipeline.training.model_setup import build_model
from pipeline.training.tasks import SFTTask
from pipeline.training.trainer import TRAINING_ERRORS


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
