"""Output directories: which ones the pipeline owns, who is writing one now, what starting over deletes.

Every stage writes one directory, and three rules keep a user's files and a live run safe:

1. Ownership. A directory the pipeline writes holds ``.mixtral-tune.json``: the stage that owns it
   and every top-level entry the pipeline wrote there. A non-empty directory without it is refused
   (nothing is deleted), unless every entry is a name the stage itself writes (a directory from
   before this file existed is adopted). A directory owned by another stage is refused too.
   Starting over deletes only the listed entries; anything else the user put there stays.
2. One writer. A run holds an exclusive ``flock`` on a lock file for as long as it writes (inside the
   directory; next to it for export, which replaces the whole directory: :func:`replaced_output`). The kernel drops the
   lock when the process dies, so a killed run never leaves the directory stuck; the file records
   pid, host and start time so a refusal can say who holds it. Under a multi-process launch only the
   main process (global rank 0) takes the lock and decides; the other ranks receive its decision
   (or its error) by broadcast, so every rank of one launch shares the run and every rank of a second
   launch is refused. Across nodes the output dir is on a shared filesystem (checkpoints need it);
   Linux NFS clients implement ``flock`` with NFS byte-range locks (a node that crashes keeps its
   lock until the server's lease runs out, about 90 s with NFSv4). Where a filesystem has no locks
   at all (ENOLCK, ENOSYS, EOPNOTSUPP), the record alone decides: a holder on this host is checked
   for liveness, one on another host is taken as alive and the message names the file to delete.
3. Starting point of a training stage (:func:`start_training_run`): ``overwrite_output_dir`` starts
   over whatever ``resume`` says; ``resume: auto`` continues the newest complete checkpoint when the
   recipe's data, model and LoRA sections are the ones the run was started with; a directory whose
   run stopped before its first checkpoint (a failed start) is started over without asking, since
   nothing in it can be resumed; a directory with checkpoints or a finished run is refused unless
   the recipe says to resume it or start over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from data_prep.config import config_differences
from data_prep.prepare import OUTPUT_ENTRIES as PREP_OUTPUT_ENTRIES
from pipeline.config import RecipeError

OWNER_FILE = ".mixtral-tune.json"
LOCK_FILE = ".mixtral-tune.lock"
_OWN_FILES = (OWNER_FILE, LOCK_FILE, OWNER_FILE + ".tmp")

# Names each stage writes at the top of its directory: adopting a directory written before the owner
# file existed, and what a training stage lists as soon as it owns a directory.
TRAINING_ENTRIES = (
    "recipe.yaml", "recipe.yaml.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "manifest.json",
    "manifest.json.tmp", "checkpoints", "wandb", "base", ".tmp-base", ".tmp-final", "..tmp-*",
)
_TRAINING_RESULTS = (
    "README.md", "adapter_config.json", "adapter_model.safetensors", "config.json",
    "generation_config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
)
EVAL_ENTRIES = ("recipe.yaml", "recipe.yaml.tmp", "eval.json", "eval.json.tmp", "report.html", "*.png", "wandb")
EXPORT_ENTRIES = (
    "README.md", "recipe.yaml", "config.json", "generation_config.json", "model.safetensors",
    "model-*-of-*.safetensors", "model.safetensors.index.json", "params.json", "consolidated.safetensors",
    "adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "model-*.gguf",
)
STAGE_ENTRIES = {
    "sft": TRAINING_ENTRIES + _TRAINING_RESULTS,
    "dpo": TRAINING_ENTRIES + _TRAINING_RESULTS,
    "prep": PREP_OUTPUT_ENTRIES,
    "eval": EVAL_ENTRIES,
    "export": EXPORT_ENTRIES,
}


class RunDirError(RecipeError):
    """An output directory cannot be used as asked; nothing was deleted. The message says why."""


T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Ownership
# ----------------------------------------------------------------------------------------------


def read_owner(directory: Path) -> dict | None:
    """The owner record of ``directory`` (None: the pipeline never claimed it)."""
    path = Path(directory) / OWNER_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("entries"), list) else None


def _write_owner(directory: Path, record: dict) -> None:
    tmp = directory / (OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / OWNER_FILE)


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in _OWN_FILES)


def _known(name: str, stage: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in STAGE_ENTRIES[stage])


def _listing(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_ownable(directory: str | os.PathLike, stage: str, *, key: str = "output_dir") -> None:
    """Raise unless ``directory`` is missing, empty, owned by ``stage``, or holds only ``stage``'s names.

    Reads only: a refused directory is left exactly as it was.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{key} {directory} exists and is not a directory")
    if not directory.is_dir():
        return
    owner = read_owner(directory)
    if owner is not None:
        if owner.get("stage") != stage:
            raise RunDirError(
                f"{key} {directory} holds the output of the {owner.get('stage')} stage; give the "
                f"{stage} stage a directory of its own (nothing was deleted)"
            )
        return
    foreign = [name for name in _entries(directory) if not _known(name, stage)]
    if foreign:
        raise RunDirError(
            f"{key} {directory} is not empty and was not written by this pipeline (it holds "
            f"{_listing(foreign)}); choose a new or empty directory (nothing was deleted)"
        )


def claim(directory: str | os.PathLike, stage: str, *, key: str = "output_dir") -> Path:
    """Create or adopt ``directory`` for ``stage`` (after :func:`check_ownable`); returns it."""
    directory = Path(directory)
    check_ownable(directory, stage, key=key)
    directory.mkdir(parents=True, exist_ok=True)
    if read_owner(directory) is None:
        # Adopted: everything already there passed check_ownable, so it is this stage's.
        _write_owner(directory, {"tool": "mixtral-tune", "stage": stage,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "entries": _entries(directory)})
    return directory


@contextlib.contextmanager
def owned_output(directory: str | os.PathLike, stage: str, *, key: str = "output_dir"):
    """Claim ``directory`` for ``stage`` (refusing one that is not ours), list the names the stage
    writes, and hold the directory's lock for the block."""
    directory = Path(directory)
    check_ownable(directory, stage, key=key)
    directory.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(directory / LOCK_FILE, what=f"{key} {directory}")
    try:
        claim(directory, stage, key=key)
        record(directory, literal_entries(stage))
        remove_stale_siblings(directory)  # what earlier versions left next to it (.<name>.tmp-*)
        yield directory
    finally:
        lock.release()


def literal_entries(stage: str) -> list[str]:
    """The names (not patterns) ``stage`` writes."""
    return [n for n in STAGE_ENTRIES[stage] if not any(c in n for c in "*?[")]


def record(directory: str | os.PathLike, names: Iterable[str]) -> None:
    """Add ``names`` (top-level entries) to what the pipeline wrote in ``directory``. Call it
    before writing them, so a run killed half way still lists what it left."""
    directory = Path(directory)
    owner = read_owner(directory)
    if owner is None:
        raise RunDirError(f"{directory} is not claimed by the pipeline (no {OWNER_FILE}); claim it first")
    entries = set(owner["entries"]) | {n for n in names if n not in _OWN_FILES}
    if entries != set(owner["entries"]):
        _write_owner(directory, {**owner, "entries": sorted(entries)})


def written_entries(directory: str | os.PathLike) -> list[str]:
    """Top-level entries of ``directory`` that the pipeline wrote and that exist now."""
    directory = Path(directory)
    owner = read_owner(directory) or {"entries": []}
    return [name for name in owner["entries"] if (directory / name).exists() or (directory / name).is_symlink()]


def foreign_entries(directory: str | os.PathLike) -> list[str]:
    """Entries of an owned ``directory`` that the pipeline did not write (the user's)."""
    directory = Path(directory)
    listed = set((read_owner(directory) or {"entries": []})["entries"])
    return [name for name in _entries(directory) if name not in listed]


# Temporary entries the pipeline names this way (a write killed half way leaves them behind).
TEMP_PATTERNS = (".tmp-*", "..tmp-*")


def remove_written(directory: str | os.PathLike, keep: Sequence[str] = ()) -> list[str]:
    """Delete what the pipeline wrote in ``directory`` (its owner record says what, plus its own
    temporary entries), except ``keep``; returns the names deleted. Entries the pipeline did not
    write stay."""
    directory = Path(directory)
    removed = []
    temps = [n for n in _entries(directory) if any(fnmatch.fnmatchcase(n, t) for t in TEMP_PATTERNS)]
    for name in sorted(set(written_entries(directory)) | set(temps)):
        if name in keep:
            continue
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    owner = read_owner(directory)
    if owner is not None:
        _write_owner(directory, {**owner, "entries": sorted(set(owner["entries"]) - set(removed))})
    return removed


# ----------------------------------------------------------------------------------------------
# Locks
# ----------------------------------------------------------------------------------------------

# Locks this process holds, by real path: a run that failed in this process (a test, a notebook)
# must not lock its own retry out.
_HELD: dict[str, DirLock] = {}
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


@dataclass
class DirLock:
    """An exclusive lock on ``path`` held by this process; ``release()`` when the work is done."""

    path: Path
    fd: int | None  # None: the filesystem has no locks, the pid record alone holds it

    def release(self) -> None:
        _HELD.pop(os.path.realpath(self.path), None)
        # Unlinked while still locked: a process that opened the old file re-checks the inode after
        # its flock and starts again on a fresh file (acquire_lock).
        with contextlib.suppress(FileNotFoundError):
            if self.fd is None or os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holder(path: str | os.PathLike) -> dict:
    """What the lock file says about its holder ({} if unreadable)."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder_text(info: dict) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    try:
        os.kill(int(info.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def acquire_lock(path: str | os.PathLike, *, what: str) -> DirLock:
    """Take the lock file ``path`` (non-blocking) or raise RunDirError naming the holder.

    ``what`` names the directory in the message ("output_dir outputs/tiny/sft").
    """
    path = Path(path)
    held = _HELD.get(os.path.realpath(path))
    if held is not None:
        return held
    busy = f"{what} is in use by another run ({{holder}}); wait for it to end or choose another directory"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(busy.format(holder=_holder_text(holder(path)))) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_LOCKS:
                raise
            lock = _acquire_by_record(path, busy)
            break
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            lock = DirLock(path, fd)
            _write_record(fd)
            break
        os.close(fd)  # the holder released and unlinked it between our open and our flock
    _HELD[os.path.realpath(path)] = lock
    return lock


def _record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()


def _write_record(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _record(), 0)


def _acquire_by_record(path: Path, busy: str) -> DirLock:
    info = holder(path)
    if info and info.get("pid") != os.getpid() and _alive(info):
        hint = "" if info.get("host") == socket.gethostname() else (
            f"; this filesystem has no locks, so a holder on another host cannot be checked: delete {path} "
            "if no run is alive there")
        raise RunDirError(busy.format(holder=_holder_text(info)) + hint)
    tmp = path.with_name(path.name + f".{os.getpid()}")
    tmp.write_bytes(_record())
    os.replace(tmp, path)
    return DirLock(path, None)


def sibling_lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of a directory that is replaced as a whole (prep, export): next to it."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"


@contextlib.contextmanager
def replaced_output(directory: str | os.PathLike, *, key: str = "output_dir"):
    """Hold the lock of a directory that is written aside and renamed into place whole (export):
    the lock file lives next to it, so the rename cannot take it along. Yields the names of what
    killed writes of it had left next to it, removed under the lock."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(sibling_lock_path(directory), what=f"{key} {directory}")
    try:
        yield remove_stale_siblings(directory)
    finally:
        lock.release()


def remove_stale_siblings(directory: str | os.PathLike) -> list[str]:
    """Leftovers of killed writes of ``directory`` (``.<name>.tmp-*``, ``.<name>.old-*``) next to it;
    call it holding :func:`sibling_lock_path`'s lock, which makes every such entry stale."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    removed = []
    for pattern in (f".{directory.name}.tmp-*", f".{directory.name}.old-*"):
        for path in directory.parent.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


# ----------------------------------------------------------------------------------------------
# Every rank of a launch agrees with the main process
# ----------------------------------------------------------------------------------------------


def on_main_for_all(is_main: bool, decide: Callable[[], T]) -> T:
    """Run ``decide`` on the main process only and hand its result, or its error, to every rank.

    A refusal is raised on every rank (the others get a RunDirError with the same text), so no rank
    waits in a collective for a main process that has stopped. Needs the process group when there
    is more than one process (after the Accelerator is made).
    """
    import torch.distributed as dist

    result: Any = None
    error: BaseException | None = None
    if is_main:
        try:
            result = decide()
        except Exception as err:  # re-raised below, once the other ranks have heard of it
            error = err
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, None if error is None else str(error))]
        # torch puts the pickled bytes on the group's device (the current CUDA device under NCCL).
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if error is None and message is not None:
            raise RunDirError(message)
    if error is not None:
        raise error
    return result


# ----------------------------------------------------------------------------------------------
# Training stages (SFT, DPO): where a run starts
# ----------------------------------------------------------------------------------------------


@dataclass
class RunStart:
    """What :func:`start_training_run` decided: continue a checkpoint, or a fresh start."""

    directory: Path
    resume_from: Path | None
    lock: DirLock | None  # held by the main process only
    note: str | None = None  # one line for the log ("starting over: ...")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def start_training_run(
    out: str | os.PathLike,
    stage: str,
    *,
    resume: str,
    overwrite: bool,
    recipe: dict,
    compare: Sequence[str] = ("data", "model", "lora"),
    ignore: Sequence[str] = (),
    is_main: bool = True,
    latest_checkpoint: Callable[[Path], Path | None],
) -> RunStart:
    """Claim and lock ``out`` (main process), decide where the run starts, tell every rank.

    ``recipe`` is the resolved recipe as plain data (``pipeline.config.to_dict``); on ``resume:
    auto`` its ``compare`` sections must equal the saved recipe.yaml's (minus ``ignore`` keys,
    settings of speed only). Raises RunDirError on every rank when the run must not start.
    """
    out = Path(out)
    held: list[DirLock] = []

    def decide() -> tuple[Path | None, str | None]:
        check_ownable(out, stage)  # before anything is created inside a directory that is not ours
        out.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out / LOCK_FILE, what=f"output_dir {out}")
        held.append(lock)
        try:
            claim(out, stage)
            resume_from, note = _starting_point(out, resume=resume, overwrite=overwrite, recipe=recipe,
                                                compare=compare, ignore=ignore,
                                                latest_checkpoint=latest_checkpoint)
            record(out, literal_entries(stage))
        except BaseException:
            lock.release()
            raise
        return resume_from, note

    resume_from, note = on_main_for_all(is_main, decide)
    return RunStart(out, resume_from, held[0] if held else None, note)


def _starting_point(out: Path, *, resume: str, overwrite: bool, recipe: dict, compare: Sequence[str],
                    ignore: Sequence[str], latest_checkpoint) -> tuple[Path | None, str | None]:
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise RunDirError(f"train.resume={resume}: not a checkpoint directory (no state.json there)")
        return path, None
    found = latest_checkpoint(out / "checkpoints")
    finished = (out / "manifest.json").is_file()
    if overwrite:
        removed = remove_written(out)
        return None, (f"train.overwrite_output_dir=true: starting over in {out} (deleted {_listing(removed)})"
                      if removed else None)
    if resume == "auto" and found is not None:
        check_same_run(out / "recipe.yaml", recipe, compare=compare, ignore=ignore)
        return found, None
    if found is not None or finished:
        what = "a finished run" if finished else f"a run with checkpoints up to {found.name}"
        raise RunDirError(
            f"output_dir {out} already holds {what}; pass train.resume=auto to continue it, "
            f"train.overwrite_output_dir=true to start over, or choose another output_dir"
        )
    removed = remove_written(out)
    if removed:
        return None, (f"output_dir {out} holds a run that stopped before its first checkpoint "
                      f"({_listing(removed)}): nothing to resume there, starting over")
    return None, None


def check_same_run(saved_recipe: Path, recipe: dict, *, compare: Sequence[str], ignore: Sequence[str] = ()) -> None:
    """Resuming: the recipe's ``compare`` sections must be those the run was started with."""
    import yaml

    if not saved_recipe.is_file():
        return
    try:
        saved = yaml.safe_load(saved_recipe.read_text()) or {}
    except yaml.YAMLError as err:
        raise RunDirError(f"{saved_recipe}: unreadable ({err}); start over with train.overwrite_output_dir=true") from err
    diffs = []
    for section in compare:
        diffs += config_differences(saved.get(section), recipe.get(section), section, ignore)
    if diffs:
        raise RunDirError(
            f"train.resume=auto: the checkpoints in {saved_recipe.parent} were trained with a different recipe "
            f"({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); pass train.overwrite_output_dir=true "
            "to start over, or choose another output_dir"
        )
