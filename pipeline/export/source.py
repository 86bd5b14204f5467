"""What to export: a stage output dir's manifests followed back to the base checkpoint and the
adapters to merge on the way, and `BaseReader`, which reads the base's native parameters one at a time."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.checkpoint import hf_to_native, weight_files
from model.config import MixtralConfig
from pipeline.export.recipe import SourceSection
from pipeline.run_record import RunRecord
from pipeline.safetensors_io import (
    READ_CHUNK_BYTES,
    StoredTensor,
    read_into,
    read_safetensors_header,
)


@dataclass
class Source:
    checkpoint: Path  # HF dir: config.json + safetensors (per-expert or fused names)
    adapters: list[Path]  # PEFT dirs, merged in order
    manifests: list[dict]  # stage manifests, oldest first (for the model card)
    # adapter dir -> its stage's `quantization` ({"type": "nf4", "dtype": ...}): trained on a 4-bit base
    quantized: dict[str, dict] = field(default_factory=dict)


def _is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def resolve_source(path: str | os.PathLike) -> Source:
    """Follow manifests back to an HF checkpoint; collect the adapters to merge on the way.

    Reads ``kind`` ("lora" or "full"), ``base.checkpoint`` (an HF dir or another stage dir),
    ``base.adapters`` (adapters already under the base, optional), ``adapter_dir`` / ``model_dir``.
    """
    path = Path(path)
    if not RunRecord.exists(path):
        if _is_hf_checkpoint(path):
            return Source(path, [], [])
        if any(path.glob("model-rank*.safetensors")):
            raise ValueError(
                f"{path}: per-rank ZeRO/EP checkpoint shards (model-rank*.safetensors) are for resuming; "
                "export the finished stage output dir (its manifest.json names the gathered adapter or model)"
            )
        if (path / "adapter_config.json").is_file():
            raise ValueError(
                f"{path}: a PEFT adapter without manifest.json; set source.checkpoint to its base model "
                f"and source.adapters=[{str(path)!r}]"
            )
        raise FileNotFoundError(
            f"{path}: neither a stage output dir (manifest.json) nor an HF checkpoint (config.json + "
            "model*.safetensors); set source.run_dir or source.checkpoint"
        )
    record = RunRecord.read(path)
    if record.kind == "full":
        if not _is_hf_checkpoint(record.model_dir):
            raise FileNotFoundError(f"{record.path}: kind 'full' but {record.model_dir} holds no HF checkpoint")
        return Source(record.model_dir, [], [record.fields])
    parent = resolve_source(record.base_checkpoint)
    adapter = record.adapter_dir
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{record.path}: adapter dir {adapter} has no adapter_config.json")
    quantized = dict(parent.quantized)
    if record.quantization:
        quantized[str(adapter)] = record.quantization
    return Source(parent.checkpoint, parent.adapters + record.base_adapters + [adapter],
                  parent.manifests + [record.fields], quantized)


def source_from_recipe(section: SourceSection) -> Source:
    if section.run_dir is not None:
        source = resolve_source(section.run_dir)
        if section.checkpoint is not None:
            source = Source(Path(section.checkpoint), source.adapters, source.manifests, source.quantized)
    else:
        source = Source(Path(section.checkpoint), [], [])
    if not _is_hf_checkpoint(source.checkpoint):
        raise FileNotFoundError(f"source.checkpoint: {source.checkpoint} is not an HF checkpoint dir")
    return Source(source.checkpoint, source.adapters + [Path(a) for a in section.adapters], source.manifests,
                  source.quantized)


class BaseReader:
    """Native parameters of an HF checkpoint (per-expert or fused names), read one at a time in fp32.

    ``read`` returns a view of one reused fp32 buffer (the next ``read`` overwrites it): reusing memory
    whose pages are already mapped is what makes the copy cheap (see read_safetensors_header). Close
    it (or use it as a context manager) to release the file descriptors.
    """

    def __init__(self, checkpoint: Path, config: MixtralConfig):
        self.dir = checkpoint
        self.config = config
        files = weight_files(checkpoint)
        self.pieces: dict[str, list[tuple[str, str, object, StoredTensor]]] = defaultdict(list)
        for file in files:
            for hf_name, stored in read_safetensors_header(checkpoint / file).items():
                target = hf_to_native(hf_name, where=str(checkpoint / file))
                self.pieces[target.native].append((file, hf_name, target, stored))
        self._fds: dict[str, int] = {}
        self._buffer = torch.empty(0, dtype=torch.float32)  # grows to the largest parameter read
        self._staging = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> BaseReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return self._fds[file]

    def read(self, native: str, shape: torch.Size) -> torch.Tensor:
        pieces = self.pieces.get(native)
        if not pieces:
            raise ValueError(
                f"{self.dir}: no tensor for {native} (the checkpoint and its config.json disagree)"
            )
        numel = math.prod(shape)
        if self._buffer.numel() < numel:
            self._buffer = torch.empty(0)  # free the old buffer before allocating the new one
            self._buffer = torch.empty(numel, dtype=torch.float32)
        if not self._staging.numel():
            self._staging = torch.empty(READ_CHUNK_BYTES, dtype=torch.uint8)
        out = self._buffer[:numel].view(shape)
        ffn = self.config.intermediate_size
        filled = set()
        for file, hf_name, target, stored in pieces:
            if target.piece in ("all", "stack"):
                dest, key = out, (target.piece, None)
            else:
                if target.expert >= shape[0]:
                    raise ValueError(
                        f"{self.dir / file}: {hf_name} is for expert {target.expert}, config.json has {shape[0]}"
                    )
                dest = {
                    "w1": out[target.expert, :ffn],
                    "w3": out[target.expert, ffn:],
                    "w2": out[target.expert],
                }[target.piece]
                key = (target.piece, target.expert)
            if tuple(dest.shape) != stored.shape:
                raise ValueError(
                    f"{self.dir / file}: {hf_name} has shape {list(stored.shape)}, config.json implies "
                    f"{list(dest.shape)}"
                )
            if key in filled:
                raise ValueError(f"{self.dir / file}: {hf_name} fills {native} {key} a second time")
            filled.add(key)
            read_into(self._fd(file), stored, dest, self._staging, f"{self.dir / file}: {hf_name}")
        expected = self._expected_keys(native, shape)
        if expected - filled and not any(k[0] in ("all", "stack") for k in filled):
            missing = sorted(expected - filled)
            raise ValueError(f"{self.dir}: checkpoint is missing {native} pieces {missing[:4]}")
        return out

    @staticmethod
    def _expected_keys(native: str, shape: torch.Size) -> set:
        if native.endswith("experts.gate_up_proj"):
            return {(p, e) for e in range(shape[0]) for p in ("w1", "w3")}
        if native.endswith("experts.down_proj"):
            return {("w2", e) for e in range(shape[0])}
        return {("all", None)}
