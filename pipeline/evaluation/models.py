"""The models an eval compares and the processes it runs on.

    resolve_models   the recipe's `models:` that hold a finished run or a checkpoint (or the random
                     fallback), in order
    load_model_dir   one of them as a plain `Mixtral`: a checkpoint, or a run's base with its adapters
                     merged as export merges them (pipeline/adapter_merge.py)
    build_model      that, on this process's device; under expert parallelism its experts only, their
                     forwards dispatched over the EP group
    Processes        one process, or an `accelerate launch`: rank, world, device and the collectives
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.distributed import parallel
from pipeline.distributed.expert_parallel import ExpertPlacement, install_dispatch, shard_experts
from pipeline.evaluation.recipe import EvalParallelSection, EvalRecipe
from pipeline.run_record import RunRecord, hf_checkpoint_behind, resolve_source


def load_model_dir(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   place: ExpertPlacement | None = None, device: str | torch.device = "cpu"):
    """A plain ``Mixtral`` from a stage output dir (full, or LoRA merged into its base) or an HF dir.

    A LoRA run's records lead back to a base checkpoint and the adapters on it (a DPO run over an
    SFT run over a base: both adapters, in order; `run_record.resolve_source`). They are merged as
    export merges them (`adapter_merge.load_merged`: fp32 on ``device``, one rounding to ``dtype``),
    so at the export's dtype this is the model export writes (bit for bit on the host; on a GPU a
    weight can rarely sit one bf16 step away, where its matrix products round differently); an adapter trained on a
    4-bit base (QLoRA) merges into that base dequantized. ``place``: hold only this rank's experts
    (expert parallelism, more than one rank), read from the checkpoint and the adapters alone;
    ``device``: where the weights go.
    """
    from model.checkpoint import load_pretrained
    from pipeline.adapter_merge import load_merged

    source = resolve_source(path)
    on_meta = None
    if place is not None and place.ep_size > 1:
        def on_meta(model):
            return shard_experts(model, place)
    if source.adapters:
        return load_merged(source, dtype=dtype, device=device, on_meta=on_meta)
    return load_pretrained(source.checkpoint, dtype=dtype, device=device, on_meta=on_meta)


def resolve_models(recipe: EvalRecipe, log=print) -> list[tuple[str, str | None]]:
    """(name, directory) to evaluate; directory None = the random fallback model."""
    found = []
    for name, directory in recipe.models.items():
        path = Path(directory)
        if RunRecord.exists(path) or (path / "config.json").is_file():
            found.append((name, directory))
            continue
        # A run still in progress has its directory but no manifest yet.
        why = "holds no finished run (no manifest.json or config.json)" if path.is_dir() else "does not exist"
        if recipe.missing_models == "error":
            raise FileNotFoundError(f"models.{name}: {directory} {why} (or set missing_models: skip)")
        log(f"eval: models.{name}: {directory} {why}, skipped")
    if not found:
        if recipe.fallback_preset is None:
            raise FileNotFoundError("eval: none of the model directories exist and fallback_preset is null")
        log(f"eval: no trained model found; evaluating a RANDOM-INIT '{recipe.fallback_preset}' model "
            f"(seed {recipe.seed}) — run `make sft` / `make dpo` first for real numbers")
        found.append((f"random-{recipe.fallback_preset}", None))
    return found


def build_model(directory: str | None, recipe: EvalRecipe, device: torch.device, procs: Processes | None = None):
    """The model to evaluate on ``device``; launched with expert parallelism, this process's experts
    only, their forwards dispatched over its EP group (every forward is then a collective)."""
    from model import Mixtral, MixtralConfig

    dtype = getattr(torch, recipe.dtype)
    place = procs.placement(num_experts(directory, recipe)) if procs is not None else None
    sharded_experts = place is not None and place.ep_size > 1
    if directory is None:
        torch.manual_seed(recipe.seed)
        model = Mixtral(MixtralConfig.preset(recipe.fallback_preset)).to(dtype)
        if sharded_experts:
            shard_experts(model, place)  # the same draws on every process, each keeps its experts
    else:
        model = load_model_dir(directory, dtype, place, device)
    model = model.to(device).eval()
    if sharded_experts:
        install_dispatch(model, place, parallel.expert_groups(place.ep_size)[0])
    return model


def num_experts(directory: str | None, recipe: EvalRecipe) -> int:
    """Experts per layer of the model in ``directory`` (its config, before any weight is read)."""
    from model import MixtralConfig

    if directory is None:
        return MixtralConfig.preset(recipe.fallback_preset).num_local_experts
    return MixtralConfig.from_hf(hf_checkpoint_behind(directory) / "config.json").num_local_experts


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Processes:
    """This eval's processes: one, or an `accelerate launch` (rank, world, device, EP placement).

    Every collective of the eval loop goes through here, on the device the process group
    communicates on (the process's GPU under NCCL, the CPU under gloo).
    """

    def __init__(self, section: EvalParallelSection, device_name: str):
        parallel.init_process_state(section.backend, deepspeed=False)
        self.section = section
        self.launched = dist.is_initialized()
        self.rank = dist.get_rank() if self.launched else 0
        self.world = dist.get_world_size() if self.launched else 1
        if self.launched:
            from accelerate import PartialState

            self.device = PartialState().device
        else:
            self.device = pick_device(device_name)
        self.is_main = self.rank == 0

    def placement(self, num_experts: int):
        return parallel.placement(self.section, num_experts)  # validates against the launch

    def barrier(self) -> None:
        if self.launched:
            dist.barrier()

    def gather(self, value) -> list:
        """Every process's ``value`` (any picklable object), in rank order, on every process."""
        if not self.launched:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out
