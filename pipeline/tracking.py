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
    """Share of routed tokens per expert and the max/min share ratio, per layer.

    ``expert_counts`` is [L, E]: top-k slots routed to each expert. An expert that got no tokens
    makes the ratio ``inf``; it is logged as such (a dead expert is what the chart should show).
    """
    counts = expert_counts.detach().to(torch.float64).cpu()  # [L, E]
    totals = counts.sum(dim=1, keepdim=True).clamp_min(1.0)  # [L, 1]
    shares = counts / totals  # [L, E]
    out: dict[str, float] = {}
    for layer, row in enumerate(shares.tolist()):
        for expert, share in enumerate(row):
            out[f"{prefix}/layer{layer}/expert{expert}"] = share
        low = min(row)
        out[f"{prefix}/layer{layer}/max_min_ratio"] = max(row) / low if low > 0 else math.inf
    return out


def _json_number(value: float) -> float | str:
    # JSON has no inf/nan; strings keep the line parseable by every reader.
    return value if math.isfinite(value) else str(value)


class Tracker:
    """metrics.jsonl + an optional accelerate tracker. Create on every process; only main writes."""

    def __init__(self, accelerator, output_dir: str | os.PathLike, *, report_to: str, project: str,
                 run_name: str | None, tags: list[str], config: dict, resume_step: int | None = None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.report_to = report_to
        self.wandb_dir: Path | None = None
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
