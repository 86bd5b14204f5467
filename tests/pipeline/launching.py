"""Running the stage command lines in subprocesses, launched or not, for the multi-process tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def launch_env() -> dict:
    """The test process's environment without W&B or accelerate settings, one thread each, offline:
    W&B stays on (the recipes' default) and writes its run under the output dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               ACCELERATE_DISABLE_RICH="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return env


def run_command(cmd: list[str]) -> str:
    """Runs it from the repository; fails the test with its output's end; returns its stdout."""
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def kill_midway(cmd: list[str], started: Callable[[], bool], timeout_s: float = 120) -> None:
    """Runs `cmd` from the repository and SIGKILLs it as soon as `started()` (polled every 5 ms);
    fails the test if the command ends first or `started()` stays false for `timeout_s`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while not started():
            assert proc.poll() is None, "the command ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def accelerate_launch(config: str) -> list[str]:
    """`accelerate launch` with recipes/accelerate/<config> on a free port, before `-m module ...`."""
    # monitor_interval: torchrun's agent otherwise notices the finished workers up to 5 s late.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" / config),
            "--main_process_port", "0", "--monitor_interval", "0.1"]


def assert_finished_with_wandb(run: Path) -> None:
    """A stage that ran with W&B on wrote its whole output: the manifest, every file it lists, and
    the offline W&B run (W&B once ended the process group before the final save: issue 14)."""
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["files"] and all((run / name).is_file() for name in manifest["files"]), manifest["files"]
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb")), f"no offline W&B run under {run / 'wandb'}"
