"""Training checkpoints: atomic, pickle-free, resumable to the same loss trajectory.

Layout of ``<output_dir>/checkpoints/step-000120/``:

    model.safetensors       trainable parameters by name (LoRA: the adapters; full FT: every weight)
    optimizer.safetensors   optimizer state tensors, keyed ``<param index>.<state name>``
    rng-rank<r>.safetensors torch CPU (and CUDA) generator states of process r
    state.json              step, data position, scheduler, optimizer hyper-parameters, python RNG

Under DeepSpeed every rank writes what it holds instead of model/optimizer.safetensors
(`save_rank_shard`): ``model-rank<r>.safetensors``, ``optimizer-rank<r>.safetensors`` and
``optimizer-rank<r>.json``; state.json then says ``"deepspeed": true``.

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
from torch import nn

from model.checkpoint import write_json
from pipeline.distributed.parallel import ParallelError

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
    write_json(tmp / STATE_FILE, {**state, "optimizer": opt_meta, "python_rng": python_rng_state()}, sort_keys=True)


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
    plain trainer and the DeepSpeed rank shards (`load_rank_shard` below) load through it."""
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


# ----------------------------------------------------------------------------------------------
# Checkpoints under DeepSpeed: every rank keeps its own shard
# ----------------------------------------------------------------------------------------------
# ZeRO partitions the optimizer state (and under ZeRO-3 the params), and under EP each rank holds
# different experts, so every rank writes what it holds, in safetensors: its trainable params as it
# sees them (ZeRO-3: its partition), the fp32 master partition DeepSpeed steps, and the state of the
# torch optimizer under DeepSpeed. Resuming needs the same launch (world size, EP, ZeRO stage).


def _zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer behind accelerate's wrapper."""
    zero = getattr(optimizer, "optimizer", optimizer)
    if not hasattr(zero, "refresh_fp32_params"):
        raise ParallelError(f"expected a DeepSpeed ZeRO optimizer, got {type(zero).__name__}")
    return zero


def _fp32_partitions(zero) -> list[torch.Tensor]:
    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(zero.single_partition_of_fp32_groups)
    return list(zero.fp32_partitioned_groups_flat)  # ZeRO-3


def _local_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    # ZeRO-3 params are empty placeholders; `ds_tensor` is this rank's partition of each.
    return {n: getattr(p, "ds_tensor", p) for n, p in model.named_parameters() if p.requires_grad}


def save_rank_shard(directory, rank: int, model: nn.Module, optimizer) -> None:
    """model-rank{r}.safetensors + optimizer-rank{r}.safetensors/.json of this rank (every rank calls)."""
    directory = Path(directory)
    zero = _zero_optimizer(optimizer)
    save_file({n: t.detach().contiguous().cpu() for n, t in _local_trainable(model).items()},
              directory / f"model-rank{rank}.safetensors")
    # The torch optimizer's state is keyed by DeepSpeed's fp32 partitions; under ZeRO-3 they are not
    # in its param_groups between steps, so `state_dict()` cannot name them: keyed by partition here.
    tensors, meta = {}, {}
    for i, flat in enumerate(_fp32_partitions(zero)):
        tensors[f"fp32.{i}"] = flat.detach().cpu()
        for key, value in zero.optimizer.state.get(flat, {}).items():
            if torch.is_tensor(value):
                tensors[f"state.{i}.{key}"] = value.detach().cpu()
            else:
                meta.setdefault(str(i), {})[key] = value
    save_file(tensors, directory / f"optimizer-rank{rank}.safetensors")
    (directory / f"optimizer-rank{rank}.json").write_text(json.dumps(meta))


def load_rank_shard(directory, rank: int, model: nn.Module, optimizer) -> None:
    """Inverse of `save_rank_shard`; raises naming the file and what differs."""
    directory = Path(directory)
    files = [f"model-rank{rank}.safetensors", f"optimizer-rank{rank}.safetensors", f"optimizer-rank{rank}.json"]
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {directory} has no {', '.join(missing)}: it was not written by a DeepSpeed run with "
            "this many processes; resume with the launch config and parallel: section that wrote it"
        )
    zero = _zero_optimizer(optimizer)
    copy_saved_tensors(load_file(directory / files[0]), _local_trainable(model), str(directory / files[0]),
                       "resume with the recipe and launch config that wrote it")
    saved_opt = load_file(directory / files[1])
    meta = json.loads((directory / files[2]).read_text())
    for i, flat in enumerate(_fp32_partitions(zero)):
        with torch.no_grad():
            flat.copy_(saved_opt[f"fp32.{i}"])
        prefix = f"state.{i}."
        state = {k.removeprefix(prefix): v.to(flat.device) for k, v in saved_opt.items() if k.startswith(prefix)}
        state.update(meta.get(str(i), {}))
        if state:
            zero.optimizer.state[flat] = state
