"""Output directories: ownership, the lock, and where a training run starts (pipeline/rundir.py)."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import rundir
from pipeline.rundir import LOCK_FILE, OWNER_FILE, RunDirError, acquire_lock, start_training_run
from pipeline.training.checkpointing import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
RECIPE = {"data": {"max_seq_len": 256, "sources": [{"path": "a.jsonl"}]}, "model": {"preset": "tiny"},
          "lora": {"enabled": False}}


def start(out: Path, *, resume="never", overwrite=False, recipe=RECIPE):
    return start_training_run(out, "sft", resume=resume, overwrite=overwrite, recipe=recipe,
                              latest_checkpoint=latest_checkpoint)


def fake_run(out: Path, *, steps=(), finished=False, recipe=RECIPE):
    """A run directory as the SFT stage leaves it (owned, recipe.yaml, checkpoints, manifest)."""
    begun = start(out, overwrite=True, recipe=recipe)
    begun.release()
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (out / "metrics.jsonl").write_text("")
    (out / "wandb").mkdir()
    for step in steps:
        ckpt = out / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text("{}")
    if finished:
        rundir.record(out, ["manifest.json", "adapter_model.safetensors"])
        (out / "manifest.json").write_text("{}")
        (out / "adapter_model.safetensors").write_bytes(b"x")


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_a_directory_the_pipeline_did_not_write_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "data.jsonl").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(RunDirError, match=rf"output_dir {out} is not empty and was not written by this pipeline "
                                              r"\(it holds data.jsonl, thesis.tex\)"):
            start(out, overwrite=overwrite)
        assert names(out) == ["data.jsonl", "thesis.tex"]  # not even a lock file


def test_a_directory_of_another_stage_is_refused(tmp_path):
    fake_run(tmp_path / "sft")
    with pytest.raises(RunDirError, match="holds the output of the sft stage; give the dpo stage a directory"):
        start_training_run(tmp_path / "sft", "dpo", resume="never", overwrite=True, recipe=RECIPE,
                           latest_checkpoint=latest_checkpoint)


def test_a_run_directory_from_before_the_owner_file_is_adopted(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (out / "model-00001-of-00002.safetensors").write_bytes(b"x")
    begun = start(out, overwrite=True)  # every entry is a name SFT writes: adopted, listed, then deleted
    begun.release()
    assert names(out) == [OWNER_FILE]


def test_a_failed_start_does_not_block_the_fixed_rerun(tmp_path):
    out = tmp_path / "run"
    fake_run(out)  # recipe.yaml, metrics.jsonl, wandb/: no checkpoint, no manifest
    (out / "notes.md").write_text("mine")
    begun = start(out)  # resume=never, no overwrite: nothing there can be resumed, so it starts
    assert begun.resume_from is None and "stopped before its first checkpoint" in begun.note
    assert names(out) == sorted([OWNER_FILE, LOCK_FILE, "notes.md"])
    begun.release()
    assert not (out / LOCK_FILE).exists()


def test_a_run_with_checkpoints_or_finished_is_refused_unless_told(tmp_path):
    out = tmp_path / "run"
    fake_run(out, steps=(2, 4))
    with pytest.raises(RunDirError, match="already holds a run with checkpoints up to step-000004; pass "
                                          "train.resume=auto to continue it, train.overwrite_output_dir=true"):
        start(out)
    fake_run(tmp_path / "done", steps=(6,), finished=True)
    with pytest.raises(RunDirError, match="already holds a finished run"):
        start(tmp_path / "done")
    begun = start(out, resume="auto")
    assert begun.resume_from == out / "checkpoints" / "step-000004"
    begun.release()


def test_resume_auto_refuses_checkpoints_of_a_different_recipe(tmp_path):
    out = tmp_path / "run"
    fake_run(out, steps=(2,))
    other = {**RECIPE, "data": {**RECIPE["data"], "sources": [{"path": "b.jsonl"}]}}
    with pytest.raises(RunDirError, match=r"trained with a different recipe \(data.sources.0.path: 'a.jsonl' -> "
                                          r"'b.jsonl'\); pass train.overwrite_output_dir=true"):
        start(out, resume="auto", recipe=other)
    ignored = {**RECIPE, "model": {**RECIPE["model"], "gradient_checkpointing": True}}
    begun = start_training_run(out, "sft", resume="auto", overwrite=False, recipe=ignored,
                               ignore=("model.gradient_checkpointing",), latest_checkpoint=latest_checkpoint)
    assert begun.resume_from is not None
    begun.release()


def test_overwrite_starts_over_even_with_resume_auto_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "run"
    fake_run(out, steps=(2, 4), finished=True)
    (out / "notes.md").write_text("mine")
    begun = start(out, resume="auto", overwrite=True)
    assert begun.resume_from is None and begun.note.startswith("train.overwrite_output_dir=true: starting over")
    assert names(out) == sorted([OWNER_FILE, LOCK_FILE, "notes.md"])
    begun.release()


def _holder(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipeline.rundir import acquire_lock; "
         "acquire_lock(sys.argv[1], what='x'); print('held', flush=True); time.sleep(120)", str(lock)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_run_holds_the_directory_and_a_killed_one_does_not(tmp_path):
    out = tmp_path / "run"
    fake_run(out, steps=(2,))
    holder = _holder(out / LOCK_FILE)
    try:
        # resume=auto must not pick up the live run's checkpoint; overwrite must not delete under it.
        for kwargs in ({"resume": "auto"}, {"overwrite": True}):
            with pytest.raises(RunDirError, match=rf"output_dir {out} is in use by another run \(pid {holder.pid} "
                                                  rf"on host {socket.gethostname()} since "):
                start(out, **kwargs)
        assert (out / "checkpoints" / "step-000002").is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    begun = start(out, resume="auto")  # the kernel dropped the killed holder's lock
    assert begun.resume_from == out / "checkpoints" / "step-000002"
    begun.release()


def test_without_filesystem_locks_the_pid_record_decides(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    lock = tmp_path / "x.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "then"}))
        monkeypatch.setattr(fcntl, "flock", no_locks)
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {sleeper.pid} on host"):
            acquire_lock(lock, what="output_dir x")
    finally:
        sleeper.kill()
        sleeper.wait()
    taken = acquire_lock(lock, what="output_dir x")  # its holder is dead: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    lock.write_text(json.dumps({"pid": 1, "host": "another-node", "started": "then"}))
    with pytest.raises(RunDirError, match=rf"cannot be checked: delete {lock} if no run is alive there"):
        acquire_lock(lock, what="output_dir x")


LAUNCHED = """
import os, sys, time
from pathlib import Path
from accelerate import PartialState
from pipeline.training.checkpointing import latest_checkpoint
from pipeline.rundir import start_training_run
from pipeline.stage import stage_main

def run(out):
    state = PartialState(backend="gloo")
    begun = start_training_run(Path(out), "sft", resume="auto", overwrite=False, recipe={},
                               is_main=state.is_main_process, latest_checkpoint=latest_checkpoint)
    os.write(1, f"rank {state.process_index} started\\n".encode())  # one write: the ranks share the pipe
    while not (Path(out).parent / "stop").exists():
        time.sleep(0.05)
    state.wait_for_everyone()
    begun.release()

sys.exit(stage_main(sys.argv[1:], "", lambda path, overrides: path, run))
"""


@pytest.mark.multiprocess
def test_the_ranks_of_one_launch_share_the_run_and_a_second_launch_is_refused_on_every_rank(tmp_path):
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def launch():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(port), str(script), str(out)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = launch()
    try:
        started = []
        while len(started) < 2:  # other lines (a launcher's blank line) may come between
            line = first.stdout.readline()
            assert line, "the first launch ended before both ranks started"
            if line.strip():
                started.append(line.strip())
        assert sorted(started) == ["rank 0 started", "rank 1 started"]  # both ranks: one run, one lock
        second = launch()
        _, err = second.communicate(timeout=300)
        assert second.returncode != 0
        errors = [line for line in err.splitlines() if "error: " in line and "in use by another run" in line]
        assert len(errors) == 1, err  # printed once, by rank 0
        assert errors[0].startswith(f"error: output_dir {out} is in use by another run (pid ")
        assert first.poll() is None
    finally:
        (tmp_path / "stop").touch()
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        first.kill()
    assert first.returncode == 0, first.stderr.read()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.multiprocess
def test_a_recipe_error_under_accelerate_is_one_line_printed_once(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from launching import accelerate_launch, launch_env

    cmd = accelerate_launch("cpu_zero2_ep2.yaml") + [
        "-m", "pipeline.sft", str(REPO / "recipes/tiny/sft.yaml"), "parallel.zero_stage=2",
        "parallel.expert_parallel_size=3", f"output_dir={tmp_path / 'out'}", "tracking.report_to=none"]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    # Both ranks exit 2 with the same error; only rank 0 says it. The rest of stderr is the launcher's
    # own failure report (torchrun's ChildFailedError), which the stage does not control.
    assert ours == ["error: parallel.expert_parallel_size=3 must divide the number of experts (8); choose one of "
                    "[1, 2, 4, 8]"], proc.stderr
    assert "exitcode  : 2" in proc.stderr and proc.stderr.count("Traceback") <= 1  # the launcher's, none of ours
    assert not (tmp_path / "out").exists()
