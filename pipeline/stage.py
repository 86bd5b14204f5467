"""One skeleton for every stage: its command line, and the order it runs in, named here once.

Command line (prep, sft, dpo, export, eval; chat takes an export dir, not a recipe):

    python -m pipeline.<stage> RECIPE.yaml [--flag ...] [key=value ...]

:func:`stage_main` reads it, builds the stage's recipe, runs the stage and maps what went wrong to
an exit status: 0 done; 2 a wrong recipe or input, with one line ``error: ...`` (secrets redacted;
under a launch printed once, by rank 0, when every rank meets the same error); 3 a training run's
loss diverged.

The order, the same for every stage; each stage uses the tools of pipeline/rundir.py that fit how
it writes its directory:

    1. recipe           stage_main -> the stage's ``load_recipe`` (pipeline/config.py: closest-key errors)
    2. startup checks   sft, dpo, eval: ``preflight`` (the checks `make plan` runs, no process group
                        needed); prep, export: the output dir may be theirs (``rundir.check_ownable``)
    3. claim + lock     sft, dpo: ``rundir.start_training_run`` (main process; resume or start over)
       the output dir   eval: ``rundir.owned_output`` on the main process, for the whole run
                        prep: ``owned_output`` while it writes (an up-to-date output ends the run before)
                        export: the lock next to the dir, which is replaced whole (``rundir.replaced_output``)
    4. the work         sft, dpo: :func:`run_training_stage` below; prep: ``data_prep.prepare``;
                        export: pipeline/export/stage.py; eval: pipeline/eval.py
    5. record, publish  sft, dpo: the weights, then ``manifest.json`` last (pipeline/run_record.py)
                        prep: its entries replaced, ``manifest.json`` last
                        export: a temporary dir renamed into place (``model.checkpoint.publish_dir``)
                        eval: ``eval.json`` and the report, listed in the owner record

The training stages run steps 2-5 in :func:`run_training_stage`:

    recipe -> startup checks (preflight) -> run dir (resume or start over, recipe.yaml) -> seed
    -> data -> model (this rank's share) -> parallelism -> the stage's task (DPO: its reference)
    -> trainer -> final save (gathered from EP / ZeRO-3 shards) -> run record (manifest.json)

A training stage is a `TrainingStage`: its name, how it builds the model, its task, and what its run
record adds. `run_training_stage(recipe, stage)` does the rest, the same for every stage.

Nothing heavy is imported with this module: prep and export start from its command line, and prep
never needs torch. The training stack is imported where the training order starts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import RecipeError, parse_cli, redact_env_secrets

if TYPE_CHECKING:
    from torch import nn

    from pipeline.distributed.expert_parallel import ExpertPlacement

# Exit status of a stage whose recipe or input is wrong (an error class's `exit_status` may say otherwise).
BAD_INPUT = 2


def stage_main(
    argv: Sequence[str] | None,
    usage: str,
    load_recipe: Callable[[str, list[str]], Any],
    run: Callable[..., Any],
    *,
    errors: tuple[type[BaseException], ...] = (),
    local_errors: tuple[type[BaseException], ...] = (FileNotFoundError,),
    flags: Sequence[str] = (),
) -> int:
    """A stage's command line, ``RECIPE [--flag ...] [key=value ...]`` -> exit status.

    ``load_recipe(path, overrides)`` builds the recipe and ``run(recipe, **flags)`` runs the stage;
    ``flags`` are the bare options it takes (``"--force"`` is passed as ``force=True`` or False).
    Exit 2, with one line (:func:`report_error`), for a ``RecipeError`` (a wrong recipe, a refused
    output dir) or one of ``errors``, which every rank of a launch meets alike (printed once), or
    one of ``local_errors``, which may be one rank's own, like a file missing on one node (printed
    by every rank); an error class's ``exit_status`` replaces the 2 (a diverged training run: 3).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {flag.lstrip("-").replace("-", "_"): flag in argv for flag in flags}
    path, overrides = parse_cli([a for a in argv if a not in flags], usage=usage)
    try:
        run(load_recipe(path, overrides), **given)
        end_process_group()
    except (RecipeError, *errors) as err:
        report_error(err, same_on_every_rank=True)
        return getattr(err, "exit_status", BAD_INPUT)
    except local_errors as err:
        report_error(err, same_on_every_rank=False)
        return getattr(err, "exit_status", BAD_INPUT)
    return 0


def report_error(err: BaseException, *, same_on_every_rank: bool) -> None:
    """``error: <message>`` on stderr, on one line: once per launch (global rank 0) for an error every
    rank meets alike (recipe, run dir, launch checks), from each rank, prefixed with it, for one that
    may be local to a rank (a file missing on one node)."""
    rank = int(os.environ.get("RANK", "0"))
    if same_on_every_rank and rank != 0:
        return
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    prefix = f"[rank {rank}] " if several and not same_on_every_rank else ""
    message = " ".join(redact_env_secrets(str(err)).split("\n"))
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def end_process_group() -> None:
    """Tear down a launch's process group once the stage has finished (NCCL warns at exit otherwise).
    A stage that never imported torch.distributed has none."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The training stages (SFT, DPO)
# ----------------------------------------------------------------------------------------------


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
        """(train, eval or None): the rows prep wrote to ``data.output_dir``, checked against the
        recipe's data section."""
        from data_prep.dataset import load_prepared

        return load_prepared(self.recipe.data, stage=self.name)

    def num_experts(self) -> int:
        """Experts of the model the stage starts from, read before any weight (placement needs it)."""
        from pipeline.training.model_setup import starting_config

        return starting_config(self.recipe)[0].num_local_experts

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
        """The run record's ``data``: which prepared rows the run trained and evaluated on."""
        data_dir = Path(self.recipe.data.output_dir)
        prep = json.loads((data_dir / "manifest.json").read_text()) if (data_dir / "manifest.json").is_file() else {}
        return {
            "output_dir": self.recipe.data.output_dir,
            "prep_fingerprint": prep.get("fingerprint"),
            "train_fingerprint": train._fingerprint,
            "eval_fingerprint": eval_set._fingerprint if eval_set is not None else None,
            "train_rows": len(train),
            "eval_rows": len(eval_set) if eval_set is not None else 0,
        }

    def write_record(self, out: Path, *, files: list[str], data: dict, final: dict[str, float], steps: int,
                     model_config: dict) -> None:
        raise NotImplementedError


def run_training_stage(recipe, stage: TrainingStage) -> Path:
    """The whole stage, in the one order; returns the output directory."""
    import torch
    from accelerate.utils import set_seed

    from data_prep.dataset import no_eval_note
    from pipeline.config import save_recipe, to_dict
    from pipeline.distributed import parallel, sharded_load
    from pipeline.preflight import LaunchSpec, preflight
    from pipeline.recipe import SPEED_ONLY_KEYS
    from pipeline.rundir import start_training_run
    from pipeline.training.checkpointing import latest_checkpoint
    from pipeline.training.model_setup import save_final
    from pipeline.training.tracking import Tracker, redacted_config
    from pipeline.training.trainer import Trainer

    if not torch.cuda.is_available():
        # accelerate imports DeepSpeed on every run (unwrap_model), whose device auto-detection then
        # warns "Setting accelerator to CPU ... unable to detect it" on a host that has no GPU to detect.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
