"""Training checkpoints: atomic, pickle-free, resumable to the same loss trajectory.

Layout of ``<output_dir>/checkpoints/step-000120/``:

    model.safetensors       trainable parameters by name (LoRA: the adapters; full FT: every weight)
    optimizer.safetensors   optimizer state tensors, keyed ``<param index>.<state name>``
    rng-rank<r>.safetensors torch CPU (and CUDA) generator states of process r
    state.json              step, data position, scheduler, optimizer hyper-parameters, python RNG

A checkpoint is written into ``.tmp-step-000120`` and renamed when complete, so a directory named
``step-*`` is always whole; a run killed while saving leaves only a ``.tmp-*`` that is ignored and
cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def begin_checkpoint(root: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (every process writes into it)."""
    tmp = Path(root) / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, keep_last: int) -> Path:
    """Rename the finished temporary directory into place and keep only the newest ``keep_last``."""
    final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for stale in list_checkpoints(final.parent)[:-keep_last]:
        shutil.rmtree(stale)
    for leftover in final.parent.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Optimizer state <-> safetensors + JSON
# ----------------------------------------------------------------------------------------------


def optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, per_param in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(per_param)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return tensors


def set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(state: list) -> None:
    version, internal, gauss = state
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------
# Whole checkpoints
# ----------------------------------------------------------------------------------------------


def save_main_files(
    tmp: Path,
    *,
    model_tensors: dict[str, torch.Tensor],
    optimizer_state: dict,
    state: dict,
) -> None:
    """What the main process writes: trainable weights, optimizer, and the JSON state (last)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in model_tensors.items()}, tmp / "model.safetensors")
    opt_tensors, opt_meta = optimizer_to_flat(optimizer_state)
    save_file({k: v.cpu() for k, v in opt_tensors.items()}, tmp / "optimizer.safetensors")
    write_json(tmp / STATE_FILE, {**state, "optimizer": opt_meta, "python_rng": python_rng_state()})


def save_rank_files(tmp: Path, rank: int) -> None:
    save_file(rng_tensors(), tmp / f"rng-rank{rank}.safetensors")


def load_checkpoint(path: str | os.PathLike, rank: int = 0) -> dict[str, Any]:
    """Everything a resume needs, read back without pickle; raises naming what is missing."""
    path = Path(path)
    needed = ["model.safetensors", "optimizer.safetensors", STATE_FILE, f"rng-rank{rank}.safetensors"]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {path} is incomplete (missing {', '.join(missing)}); resume from an older "
            f"step-* directory or start fresh with train.resume=never"
        )
    state = json.loads((path / STATE_FILE).read_text())
    return {
        "model": load_file(path / "model.safetensors"),
        "optimizer": optimizer_from_flat(load_file(path / "optimizer.safetensors"), state.pop("optimizer")),
        "rng": load_file(path / f"rng-rank{rank}.safetensors"),
        "python_rng": state.pop("python_rng"),
        "state": state,
    }


def copy_saved_tensors(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], where: str, hint: str) -> None:
    """Copy a checkpoint's tensors into the run's tensors of the same names, in place (no autograd).

    Refuses a checkpoint whose names or shapes are not the run's (`copy_` would broadcast some shapes
    silently), naming `where` (the file) and what differs; `hint` says how to resume instead. The
    plain trainer and the DeepSpeed rank shards (pipeline/distributed/parallel.py) load through it."""
    missing, unexpected = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or unexpected:
        raise ValueError(f"{where} does not match this run's trainable tensors (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): {hint}")
    for name, tensor in live.items():
        if saved[name].shape != tensor.shape:
            raise ValueError(f"{where}: {name} is {tuple(saved[name].shape)}, this run holds "
                             f"{tuple(tensor.shape)}: {hint}")
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(saved[name])
