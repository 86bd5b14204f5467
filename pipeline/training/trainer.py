"""The training loop shared by SFT and DPO, on accelerate.

A stage hands the loop a prepared model, its datasets and a :class:`Task` (how to collate rows,
what the loss is averaged over, and the forward). The loop owns everything else: data order and
sharding, gradient accumulation, normalisation by the GLOBAL batch, clipping, the optimizer and
schedule, evaluation, logging, checkpoints and resume, and stopping on a non-finite loss.

Loss normalisation. A task returns the *sum* of its main loss over "units" (label tokens for SFT,
pairs for DPO) and says how many units each micro-batch has. Before the forwards of an optimizer
step the loop counts the units of all its micro-batches on all processes (``global_units``), so

    backward(loss_sum * world_size / global_units + extra / grad_accum_steps)

gives, after data-parallel gradient averaging, the gradient of the mean over every unit of the
global batch, plus the mean of the per-micro-batch extra terms (router aux loss, z-loss). A plain
per-micro-batch mean would weight a token of a short micro-batch more than one of a long one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from data_prep.dataset import PreparedDataError
from model.checkpoint import write_json
from pipeline.distributed.comm import group_device
from pipeline.distributed.parallel import ParallelError, moe_param_groups
from pipeline.training import checkpointing as ckpt
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.tracking import Tracker, expert_load_metrics

if TYPE_CHECKING:
    from pipeline.recipe import TrainSection


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm stopped being finite; the run stops without updating."""

    exit_status = 3  # of the stage's command line (pipeline/stage.py); a wrong recipe or input is 2


# What stops a training stage alike on every rank of a launch (pipeline.stage.stage_main prints it
# once): the launch checks, the prepared data, a loss reduced over all ranks.
TRAINING_ERRORS = (ParallelError, PreparedDataError, TrainingDiverged)


@dataclass
class TaskOutput:
    loss_sum: torch.Tensor  # main loss summed over this micro-batch's units (graph attached)
    extra: torch.Tensor  # coefficient-weighted per-micro-batch terms added to the objective
    tokens: int  # non-padding tokens processed (for tokens/s)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as sum / global units
    means: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as mean over micro-batches
    expert_counts: torch.Tensor | None = None  # [L, E]


class Task(Protocol):
    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]: ...

    def count_units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput: ...


def steps_per_epoch(num_rows: int, micro_batch_size: int, grad_accum_steps: int, world_size: int) -> int:
    """Optimizer steps one pass over the data gives; the last partial global batch is dropped."""
    return num_rows // (micro_batch_size * grad_accum_steps * world_size)


def check_global_batch(num_rows: int, micro_batch_size: int, grad_accum_steps: int, world_size: int) -> None:
    """At least one optimizer step's rows in the training set (a startup check, pipeline/preflight.py)."""
    if steps_per_epoch(num_rows, micro_batch_size, grad_accum_steps, world_size) == 0:
        need = micro_batch_size * grad_accum_steps * world_size
        raise ValueError(
            f"the training set has {num_rows} rows, fewer than one global batch ({need} = "
            f"train.micro_batch_size x train.grad_accum_steps x processes); lower those or add data"
        )


def micro_batch_indices(
    num_rows: int, *, seed: int, step: int, micro: int, rank: int,
    micro_batch_size: int, grad_accum_steps: int, world_size: int,
) -> list[int]:
    """Row indices of micro-batch ``micro`` of optimizer step ``step`` on process ``rank``.

    The order is a pure function of (seed, epoch), so a resumed run sees exactly the rows the
    uninterrupted one would have, from the step it stopped at.
    """
    per_epoch = steps_per_epoch(num_rows, micro_batch_size, grad_accum_steps, world_size)
    epoch, step_in_epoch = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=gen)
    slot = (step_in_epoch * grad_accum_steps + micro) * world_size + rank
    return order[slot * micro_batch_size:(slot + 1) * micro_batch_size].tolist()


class Trainer:
    """One run: ``Trainer(...).train()`` returns the last logged metrics (with the eval loss)."""

    def __init__(
        self,
        *,
        accelerator,
        model: nn.Module,
        task: Task,
        train_data: Sequence[dict],
        eval_data: Sequence[dict] | None,
        config: TrainSection,
        output_dir: str | os.PathLike,
        tracker: Tracker,
        resume_from: Path | None = None,
        progress_bar: bool = True,
        log_expert_load: bool = True,
        on_checkpoint: Callable[[Path], None] | None = None,
        step_metrics: Callable[[], dict[str, float]] | None = None,
    ):
        self.acc = accelerator
        self.task = task
        self.cfg = config
        self.train_data = train_data
        self.eval_data = eval_data
        self.output_dir = Path(output_dir)
        self.ckpt_root = self.output_dir / "checkpoints"
        self.tracker = tracker
        self.progress_bar = progress_bar
        self.log_expert_load = log_expert_load
        self.on_checkpoint = on_checkpoint
        # Called on every process after each step's backward (it may be a collective): extra metrics.
        self.step_metrics = step_metrics
        self.world = accelerator.num_processes
        # Under DeepSpeed the engine reduces, clips and steps inside `accelerator.backward`, and
        # each process holds only its shard of the optimizer state (pipeline/distributed/parallel.py).
        self.deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None

        check_global_batch(len(train_data), config.micro_batch_size, config.grad_accum_steps, self.world)
        self.per_epoch = steps_per_epoch(len(train_data), config.micro_batch_size, config.grad_accum_steps,
                                         self.world)
        self.total_steps = config.max_steps or config.epochs * self.per_epoch

        optimizer = build_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                    betas=tuple(config.betas), eps=config.eps, cpu_adam=self._offloads_optimizer())
        # Expert-parallel params (DeepSpeed-tagged) need groups of their own, before the schedule sees them.
        moe_param_groups(optimizer)
        accelerator.print(f"optimizer: {type(optimizer).__name__}, groups "
                          f"{', '.join(str(g.get('name')) for g in optimizer.param_groups)}")
        self.scheduler = build_scheduler(optimizer, warmup_steps=config.warmup_steps,
                                         total_steps=self.total_steps, schedule=config.schedule,
                                         min_ratio=config.min_lr_ratio)
        # As built, before DeepSpeed casts the module for mixed precision: what the final save keeps
        # (under ZeRO-3 the adapters were cast already, `sharded_load.match_engine_dtype`).
        self.param_dtypes = {name: getattr(p, "built_dtype", p.dtype) for name, p in model.named_parameters()}
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.step = 0
        self.trained_tokens = 0
        self.last_good_checkpoint: Path | None = None
        if resume_from is not None:
            self._load(resume_from)

    def _offloads_optimizer(self) -> bool:
        """DeepSpeed keeps the optimizer state in host memory: it steps there, with DeepSpeed's CPU Adam."""
        if not self.deepspeed:
            return False
        zero = self.acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)

    # ------------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress_bar and self.acc.is_main_process))
        last: dict[str, float] = {}
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < self.total_steps:
            metrics, tokens = self.train_step()
            self.step += 1
            window_tokens += tokens
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                window_tokens, window_start = 0, time.perf_counter()
                if self._due(cfg.eval_every) or self.step == self.total_steps:
                    metrics.update(self.evaluate())
                self.tracker.log(self.step, metrics)
                last = metrics
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            elif self._due(cfg.eval_every):
                self.tracker.log(self.step, self.evaluate())
            bar.update(1)
            if self._due(cfg.save_every) or self.step == self.total_steps:
                self.save_checkpoint()
        bar.close()
        return last

    def _due(self, every: int | None) -> bool:
        return every is not None and self.step % every == 0

    def train_step(self) -> tuple[dict[str, float], int]:
        """One optimizer step at self.step (not advanced here): (metrics, tokens over all processes)."""
        cfg = self.cfg
        self.model.train()
        batches = [self.task.collate([self.train_data[i] for i in self._indices(micro)])
                   for micro in range(cfg.grad_accum_steps)]
        local_units = sum(self.task.count_units(b) for b in batches)
        global_units = self._reduce_sum(torch.tensor(float(local_units))).item()
        if global_units == 0:
            raise ValueError(f"step {self.step + 1}: no trained units (labels) in the whole global batch")

        sums: dict[str, torch.Tensor] = {}
        means: dict[str, torch.Tensor] = {}
        counts = None
        tokens = 0
        for micro, batch in enumerate(batches):
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            last = micro == len(batches) - 1
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            backward_kwargs = {}
            if self.deepspeed:
                # The engine steps at the boundary we name, and must not rescale the normalised objective.
                self.acc.sync_gradients = last
                backward_kwargs["scale_wrt_gas"] = False
            with sync, self.acc.autocast():
                out = self.task.forward(self.model, batch)
                objective = out.loss_sum * (self.world / global_units) + out.extra / cfg.grad_accum_steps
                self.acc.backward(objective, **backward_kwargs)
            tokens += out.tokens
            _accumulate(sums, out.sums)
            _accumulate(means, out.means)
            if out.expert_counts is not None:
                counts = out.expert_counts.detach() if counts is None else counts + out.expert_counts.detach()

        metrics = self._reduce_metrics(sums, means, global_units, len(batches) * self.world)
        if self.step_metrics is not None:
            metrics.update(self.step_metrics())
        if not math.isfinite(metrics["loss"]):
            self._diverged(f"loss is {metrics['loss']}")
        grad_norm = self._clip()
        if not math.isfinite(grad_norm):
            self._diverged(f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        metrics["grad_norm"] = grad_norm
        global_tokens = int(self._reduce_sum(torch.tensor(float(tokens))).item())
        self.trained_tokens += int(global_units)
        metrics["trained_tokens"] = float(self.trained_tokens)
        if counts is not None and self.log_expert_load:
            metrics.update(expert_load_metrics(self._reduce_sum(counts.to(torch.float64))))
        return metrics, global_tokens

    def _indices(self, micro: int) -> list[int]:
        return micro_batch_indices(
            len(self.train_data), seed=self.cfg.seed, step=self.step, micro=micro,
            rank=self.acc.process_index, micro_batch_size=self.cfg.micro_batch_size,
            grad_accum_steps=self.cfg.grad_accum_steps, world_size=self.world,
        )

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.deepspeed:
            # Already clipped (DeepSpeed config `gradient_clipping`) and applied: this reads the norm.
            norm = self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm or 0.0)
            return float(norm) if norm is not None else math.nan
        if self.cfg.max_grad_norm is not None:
            return float(self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _diverged(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = (f"the last good checkpoint is {self.last_good_checkpoint}" if self.last_good_checkpoint
                 else "no checkpoint was saved before it")
        raise TrainingDiverged(
            f"step {self.step + 1}: {what}; stopping without applying this update ({where}). "
            f"Lower train.lr, raise train.warmup_steps or set train.max_grad_norm, then resume "
            f"(train.resume=auto) or start over"
        )

    def _reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value.cpu()
        return self.acc.reduce(value.to(group_device()), reduction="sum").cpu()

    def _reduce_metrics(self, sums, means, global_units: float, global_batches: float) -> dict[str, float]:
        """Sums over all processes: ``sums`` per unit, ``means`` per micro-batch of the global batch."""
        names = sorted(sums) + sorted(means)
        if not names:
            return {}
        local = torch.stack([sums[k] for k in sorted(sums)] + [means[k] for k in sorted(means)])
        total = self._reduce_sum(local).tolist()
        return {name: v / (global_units if i < len(sums) else global_batches)
                for i, (name, v) in enumerate(zip(names, total, strict=True))}

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean eval loss over the eval micro-batches (all of them, or the first `eval_max_batches` of
        the whole run, whatever the number of processes), plus the means of the extras.

        Micro-batch j goes to process j % world. Every process runs the same number of forwards:
        under expert parallelism or ZeRO-3 each forward is a collective, so a process with one
        batch fewer would leave the others waiting forever. Such a process repeats its first batch
        (or the run's first) and counts nothing from it.
        """
        if not self.eval_data:
            return {}
        self.model.eval()
        mbs = self.cfg.micro_batch_size
        starts = list(range(0, len(self.eval_data), mbs))  # every eval micro-batch of the run
        if self.cfg.eval_max_batches is not None:
            starts = starts[:self.cfg.eval_max_batches]
        mine = starts[self.acc.process_index::self.world]
        forwards = -(-len(starts) // self.world)
        sums: dict[str, torch.Tensor] = {}
        means: dict[str, torch.Tensor] = {}
        units = 0
        for i in range(forwards):
            counted = i < len(mine)
            start = mine[i] if counted else (mine or starts)[0]
            rows = [self.eval_data[j] for j in range(start, min(start + mbs, len(self.eval_data)))]
            batch = self.task.collate(rows)
            units += self.task.count_units(batch) if counted else 0
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            with self.acc.autocast():
                out = self.task.forward(self.model, batch)
            # A repeated batch keeps the metric names (the reduction below is a collective too), adds nothing.
            _accumulate(sums, {k: v if counted else torch.zeros_like(v) for k, v in out.sums.items()})
            _accumulate(means, {k: v if counted else torch.zeros_like(v) for k, v in out.means.items()})
        totals = self._reduce_sum(torch.tensor([float(units), float(len(mine))])).tolist()
        metrics = self._reduce_metrics(sums, means, max(totals[0], 1.0), max(totals[1], 1.0))
        return {f"eval_{k}": v for k, v in metrics.items()}

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.acc.unwrap_model(self.model)
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path:
        tmp = self.ckpt_root / f".tmp-{ckpt.step_dir_name(self.step)}"
        if self.acc.is_main_process:
            ckpt.begin_checkpoint(self.ckpt_root, self.step)
        self.acc.wait_for_everyone()
        ckpt.save_rank_files(tmp, self.acc.process_index)
        state = {"step": self.step, "trained_tokens": self.trained_tokens,
                 "scheduler": self.scheduler.state_dict(), "world_size": self.world,
                 "total_steps": self.total_steps}
        if self.deepspeed:
            ckpt.save_rank_shard(tmp, self.acc.process_index, self.acc.unwrap_model(self.model), self.optimizer)
            if self.acc.is_main_process:
                write_json(tmp / ckpt.STATE_FILE, {**state, "deepspeed": True, "python_rng": ckpt.python_rng_state()},
                           sort_keys=True)
        elif self.acc.is_main_process:
            ckpt.save_main_files(
                tmp,
                model_tensors=self.trainable_state(),
                optimizer_state=self.optimizer.state_dict(),
                state=state,
            )
        self.acc.wait_for_everyone()
        final = self.ckpt_root / ckpt.step_dir_name(self.step)
        if self.acc.is_main_process:
            ckpt.commit_checkpoint(tmp, self.cfg.keep_last)
            if self.on_checkpoint is not None:
                self.on_checkpoint(final)
        self.acc.wait_for_everyone()
        self.last_good_checkpoint = final
        return final

    def _load(self, path: Path) -> None:
        sharded = json.loads((Path(path) / ckpt.STATE_FILE).read_text()).get("deepspeed", False)
        if sharded != self.deepspeed:
            raise ValueError(
                f"checkpoint {path} was written {'with' if sharded else 'without'} DeepSpeed and this run is "
                f"{'with' if self.deepspeed else 'without'}: resume with the parallel: section and launch "
                f"config that wrote it"
            )
        if self.deepspeed:
            self._load_sharded(Path(path))
            return
        data = ckpt.load_checkpoint(path, rank=self.acc.process_index)
        state = data["state"]
        if state["world_size"] != self.world:
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                f"{self.world}: the data order would change; resume with the same launch configuration"
            )
        ckpt.copy_saved_tensors(data["model"], self.trainable_state(), f"checkpoint {path}",
                                "resume with the recipe that wrote it")
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_tensors(data["rng"])
        ckpt.set_python_rng_state(data["python_rng"])
        self.step = state["step"]
        self.trained_tokens = state["trained_tokens"]
        self.last_good_checkpoint = path
        self.acc.print(f"resumed from {path} at step {self.step}/{self.total_steps}")

    def _load_sharded(self, path: Path) -> None:
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        if state["world_size"] != self.world:
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                f"{self.world}: ZeRO shards and the data order would change; resume with the same launch config"
            )
        ckpt.load_rank_shard(path, self.acc.process_index, self.acc.unwrap_model(self.model), self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        # A scheduler's state holds the lr but does not set it; without a torch optimizer state_dict
        # to restore the groups, the next step would run at the lr the schedule started with.
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
        ckpt.set_rng_tensors(load_file(path / f"rng-rank{self.acc.process_index}.safetensors"))
        ckpt.set_python_rng_state(state["python_rng"])
        self.step = state["step"]
        self.trained_tokens = state["trained_tokens"]
        self.last_good_checkpoint = path
        self.acc.print(f"resumed from {path} at step {self.step}/{self.total_steps}")


def _accumulate(into: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    for key, value in values.items():
        value = value.detach().double()
        into[key] = value if key not in into else into[key] + value
