"""The order every training stage runs in, owned here; SFT and DPO add their parts.

    recipe -> startup checks (preflight) -> run dir (resume or start over, recipe.yaml) -> seed
    -> data -> model (this rank's share) -> parallelism -> the stage's task (DPO: its reference)
    -> trainer -> final save (gathered from EP / ZeRO-3 shards) -> run record (manifest.json)

A stage is a `TrainingStage`: its name, how it reads its data, how many experts its model has, how
it builds the model, its task, and what its run record adds. `run_training_stage(recipe, stage)` does
the rest, the same for every stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from data_prep.dataset import no_eval_note
from pipeline.config import save_recipe, to_dict
from pipeline.distributed import parallel, sharded_load
from pipeline.distributed.expert_parallel import ExpertPlacement
from pipeline.preflight import LaunchSpec, preflight
from pipeline.recipe import SPEED_ONLY_KEYS
from pipeline.rundir import start_training_run
from pipeline.training.checkpointing import latest_checkpoint
from pipeline.training.model_setup import save_final
from pipeline.training.tracking import Tracker, redacted_config
from pipeline.training.trainer import Trainer


@dataclass
class StageState:
    """What the shared order has made so far, handed to the stage's `make_task`."""

    accelerator: object
    model: nn.Module
    train: object
    eval_set: object | None
    place: ExpertPlacement


class TrainingStage:
    """A training stage's parts (subclassed by pipeline.sft and pipeline.dpo)."""

    name: str
    # The recipe sections a resumed run must share with the one it resumes (pipeline/rundir.py).
    compare: tuple[str, ...] = ("data", "model", "lora")
    summary_keys: tuple[str, ...] = ("loss", "eval_loss")

    def __init__(self, recipe):
        self.recipe = recipe

    def shared_directories(self) -> list[tuple[str, str]]:
        """(path, recipe key) every rank must see as rank 0 writes it, besides output_dir."""
        return []

    def load_data(self):
        """(train, eval or None)."""
        raise NotImplementedError

    def num_experts(self) -> int:
        raise NotImplementedError

    def build_model(self, out: Path, is_main: bool, place: ExpertPlacement) -> nn.Module:
        raise NotImplementedError

    def make_task(self, state: StageState):
        """The trainer's task; may replace ``state.train`` / ``state.eval_set`` (DPO attaches its
        reference log-probs)."""
        raise NotImplementedError

    def describe(self, state: StageState) -> str:
        """The part of the startup line after the parameter counts."""
        n_eval = len(state.eval_set) if state.eval_set is not None else 0
        return f"{len(state.train)} train rows, {n_eval} eval rows"

    def data_record(self, train, eval_set) -> dict:
        raise NotImplementedError

    def write_record(self, out: Path, *, files: list[str], data: dict, final: dict[str, float], steps: int,
                     model_config: dict) -> None:
        raise NotImplementedError


def run_training_stage(recipe, stage: TrainingStage) -> Path:
    """The whole stage, in the one order; returns the output directory."""
    from accelerate.utils import set_seed

    name = stage.name
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
        out, name, resume=recipe.train.resume, overwrite=recipe.train.overwrite_output_dir,
        recipe=to_dict(recipe), compare=stage.compare, ignore=SPEED_ONLY_KEYS,
        is_main=accelerator.is_main_process, latest_checkpoint=latest_checkpoint)
    resume_from = start.resume_from
    if start.note:
        accelerator.print(f"{name}: {start.note}")
    if accelerator.is_main_process:
        save_recipe(recipe, out / "recipe.yaml")
    parallel.require_shared_directory(out, "output_dir")
    for path, what in stage.shared_directories():
        parallel.require_shared_directory(path, what)
    set_seed(recipe.train.seed)

    # 2. Data, model, parallelism, the stage's task.
    train, eval_set = stage.load_data()
    if eval_set is None:
        accelerator.print(f"{name}: {no_eval_note(recipe.data)}")
    place = parallel.placement(recipe.parallel, stage.num_experts())
    model = stage.build_model(out, accelerator.is_main_process, place)
    ep_stats = parallel.apply(model, recipe.parallel, place)
    model_config = (model.get_base_model() if recipe.lora.enabled else model).config.to_hf()
    state = StageState(accelerator, model, train, eval_set, place)
    task = stage.make_task(state)
    train, eval_set = state.train, state.eval_set
    n_train = sharded_load.parameter_count(p for p in model.parameters() if p.requires_grad)
    n_all = sharded_load.model_parameter_count(model)
    accelerator.print(f"{name}: {n_train:,} trainable of {n_all:,} parameters; {stage.describe(state)}; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}")

    # 3. Train.
    tracker = Tracker(
        accelerator, out, report_to=recipe.tracking.report_to, project=recipe.tracking.project,
        run_name=recipe.tracking.run_name, tags=recipe.tracking.tags, config=redacted_config(recipe),
        resume_step=_checkpoint_step(resume_from),
    )
    trainer = Trainer(
        accelerator=accelerator, model=model, task=task,
        train_data=train, eval_data=eval_set, config=recipe.train, output_dir=out, tracker=tracker,
        resume_from=resume_from, progress_bar=recipe.tracking.progress_bar,
        log_expert_load=recipe.tracking.log_expert_load,
        step_metrics=None if ep_stats is None else (
            lambda: parallel.expert_load_imbalance(ep_stats, parallel.expert_groups(place.ep_size)[0])),
    )
    final = trainer.train()

    # 4. Artifacts for the next stage: rank 0 writes the whole model, gathered from EP/ZeRO-3 shards,
    # trained tensors from DeepSpeed's fp32 master copy; then the run record, last.
    state_dict = None
    if recipe.parallel.deepspeed:
        state_dict = parallel.consolidated_state_dict(accelerator, trainer.model, recipe.parallel, place,
                                                      trainable_only=recipe.lora.enabled,
                                                      dtypes=trainer.param_dtypes)
    if accelerator.is_main_process:
        files = save_final(accelerator.unwrap_model(trainer.model), out, recipe.lora.enabled, state_dict)
        stage.write_record(out, files=files, data=stage.data_record(train, eval_set), final=final,
                           steps=trainer.step, model_config=model_config)
        summary = ", ".join(f"{k} {final[k]:.4f}" for k in stage.summary_keys if k in final)
        accelerator.print(f"{name}: done after {trainer.step} steps ({summary}); output in {out.resolve()}")
    accelerator.wait_for_everyone()
    tracker.finish()
    start.release()
    return out


def _checkpoint_step(path: Path | None) -> int | None:
    if path is None:
        return None
    return json.loads((path / "state.json").read_text())["step"]
