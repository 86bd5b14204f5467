"""Running the stage command lines in subprocesses, launched or not, for the multi-process tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch_env() -> dict:
    """The test process's environment without W&B or accelerate settings, offline, one thread each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               ACCELERATE_DISABLE_RICH="1", PYTHONUNBUFFERED="1")
    return env


def run_command(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def accelerate_launch(config: str) -> list[str]:
    """`accelerate launch` with recipes/accelerate/<config> on a free port, before `-m module ...`."""
    # monitor_interval: torchrun's agent otherwise notices the finished workers up to 5 s late.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" / config),
            "--main_process_port", "0", "--monitor_interval", "0.1"]
