"""Run tracking: W&B through accelerate's tracker, plus ``<output_dir>/metrics.jsonl``.

Every logged step is one JSON line in metrics.jsonl (main process only) and, unless
``tracking.report_to: none``, one W&B log call. Without ``WANDB_API_KEY`` (and no ``WANDB_MODE``
chosen by the user) W&B runs offline under ``<output_dir>/wandb`` and says once how to upload it.
The recipe goes to W&B as the run config with secret-looking keys and secret environment values
removed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config import redact_env_secrets, to_dict

METRICS_FILE = "metrics.jsonl"


def wandb_offline_reason() -> str | None:
    """Why W&B must run offline (None when it may go online)."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    return "no WANDB_API_KEY is set"


def redacted_config(recipe: Any) -> dict:
    """The recipe as plain data, with secret keys and secret environment values removed."""
    return json.loads(redact_env_secrets(json.dumps(to_dict(recipe), default=str)))


def expert_load_metrics(expert_counts: torch.Tensor, prefix: str = "expert_load") -> dict[str, float]:
    """Share of routed tokens per expert, the max/min share ratio per layer, and the dead experts.

    ``expert_counts`` is [L, E]: top-k slots routed to each expert. ``{prefix}/dead_experts`` counts
    the (layer, expert) pairs that got no token; a layer with one has no max/min ratio (it would be
    infinite, and JSON and charts have no infinity): the count says it instead.
    """
    counts = expert_counts.detach().to(torch.float64).cpu()  # [L, E]
    totals = counts.sum(dim=1, keepdim=True).clamp_min(1.0)  # [L, 1]
    shares = counts / totals  # [L, E]
    out: dict[str, float] = {}
    dead = 0
    for layer, row in enumerate(shares.tolist()):
        for expert, share in enumerate(row):
            out[f"{prefix}/layer{layer}/expert{expert}"] = share
        low = min(row)
        dead += sum(share == 0 for share in row)
        if low > 0:
            out[f"{prefix}/layer{layer}/max_min_ratio"] = max(row) / low
    out[f"{prefix}/dead_experts"] = float(dead)
    return out


_SHARE_KEY = re.compile(r"^expert_load/layer(\d+)/expert(\d+)$")
# Logged steps in a row without a token after which an expert is called dead in the log.
DEAD_EXPERT_STEPS = 100


class DeadExpertWatch:
    """Says once per expert when it has had no token in every logged step for ``steps`` steps."""

    def __init__(self, steps: int = DEAD_EXPERT_STEPS):
        self.steps = steps
        self.zero_since: dict[tuple[int, int], int] = {}  # first step of the current run of zeros
        self.warned: set[tuple[int, int]] = set()

    def update(self, step: int, metrics: dict[str, float]) -> list[str]:
        messages = []
        for key, share in metrics.items():
            match = _SHARE_KEY.match(key)
            if match is None:
                continue
            expert = (int(match.group(1)), int(match.group(2)))
            if share > 0:
                self.zero_since.pop(expert, None)
                continue
            first = self.zero_since.setdefault(expert, step)
            if step - first + 1 >= self.steps and expert not in self.warned:
                self.warned.add(expert)
                messages.append(
                    f"warning: expert {expert[1]} of layer {expert[0]} got no token in any logged step from "
                    f"{first} to {step}: a dead expert (W&B: expert_load/dead_experts); a larger "
                    "model.router_aux_loss_coef spreads the load"
                )
        return messages


def _json_number(value: float) -> float | None:
    # JSON has no inf/nan: null keeps the line parseable by every reader (never a string).
    return value if math.isfinite(value) else None


class Tracker:
    """metrics.jsonl + an optional accelerate tracker. Create on every process; only main writes."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, *, report_to: str, project: str,
                 run_name: str | None, tags: list[str], config: dict, resume_step: int | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.report_to = report_to
        self.wandb_dir: Path | None = None
        self.dead_experts = DeadExpertWatch()
        if not accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if report_to == "wandb":
            self._init_wandb(project, run_name, tags, config)

    def _truncate_after(self, resume_step: int | None) -> None:
        """Fresh run: empty file. Resume: keep the lines up to the checkpoint step (they are re-logged after)."""
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def _init_wandb(self, project: str, run_name: str | None, tags: list[str], config: dict) -> None:
        reason = wandb_offline_reason()
        if reason is not None:
            os.environ["WANDB_MODE"] = "offline"
        self.wandb_dir = self.output_dir
        # W&B records the command line (sys.argv, read whenever it builds run metadata), and an
        # override may carry a secret: the process's argv is redacted for good, it has been parsed.
        sys.argv[:] = [redact_env_secrets(arg) for arg in sys.argv]
        os.environ.setdefault("WANDB_SILENT", "true")
        init_kwargs = {"wandb": {"dir": str(self.wandb_dir), "tags": [redact_env_secrets(t) for t in tags]}}
        if run_name:
            init_kwargs["wandb"]["name"] = redact_env_secrets(run_name)
        self.accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
        if reason is not None:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run_dir = Path(run.dir).parent
            self.accelerator.print(
                f"W&B: {reason}, so this run is logged offline in {run_dir}\n"
                f"     upload it later with: wandb sync {run_dir}"
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        line = {"step": step, **{k: _json_number(float(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        for message in self.dead_experts.update(step, metrics):
            self.accelerator.print(message)
        if self.report_to != "none":
            self.accelerator.log(metrics, step=step)

    def finish(self) -> None:
        """Close the W&B run; call it last in a stage, after its final collectives.

        Not `accelerator.end_training()`: that also destroys the process group, and a stage's final
        consolidation and barriers come after training (issue 14: no model, no manifest).
        """
        if self.report_to != "none" and self.accelerator.is_main_process:
            for tracker in self.accelerator.trackers:
                tracker.finish()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
