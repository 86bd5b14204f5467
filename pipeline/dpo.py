"""Direct preference optimisation of Mixtral on top of the SFT result, on the shared trainer.

    python -m pipeline.dpo recipes/tiny/dpo.yaml [key=value ...]          # CPU demo (make dpo)
    accelerate launch --config_file recipes/accelerate/<config>.yaml \\
        -m pipeline.dpo recipes/mixtral-8x7b/dpo_lora.yaml model.sft_dir=outputs/mixtral-8x7b/sft

Reads the SFT output (``model.sft_dir``, its manifest.json) and the preference rows
``pipeline.prep`` wrote to ``data.output_dir``; writes ``output_dir``:

    adapter_config.json + adapter_model.safetensors   the DPO adapter (PEFT format), or
    config.json + model*.safetensors                  the full DPO model
    recipe.yaml  metrics.jsonl  manifest.json  checkpoints/step-*/  wandb/

Policy and reference. LoRA DPO: the SFT adapter is merged into the base weights at load, then a
fresh DPO adapter is trained on that; with the DPO adapter disabled the model *is* the SFT model,
so the reference costs no second copy. The manifest's ``base.checkpoint`` is the SFT output dir,
whose own manifest names the base and the SFT adapter: export merges base <- SFT adapter <- DPO
adapter, the same weights this stage trained on. Full DPO:
the reference is a frozen copy of the SFT model, or none at all with precomputed log-probs.

Reference log-probs with ``dpo.precompute_ref_log_probs`` are computed once before training and
cached next to the dataset, in ``<data.output_dir>/ref_logps/``, keyed by a hash of the reference
weights and the dataset fingerprints; training then runs no reference forward.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.config import build, load_recipe_dict
from pipeline.distributed import sharded_load
from pipeline.distributed.sharded_load import merge_adapter_fp32
from pipeline.recipe import DPORecipe, quantization_record
from pipeline.run_record import SFT_DIR_HINT, RunRecord, write_training_record
from pipeline.stage import StageState, TrainingStage, run_training_stage, stage_main
from pipeline.training.model_setup import build_model
from pipeline.training.reference_cache import (
    attach_reference_log_probs,
    from_main_process,
    reference_fingerprint,
)
from pipeline.training.tasks import DPOTask, Reference
from pipeline.training.trainer import TRAINING_ERRORS


def load_recipe(path: str, overrides: list[str]) -> DPORecipe:
    return build(DPORecipe, load_recipe_dict(path, overrides), source=str(path))


# ----------------------------------------------------------------------------------------------
# Policy from the SFT output
# ----------------------------------------------------------------------------------------------


def read_sft_manifest(sft_dir: str | os.PathLike) -> RunRecord:
    return RunRecord.read(sft_dir, missing_hint=SFT_DIR_HINT)


def load_sft_model(
    sft_dir: str | os.PathLike, dtype: torch.dtype | None = None,
    *, load: Callable[[str], nn.Module] | None = None,
) -> nn.Module:
    """The SFT model as one plain Mixtral: base + SFT adapter merged, or the full SFT weights.

    ``load(path, adapter=None)``: how to read a checkpoint instead of whole, merging ``adapter`` on
    the way (``model_setup.build_model`` passes ``sharded_load.checkpoint_loader``'s: EP experts,
    ZeRO-3 partitions or a 4-bit base). The SFT adapter is merged in fp32 and then cast to ``dtype``,
    as export merges it, so DPO trains on the weights export writes.
    """
    from model.checkpoint import load_pretrained

    if load is None:
        def load(path, adapter=None):
            base = load_pretrained(path, dtype=dtype)
            return base if adapter is None else merge_adapter_fp32(base, adapter)

    record = read_sft_manifest(sft_dir)
    if record.kind == "full":
        return load(str(record.model_dir))
    base_dir = str(record.base_checkpoint)
    adapter_dir = str(record.adapter_dir)
    if record.quantization is None:
        # Trained on the full-precision base: the loader merges it (into this run's 4-bit base as it
        # streams, when this DPO run is QLoRA: model_setup.build_model then has nothing to quantize).
        merged = load(base_dir, adapter=adapter_dir)
    else:
        # Trained on a 4-bit base: merged into that base dequantized (QLoRA's merge, as export does).
        merged = merge_adapter_fp32(load(base_dir), adapter_dir)
    if getattr(merged, "quantization", None) is None:
        # get_peft_model froze the base; full DPO trains all of it (build_model freezes it for LoRA).
        merged.requires_grad_(True)
    return merged


def build_policy(recipe: DPORecipe, place=None) -> tuple[nn.Module, nn.Module | None]:
    """(policy, frozen reference or None): SFT model -> the SFT stage's build order (checkpointing,
    router freezing, a fresh LoRA adapter placed independently of EP) -> full or LoRA."""
    sft_dir = recipe.model.sft_dir
    model = build_model(
        recipe,
        Path(recipe.output_dir),
        False,
        place,
        load_base=lambda load: load_sft_model(sft_dir, load=load),
    )
    if recipe.lora.enabled:
        return model, None
    frozen = None
    if not recipe.dpo.precompute_ref_log_probs:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return model, frozen


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


class DPOStage(TrainingStage):
    """DPO's parts of the shared order (pipeline/stage.py): the policy from the SFT output, its
    reference (adapters disabled, a frozen copy, or log-probs computed once before training)."""

    name = "dpo"
    compare = ("data", "model", "lora", "dpo")
    summary_keys = ("loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")

    def shared_directories(self) -> list[tuple[str, str]]:
        # Rank 0 writes the reference log-probs cache there and every rank reads it back.
        return [(self.recipe.data.output_dir, "data.output_dir")] if self.recipe.dpo.precompute_ref_log_probs else []

    def build_model(self, out: Path, is_main: bool, place) -> nn.Module:
        model, self.frozen = build_policy(self.recipe, place)
        return model

    def make_task(self, state: StageState) -> DPOTask:
        recipe, accelerator, model, frozen = self.recipe, state.accelerator, state.model, self.frozen
        model.to(accelerator.device)
        if frozen is not None:
            frozen.to(accelerator.device)
        elif not recipe.lora.enabled:
            # Full DPO with precomputed log-probs: before the first update the policy is the reference.
            frozen = model
        chunk = recipe.model.logits_chunk_size
        reference = Reference(frozen, accelerator.unwrap_model, chunk)
        # Reference log-probs once, before any update: the policy still equals the reference here.
        if recipe.dpo.precompute_ref_log_probs:
            # Under EP each rank holds other experts: the main process's hash names the cache for all.
            model_key = from_main_process(reference_fingerprint(model, accelerator), accelerator)
            kw = dict(policy=model, reference=reference, data_dir=recipe.data.output_dir, model_key=model_key,
                      batch_size=recipe.dpo.ref_batch_size, accelerator=accelerator)
            # ZeRO-3: before `prepare` no DeepSpeed hooks gather the partitioned weights; these do.
            with sharded_load.forward_gathers(model):
                state.train = attach_reference_log_probs(state.train, "train", **kw)
                if state.eval_set is not None:
                    state.eval_set = attach_reference_log_probs(state.eval_set, "eval", **kw)
            reference = None
        self.reference_kind = ("precomputed" if reference is None else "adapters disabled" if frozen is None
                               else "frozen copy")
        return DPOTask(recipe.dpo, aux_coef=recipe.model.router_aux_loss_coef,
                       z_coef=recipe.model.router_z_loss_coef, reference=reference, logits_chunk_size=chunk)

    def describe(self, state: StageState) -> str:
        n_eval = len(state.eval_set) if state.eval_set is not None else 0
        return f"{len(state.train)} train pairs, {n_eval} eval pairs; reference: {self.reference_kind}"

    def write_record(self, out: Path, *, files, data, final, steps, model_config) -> None:
        recipe = self.recipe
        write_training_record(
            out, stage="dpo", lora=recipe.lora, quantization=quantization_record(recipe.model),
            # The SFT output dir: its record names the base and the SFT adapter (merged into the
            # weights this stage trained on); export follows it, then merges adapter_dir on top.
            base={"checkpoint": str(Path(recipe.model.sft_dir).resolve()), "config": model_config},
            reference="the SFT model" + (" (this adapter disabled)" if recipe.lora.enabled else ""),
            dpo={"beta": recipe.dpo.beta, "loss_type": recipe.dpo.loss_type,
                 "label_smoothing": recipe.dpo.label_smoothing, "nll_coef": recipe.dpo.nll_coef},
            files=files, data=data, final=final, steps=steps)


def run(recipe: DPORecipe) -> Path:
    """The whole stage (pipeline/stage.py's order); returns the output directory."""
    return run_training_stage(recipe, DPOStage(recipe))


def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, __doc__.split("\n\n")[1], load_recipe, run, errors=TRAINING_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
