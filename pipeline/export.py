"""Export a fine-tuned Mixtral in the Mixtral-8x7B-Instruct-v0.1 layout, verified.

    python -m pipeline.export recipes/tiny/export.yaml [key=value ...]          # make export
    python -m pipeline.export recipes/tiny/export.yaml source.run_dir=outputs/tiny/sft \\
        export.dtype=float32 export.format=consolidated output_dir=outputs/tiny/export-mistral

Input (``source``): a stage output dir with ``manifest.json`` (SFT/DPO, LoRA or full; chains of
LoRA stages are followed back to the base checkpoint), or an HF checkpoint dir, plus optional extra
PEFT adapter dirs. Output (``output_dir``), by ``export.format``:

    hf            config.json  generation_config.json  model-0000k-of-0000n.safetensors
                  model.safetensors.index.json  tokenizer.model  tokenizer.json
                  tokenizer_config.json  special_tokens_map.json  README.md
    consolidated  params.json  consolidated.safetensors  tokenizer.model  README.md
                  (mistral-inference names, q/k rows permuted back to interleaved RoPE pairs)
    adapter       adapter_config.json  adapter_model.safetensors  tokenizer files  README.md
                  (PEFT LoRA for transformers' MixtralForCausalLM: `PeftModel.from_pretrained(
                  MixtralForCausalLM.from_pretrained(base), output_dir)`; see `adapter_export`)

Steps: 1. resolve the source to a base checkpoint and the adapters to merge; 2. plan every output
tensor and shard from shapes alone; 3. stream: read one native parameter, add every adapter's LoRA
delta in fp32, cast, append its HF tensors to the open shard file; 4. tokenizer, configs, model
card; 5. verify (transformers reload, names/shapes/dtypes, logits against our model); 6. rename the
temporary dir into place. Peak memory is about one native parameter in fp32 plus two of the largest
output tensors (the write thread's buffers), never a shard or the model, so an 8x7B export needs a
few GB. Reading, merging and converting overlap the writes and fsyncs (see ShardWriter).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from model.checkpoint import (
    NAME_TABLE,
    hf_tensors,
    hf_to_native,
    make_readable,
    new_temp_dir,
    parse_size,
    publish_dir,
)
from model.config import MixtralConfig
from pipeline.config import RecipeError, build, load_recipe_dict, parse_cli, save_recipe, to_dict
from pipeline.rundir import acquire_lock, check_ownable, remove_stale_siblings, sibling_lock_path
from pipeline.safetensors_io import (
    READ_CHUNK_BYTES,
    ST_DTYPES,
    StoredTensor,
    read_into,
    read_safetensors_header,
)

# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


@dataclass
class SourceSection:
    # A stage output dir with manifest.json (SFT or DPO result), or an HF Mixtral checkpoint dir.
    run_dir: str | None = None
    # HF checkpoint dir to merge onto; overrides the base that the manifest names.
    checkpoint: str | None = None
    # Extra PEFT adapter dirs, merged in this order after those the manifests name.
    adapters: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.run_dir is None and self.checkpoint is None:
            raise ValueError(
                "set source.run_dir (a stage output dir) or source.checkpoint (an HF checkpoint dir)"
            )


@dataclass
class ExportSection:
    format: Literal["hf", "consolidated", "adapter"] = "hf"
    # Weights are merged in float32, then cast to this dtype. format=adapter keeps the LoRA factors
    # in float32 (they are small, and PEFT casts the delta to the base weights' dtype itself).
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    max_shard_size: str = "5GB"
    # A non-empty output_dir is refused unless this is true (it is then replaced atomically). A
    # directory holding anything the export does not write is refused either way.
    overwrite: bool = False
    progress_bar: bool = True
    # How the base model is named in shipped files (adapter_config.json's base_model_name_or_path,
    # the model card), e.g. "mistralai/Mixtral-8x7B-v0.1"; null: the base checkpoint dir's name
    # (never a path of this machine).
    base_model_name: str | None = None

    def __post_init__(self):
        parse_size(self.max_shard_size)


@dataclass
class VerifySection:
    enabled: bool = True
    # Reload with transformers and compare logits only for models up to this many parameters.
    max_params: int = 2_000_000_000
    # Largest allowed max |logit difference| against our model (both computed in fp32 from the
    # exported weights, so the dtype cast does not count).
    atol: float = 1e-4
    prompts: list[str] = field(
        default_factory=lambda: [
            "Explain Machine Learning to me in a nutshell.",
            "Write a haiku about experts that route tokens.",
            "  Leading spaces,   runs of spaces, and unicode: 日本語 🎉",
        ]
    )


@dataclass
class TokenizerSection:
    # SentencePiece tokenizer.model; null: mistral_common's tokenizer.model.v1 (Mixtral's).
    spm_path: str | None = None


@dataclass
class ExportRecipe:
    source: SourceSection
    output_dir: str
    export: ExportSection = field(default_factory=ExportSection)
    verify: VerifySection = field(default_factory=VerifySection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    # Model card fields.
    model_name: str = "Mixtral-8x7B-Instruct (fine-tuned)"


# ----------------------------------------------------------------------------------------------
# 1. Source: base checkpoint + adapters
# ----------------------------------------------------------------------------------------------


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


def _manifest_path(value: str, manifest_dir: Path) -> Path:
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    return manifest_dir / path


def resolve_source(path: str | os.PathLike) -> Source:
    """Follow manifests back to an HF checkpoint; collect the adapters to merge on the way.

    Reads ``kind`` ("lora" or "full"), ``base.checkpoint`` (an HF dir or another stage dir),
    ``base.adapters`` (adapters already under the base, optional), ``adapter_dir`` / ``model_dir``.
    """
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
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
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_file}: not valid JSON ({err})") from None
    kind = manifest.get("kind")
    if kind == "full":
        model_dir = _manifest_path(manifest.get("model_dir", str(path)), path)
        if not _is_hf_checkpoint(model_dir):
            raise FileNotFoundError(f"{manifest_file}: kind 'full' but {model_dir} holds no HF checkpoint")
        return Source(model_dir, [], [manifest])
    if kind != "lora":
        raise ValueError(f"{manifest_file}: field 'kind' must be 'lora' or 'full', got {kind!r}")
    base = manifest.get("base")
    base_dir = base.get("checkpoint") if isinstance(base, dict) else base
    if not base_dir:
        raise ValueError(
            f"{manifest_file}: field 'base.checkpoint' (the model the adapter was trained on) is missing"
        )
    parent = resolve_source(_manifest_path(base_dir, path))
    extra = [_manifest_path(a, path) for a in (base.get("adapters") or [])] if isinstance(base, dict) else []
    adapter = _manifest_path(manifest.get("adapter_dir", str(path)), path)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{manifest_file}: adapter dir {adapter} has no adapter_config.json")
    quantized = dict(parent.quantized)
    if manifest.get("quantization"):
        quantized[str(adapter)] = manifest["quantization"]
    return Source(parent.checkpoint, parent.adapters + extra + [adapter], parent.manifests + [manifest], quantized)


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


# ----------------------------------------------------------------------------------------------
# 2-3. Reading native parameters and merging LoRA, one parameter at a time
# ----------------------------------------------------------------------------------------------


class BaseReader:
    """Native parameters of an HF checkpoint (per-expert or fused names), read one at a time in fp32.

    ``read`` returns a view of one reused fp32 buffer (the next ``read`` overwrites it): reusing memory
    whose pages are already mapped is what makes the copy cheap (see read_safetensors_header). Close
    it (or use it as a context manager) to release the file descriptors.
    """

    def __init__(self, checkpoint: Path, config: MixtralConfig):
        self.dir = checkpoint
        self.config = config
        index = checkpoint / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else ["model.safetensors"]
        )
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


_PEFT_PREFIX = "base_model.model."
_EXPERT_LORA = re.compile(r"^(?P<module>.+\.experts)\.lora_(?P<which>gate_up|down)_(?P<ab>[AB])$")
_LINEAR_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@dataclass
class Adapter:
    """One PEFT adapter's tensors, grouped by the native parameter they change."""

    dir: Path
    scale: float
    deltas: dict[str, dict[str, str]]  # native param -> {"A"/"B" or "gate_up_A"...: adapter key}
    replacements: dict[str, str]  # native param -> adapter key (modules_to_save)
    # QLoRA: the stage's {"type": "nf4", "dtype": ...}; the adapter trained on the 4-bit base, so it
    # merges into that base dequantized (the standard QLoRA merge): see `merged_native_params`.
    base_quantization: dict | None = None

    @classmethod
    def open(cls, adapter_dir: str | os.PathLike) -> Adapter:
        adapter_dir = Path(adapter_dir)
        config_file = adapter_dir / "adapter_config.json"
        weights = adapter_dir / "adapter_model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"{adapter_dir}: a PEFT adapter needs adapter_config.json and adapter_model.safetensors "
                "(pickle adapter_model.bin is not read)"
            )
        config = json.loads(config_file.read_text())
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise ValueError(
                    f"{config_file}: '{key}' is not supported by the export; train with one r and alpha"
                )
        if config.get("use_dora"):
            raise ValueError(f"{config_file}: DoRA adapters are not supported by the export")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(
                f"{config_file}: peft_type {config.get('peft_type')!r}; only LORA adapters merge"
            )
        r, alpha = config["r"], config["lora_alpha"]
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        deltas: dict[str, dict[str, str]] = defaultdict(dict)
        replacements = {}
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            if not key.startswith(_PEFT_PREFIX):
                raise ValueError(
                    f"{weights}: tensor {key!r} does not start with {_PEFT_PREFIX!r}; not a PEFT adapter"
                )
            name = key[len(_PEFT_PREFIX) :]
            if m := _EXPERT_LORA.match(name):
                native = m["module"] + (".gate_up_proj" if m["which"] == "gate_up" else ".down_proj")
                deltas[native][f"{m['which']}_{m['ab']}"] = key
            elif m := _LINEAR_LORA.match(name):
                deltas[m["module"] + ".weight"][m["ab"]] = key
            elif "lora_" in name:
                raise ValueError(
                    f"{weights}: unsupported LoRA tensor {key!r} (only linear and expert LoRA merge)"
                )
            else:
                replacements[name] = key
        for native, parts in deltas.items():
            need = (
                {"gate_up_A", "gate_up_B"}
                if native.endswith("gate_up_proj")
                else ({"down_A", "down_B"} if native.endswith("experts.down_proj") else {"A", "B"})
            )
            if set(parts) != need:
                raise ValueError(
                    f"{weights}: {native} has LoRA tensors {sorted(parts)}, expected {sorted(need)}"
                )
        return cls(adapter_dir, scale, dict(deltas), replacements)

    def apply(self, native: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (fp32) with this adapter's replacement and LoRA delta, in place where possible."""
        replacement = self.replacement(native)
        if replacement is not None:
            if replacement.shape != weight.shape:
                raise ValueError(
                    f"{self.dir / 'adapter_model.safetensors'}: {self.replacements[native]} has shape "
                    f"{list(replacement.shape)}, the base {native} {list(weight.shape)}"
                )
            weight = replacement
        parts = self.lora_parts(native)
        if parts:
            add_lora_delta(weight, parts, self.scale)
        return weight

    def replacement(self, native: str) -> torch.Tensor | None:
        """The fully trained copy of ``native`` (modules_to_save, e.g. the router), fp32, or None."""
        if native not in self.replacements:
            return None
        with safe_open(str(self.dir / "adapter_model.safetensors"), framework="pt") as f:
            return f.get_tensor(self.replacements[native]).float()

    def lora_parts(self, native: str) -> dict[str, torch.Tensor]:
        """This adapter's LoRA tensors on ``native`` in fp32 ({} if none), keyed as in ``deltas``."""
        keys = self.deltas.get(native, {})
        if not keys:
            return {}
        with safe_open(str(self.dir / "adapter_model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(v).float() for k, v in keys.items()}

    def natives(self) -> set[str]:
        return set(self.deltas) | set(self.replacements)


def add_lora_delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], scale: float) -> None:
    """weight += scale * B @ A, per expert for the stacked expert adapters (model/lora.py layout)."""
    if "A" in parts:
        weight.addmm_(parts["B"], parts["A"], alpha=scale)  # [out, R] @ [R, in]
    elif "gate_up_A" in parts:
        a, b = parts["gate_up_A"], parts["gate_up_B"]  # [E, 2R, H], [E, 2F, R]
        r, f = a.shape[1] // 2, b.shape[1] // 2
        for e in range(weight.shape[0]):  # one expert at a time: no [E, 2F, H] temporary
            weight[e, :f].addmm_(b[e, :f], a[e, :r], alpha=scale)  # w1
            weight[e, f:].addmm_(b[e, f:], a[e, r:], alpha=scale)  # w3
    else:
        a, b = parts["down_A"], parts["down_B"]  # [E, R, F], [E, H, R]
        for e in range(weight.shape[0]):
            weight[e].addmm_(b[e], a[e], alpha=scale)


def meta_state(config: MixtralConfig) -> dict[str, torch.Tensor]:
    """The native parameters' names and shapes, without memory."""
    from model.transformer import Mixtral

    with torch.device("meta"):  # Mixtral initialises nothing there
        return Mixtral(config).state_dict()


def check_adapters(adapters: list[Adapter], shapes: dict[str, torch.Tensor]) -> None:
    """Every adapter tensor names a model parameter and covers all of its experts."""
    for adapter in adapters:
        unused = adapter.natives() - set(shapes)
        if unused:
            raise ValueError(
                f"{adapter.dir}: adapter tensors for parameters the model does not have: {sorted(unused)[:4]}"
            )
        weights = adapter.dir / "adapter_model.safetensors"
        with safe_open(str(weights), framework="pt") as f:
            for native, keys in adapter.deltas.items():
                if not native.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    continue
                n_experts = shapes[native].shape[0]
                for key in keys.values():
                    held = f.get_slice(key).get_shape()[0]
                    if held != n_experts:
                        raise ValueError(
                            f"{weights}: {key} holds {held} experts, the model {n_experts}: an expert-parallel "
                            "rank's part, not the gathered adapter the stage writes at the end of a run"
                        )


def merged_native_params(
    reader: BaseReader, adapters: list[Adapter], shapes: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(native name, merged fp32 tensor), one parameter at a time, in model order. The tensor may be
    the reader's reused buffer: use it before asking for the next one."""
    check_adapters(adapters, shapes)
    from model.quant import is_quantized_name

    quantizable = {n for n in shapes if is_quantized_name(n)}
    for native, meta in shapes.items():
        weight = reader.read(native, meta.shape)
        for adapter in adapters:
            weight = quantized_base(native, weight, adapter.base_quantization, quantizable)
            weight = adapter.apply(native, weight)
        yield native, weight


def quantized_base(native: str, weight: torch.Tensor, quantization: dict | None, quantizable: set[str]) -> torch.Tensor:
    """``weight`` (fp32) as a stage with ``quantization`` held it: cast to its dtype, NF4 and back."""
    if quantization is None or native not in quantizable:
        return weight
    from model import quant

    return quant.nf4_round_trip(weight, getattr(torch, quantization["dtype"]))


# ----------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ----------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    nbytes: int


def plan_shards(entries: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in order: a new shard when the next tensor would pass the limit (as transformers does)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(n: int, prefix: str = "model") -> list[str]:
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


class _Slot:
    """A reused output buffer and the background write that is still reading it (None when free)."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.pending: Future | None = None

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises the write's error here


class ShardWriter:
    """Writes planned safetensors files tensor by tensor: the header comes from the plan, so no
    shard is ever held in memory. Tensors must arrive in plan order.

    ``write`` converts the tensor into one of two reused buffers and returns; a background thread
    appends it to the file, so reading and merging the next parameter overlaps the write of this one,
    and a finished file is fsynced (once) by a second thread while the next one is written. Memory:
    two buffers of the largest output tensor. Use as a context manager, so that an error stops the
    threads and closes the files before the caller removes the directory.
    """

    def __init__(
        self, out_dir: Path, shards: list[list[TensorPlan]], dtype: torch.dtype, prefix: str = "model"
    ):
        self.out_dir, self.shards, self.dtype = out_dir, shards, dtype
        self.files = shard_file_names(len(shards), prefix)
        self.order = [(k, entry) for k, shard in enumerate(shards) for entry in shard]
        self.position = 0
        self._slots = (_Slot(), _Slot())
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="export-write")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="export-fsync")
        self._syncs: list[tuple[Future, object]] = []  # (fsync job, its file)
        # Touched by the write thread only (and by finish/close once it is idle).
        self.handle = None
        self.open_shard = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _header(self, shard: list[TensorPlan]) -> bytes:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for entry in shard:
            header[entry.name] = {
                "dtype": ST_DTYPES[self.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        return len(raw).to_bytes(8, "little") + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.position >= len(self.order):
            raise RuntimeError(f"ShardWriter: {name} arrives after every planned tensor was written")
        k, entry = self.order[self.position]
        if entry.name != name or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(
                f"ShardWriter: expected {entry.name} {list(entry.shape)}, got {name} {list(tensor.shape)}"
            )
        if entry.nbytes != tensor.numel() * self.dtype.itemsize:
            raise RuntimeError(
                f"ShardWriter: {name} plans {entry.nbytes} bytes, not {self.dtype} {list(entry.shape)}"
            )
        slot = self._slots[self.position % 2]
        slot.wait()
        if slot.buffer.numel() < entry.nbytes:
            slot.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            slot.buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        data = slot.buffer[: entry.nbytes]  # [nbytes] uint8
        data.view(self.dtype).view(tensor.shape).copy_(tensor.detach())  # same rounding as .to(dtype)
        slot.pending = self._writer.submit(self._append, k, memoryview(data.numpy()))
        self.position += 1

    def _append(self, k: int, data: memoryview) -> None:
        """Write thread: open shard k (handing the previous file to the fsync thread), append data."""
        if k != self.open_shard:
            self._hand_off()
            self.handle = open(self.out_dir / self.files[k], "wb")  # noqa: SIM115 (closed in _sync_close)
            self.handle.write(self._header(self.shards[k]))
            self.open_shard = k
        self.handle.write(data)

    def _hand_off(self) -> None:
        if self.handle is not None:
            self._syncs.append((self._syncer.submit(_sync_close, self.handle), self.handle))
            self.handle = None

    def finish(self) -> dict:
        """Wait for every write, fsync and close every file; returns the index
        ({"metadata": {"total_size"}, "weight_map"})."""
        for slot in self._slots:
            slot.wait()
        self._writer.submit(self._hand_off).result()
        for sync, _ in self._syncs:
            sync.result()
        self.close()
        if self.position != len(self.order):
            raise RuntimeError(
                f"ShardWriter: {len(self.order) - self.position} planned tensors were never written"
            )
        return {
            "metadata": {"total_size": sum(e.nbytes for _, e in self.order)},
            "weight_map": {e.name: self.files[k] for k, e in self.order},
        }

    def close(self) -> None:
        """Stop the threads (queued writes and fsyncs are dropped) and close every file. Idempotent."""
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._syncer.shutdown(wait=True, cancel_futures=True)
        for _, handle in self._syncs:
            handle.close()
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _sync_close(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


# ----------------------------------------------------------------------------------------------
# Output formats
# ----------------------------------------------------------------------------------------------


def hf_plan(shapes: dict[str, torch.Tensor], dtype: torch.dtype) -> list[TensorPlan]:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [TensorPlan(n, tuple(t.shape), t.numel() * itemsize) for n, t in hf_tensors(shapes)]


def generation_config(config: MixtralConfig) -> dict:
    return {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "transformers_version": "4.36.0.dev0",
    }


# HF per-expert names -> mistral-inference consolidated names (FORMATS.md section 4). A different
# format, not a second HF<->native table: it maps names that model/checkpoint.py produced.
CONSOLIDATED_NAMES: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.feed_forward.gate.weight"),
    (
        r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight",
        r"layers.\1.feed_forward.experts.\2.\3.weight",
    ),
)


def consolidated_name(hf_name: str) -> str:
    for pattern, replacement in CONSOLIDATED_NAMES:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, replacement, hf_name)
    raise ValueError(f"consolidated export: no mistral-inference name for {hf_name!r}")


def hf_to_interleaved_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from HF's rotate_half order (j, j + hd/2) back to interleaved pairs (2j, 2j + 1).

    Inverse of transformers' convert_mixtral_weights_to_hf permute (FORMATS.md section 5).
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    # [n_heads, 2, hd/2, cols] -> [n_heads, hd/2, 2, cols]: row (half h, index j) goes to 2j + h
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def params_json(config: MixtralConfig) -> dict:
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "moe": {"num_experts_per_tok": config.num_experts_per_tok, "num_experts": config.num_local_experts},
    }
    if config.sliding_window is not None:
        params["sliding_window"] = config.sliding_window
    return params


def consolidated_tensor(
    hf_name: str, tensor: torch.Tensor, config: MixtralConfig
) -> tuple[str, torch.Tensor]:
    if hf_name.endswith("self_attn.q_proj.weight"):
        tensor = hf_to_interleaved_rope(tensor, config.num_attention_heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        tensor = hf_to_interleaved_rope(tensor, config.num_key_value_heads)
    return consolidated_name(hf_name), tensor


# ----------------------------------------------------------------------------------------------
# format=adapter: our LoRA as a PEFT adapter for transformers' MixtralForCausalLM
# ----------------------------------------------------------------------------------------------
#
# transformers 5 holds the experts fused ([E, 2F, H] gate_up_proj, [E, H, F] down_proj) and PEFT
# reaches them with target_parameters (ParamWrapper): per expert e its delta is
# scaling * B_e @ A_e with lora_A [E*r, in] (rows expert-major) and lora_B [out, r*E] (column
# j*E + e). Our separate w1/w3 LoRA (rank R each) is one rank-2R LoRA on gate_up_proj whose B_e is
# block-diagonal, so the conversion is exact. Stacked adapters (DPO trained on the SFT-merged model)
# add their deltas, so they concatenate along the rank: A = [A_1; A_2], B = [s_1 B_1 | s_2 B_2] / s_1,
# scaling s_1; rank_pattern/alpha_pattern carry each module's rank and scaling.

_LAYER = re.compile(r"^layers\.(\d+)\.")
ADAPTER_TARGET_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def transformers_name(native: str) -> str:
    """Name of a native parameter in transformers 5's MixtralForCausalLM, from model/checkpoint.py's
    NAME_TABLE: the whole-tensor rules; the fused read aliases (``mlp.gate``, ``mlp.experts.*``) are
    transformers 5's module names, the per-expert ones only its file layout, so aliases win."""
    match = _LAYER.match(native)
    layer = match[1] if match else None
    found = [
        rule
        for rule in NAME_TABLE
        if rule.piece in ("all", "stack") and rule.native.format(i=layer) == native
    ]
    if not found:
        raise ValueError(f"format=adapter: {native} has no whole-tensor name in NAME_TABLE")
    rule = min(found, key=lambda r: r.export)  # export=False (the alias) first
    return rule.hf.format(i=layer)


def lora_factors(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's LoRA on one parameter as per-expert factors, unscaled: A [E, r, in], B [E, out, r]
    (E = 1 for a linear layer), so that delta[e] = scale * B[e] @ A[e]."""
    if "A" in parts:
        return parts["A"][None], parts["B"][None]  # [1, r, in], [1, out, r]
    if "down_A" in parts:
        return parts["down_A"], parts["down_B"]  # [E, R, F], [E, H, R]
    a, b = parts["gate_up_A"], parts["gate_up_B"]  # [E, 2R, H], [E, 2F, R]
    n_experts, two_ffn, r = b.shape
    ffn = two_ffn // 2
    block = b.new_zeros(n_experts, two_ffn, 2 * r)  # [E, 2F, 2R]: w1 rows see A_w1, w3 rows A_w3
    block[:, :ffn, :r] = b[:, :ffn]
    block[:, ffn:, r:] = b[:, ffn:]
    return a, block


def to_peft_param_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert A [E, r, in], B [E, out, r] -> ParamWrapper's lora_A [E*r, in], lora_B [out, r*E]."""
    n_experts, r, fan_in = a.shape
    lora_a = a.reshape(n_experts * r, fan_in)  # row e*r + j
    lora_b = b.permute(1, 2, 0).reshape(b.shape[1], r * n_experts)  # [out, r, E] -> column j*E + e
    return lora_a, lora_b


def _module_kind(hf_module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: the key rank/alpha patterns use."""
    return re.sub(r"^model\.layers\.\d+\.", "", hf_module)


def peft_adapter(
    adapters: list[Adapter], shapes: dict[str, torch.Tensor], base: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """The stacked adapters as one PEFT adapter for transformers' Mixtral: (tensors, LoraConfig kwargs)."""
    if not adapters:
        raise ValueError(
            "export.format=adapter needs a LoRA source (a LoRA stage dir or source.adapters); "
            "this source is a full model: use format=hf"
        )
    check_adapters(adapters, shapes)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, set[tuple[int, float]]] = defaultdict(set)
    saved_modules = set()
    for native in shapes:
        owners = [a for a in adapters if native in a.natives()]
        if not owners:
            continue
        hf = transformers_name(native)
        if any(native in a.replacements for a in owners):
            if any(native in a.deltas for a in owners):
                raise ValueError(
                    f"format=adapter: {native} is both fully trained and LoRA-adapted across "
                    f"{[str(a.dir) for a in owners]}; PEFT cannot hold both: export format=hf"
                )
            last = [a for a in owners if native in a.replacements][-1]
            tensors[_PEFT_PREFIX + hf] = last.replacement(native)
            saved_modules.add(_module_kind(hf.rpartition(".")[0]))
            continue
        factors = [(*lora_factors(a.lora_parts(native)), a.scale) for a in owners]
        scale = factors[0][2]
        a = torch.cat([f[0] for f in factors], dim=1)  # [E, r_total, in]
        b = torch.cat([f[1] * (f[2] / scale) for f in factors], dim=2)  # [E, out, r_total]
        if native.endswith("experts.gate_up_proj") or native.endswith("experts.down_proj"):
            lora_a, lora_b = to_peft_param_layout(a, b)
            # PEFT wraps a module's targeted parameters in registration order: gate_up_proj (registered
            # first in MixtralExperts) is the inner ParamWrapper, saved under base_layer.
            module = hf.rpartition(".")[0] + (".base_layer" if native.endswith("gate_up_proj") else "")
            kind = _module_kind(hf)
        else:
            lora_a, lora_b = a[0], b[0]
            module = hf.removesuffix(".weight")
            kind = _module_kind(module)
        tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = lora_b.contiguous()
        r = a.shape[1]
        ranks[kind].add((r, scale * r))  # alpha = scale * r keeps PEFT's alpha / r == scale
    mixed = {k: sorted(v) for k, v in ranks.items() if len(v) > 1}
    if mixed:
        raise ValueError(f"format=adapter: ranks/scalings differ across layers for {mixed}; export format=hf")
    per_kind = {k: next(iter(v)) for k, v in ranks.items()}
    counts = defaultdict(int)
    for value in per_kind.values():
        counts[value] += 1
    r, alpha = max(counts, key=counts.get)
    # PEFT 0.21 warns that a target_parameters key in rank_pattern "did not match any targeted module":
    # its check looks at module names only; the rank does apply (the verification loads the shapes).
    config = {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {k: v[0] for k, v in per_kind.items() if v[0] != r},
        "alpha_pattern": {k: v[1] for k, v in per_kind.items() if v[1] != alpha},
        "target_modules": sorted(k for k in per_kind if k not in ADAPTER_TARGET_PARAMETERS),
        "target_parameters": [k for k in ADAPTER_TARGET_PARAMETERS if k in per_kind],
        "modules_to_save": sorted(saved_modules) or None,
        "lora_dropout": 0.0,  # ParamWrapper refuses dropout: it cannot factor x out of B A dropout(x)
        "use_rslora": False,  # the scaling is in alpha_pattern, whatever each source adapter used
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
    }
    return tensors, config


def write_adapter(
    recipe: ExportRecipe, source: Source, adapters: list[Adapter], config: MixtralConfig, tmp: Path, log
) -> list[str]:
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pipeline.hf_tokenizer import DEFAULT_SPM_PATH, save_tokenizer_files

    if recipe.export.dtype != "float32":
        log(
            f"export: format=adapter writes the LoRA factors in float32 (export.dtype={recipe.export.dtype} "
            "is for merged weights)"
        )
    tensors, kwargs = peft_adapter(adapters, meta_state(config), base_model_name(recipe, source))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(**kwargs).save_pretrained(str(tmp))
    spm_path = Path(recipe.tokenizer.spm_path) if recipe.tokenizer.spm_path else DEFAULT_SPM_PATH
    shutil.copyfile(spm_path, tmp / "tokenizer.model")
    save_tokenizer_files(tmp, spm_path)
    n = sum(t.numel() for t in tensors.values())
    report = [
        f"adapter: {len(tensors)} tensors, {n:,} parameters (r={kwargs['r']}, rank_pattern "
        f"{kwargs['rank_pattern']}, alpha_pattern {kwargs['alpha_pattern']})"
    ]
    report += [f"adapter: {a.dir} trained on a {a.base_quantization['type']} (4-bit) base in "
               f"{a.base_quantization['dtype']}: load the base that way under it (QLoRA), or export format hf "
               "(merged into the dequantized base)" for a in adapters if a.base_quantization]
    if recipe.verify.enabled:
        report += verify_adapter_export(tmp, source, config, tensors, recipe.verify)
    return report


def verify_adapter_export(
    out: Path, source: Source, config: MixtralConfig, tensors: dict[str, torch.Tensor], section: VerifySection
) -> list[str]:
    """PeftModel.from_pretrained onto transformers' Mixtral: every tensor lands, logits equal ours."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoTokenizer, MixtralForCausalLM

    n_params = sum(math.prod(t.shape) for t in meta_state(config).values())
    if n_params > section.max_params:
        return [f"verify: PEFT reload and logits skipped ({n_params:,} parameters > verify.max_params)"]
    base = MixtralForCausalLM.from_pretrained(source.checkpoint, dtype=torch.float32)
    with _target_parameter_patterns_apply():
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    loaded = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # no hub look-up of the base name
    if set(loaded) != set(tensors):
        raise RuntimeError(
            f"verify: PEFT holds {sorted(set(loaded) ^ set(tensors))[:4]} against the exported adapter"
        )
    for name, tensor in tensors.items():
        if not torch.equal(loaded[name].float(), tensor):
            raise RuntimeError(f"verify: PEFT loaded {name} with different values than exported")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True, return_dict=False)
        for p in section.prompts
    ]
    # The adapter as transformers applies it, onto the full-precision base it is given (a QLoRA
    # adapter's own base was 4-bit: the model card says so; export.format=hf merges into that).
    native = reference_model(source, torch.float32, quantized_bases=False)
    worst = 0.0
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            worst = max(worst, (peft_model(x).logits - native(x).logits).abs().max().item())
    if worst > section.atol:
        raise RuntimeError(
            f"verify: max |logits difference| {worst:.3g} of PEFT on transformers vs our merged model > "
            f"verify.atol={section.atol}"
        )
    return [
        f"verify: PeftModel.from_pretrained onto MixtralForCausalLM loads all {len(tensors)} tensors",
        f"verify: logits of transformers + PEFT vs our merged model on {len(ids)} prompts: max |diff| {worst:.2e}",
    ]


@contextlib.contextmanager
def _target_parameter_patterns_apply():
    """PEFT 0.21 warns that rank_pattern/alpha_pattern keys of target_parameters "did not match any
    targeted module and were ignored": its check looks at module names only, and the ranks do apply
    (the verification below loads every tensor with its shape). Only that warning, for only those
    keys, is dropped; any other is passed on."""
    import ast
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        text = str(w.message)
        match = re.search(r"_pattern keys did not match any targeted module and were ignored: (\[.*\])", text)
        if match and set(ast.literal_eval(match.group(1))) <= set(ADAPTER_TARGET_PARAMETERS):
            continue
        if "`is_gradient_checkpointing` is deprecated" in text:  # PEFT calling transformers 5's old name
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ----------------------------------------------------------------------------------------------
# Output directory handling
# ----------------------------------------------------------------------------------------------


def check_output_dir(out: Path, overwrite: bool) -> None:
    """A new or empty ``out``, or (with ``overwrite``) an earlier export: nothing else is replaced."""
    check_ownable(out, "export")  # holds only names an export writes, or is refused whatever overwrite says
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {out} holds an earlier export; pass export.overwrite=true to replace it (or choose "
            "another output_dir)"
        )


def portable(value):
    """``value`` with every absolute path of this machine cut to its last component: shipped files
    (model card, recipe.yaml) must not carry the training machine's directory layout."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, (str, Path)) and os.path.isabs(str(value)):
        return Path(value).name or str(value)
    return str(value) if isinstance(value, Path) else value


def base_model_name(recipe: ExportRecipe, source: Source) -> str:
    """How shipped files name the base: export.base_model_name, else the base dir's own name."""
    return recipe.export.base_model_name or source.checkpoint.resolve().name


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------


def model_card(recipe: ExportRecipe, source: Source, config: MixtralConfig, report: list[str]) -> str:
    lines = [
        f"# {recipe.model_name}",
        "",
        "Mixtral (sparse mixture of experts, 8 SwiGLU experts per layer, top-2)",
    ]
    lines += [
        "fine-tuned with this repository's pipeline (SFT -> DPO -> export), in the layout of",
        "mistralai/Mixtral-8x7B-Instruct-v0.1.",
        "",
        "## Base model",
        "",
        f"- checkpoint: `{base_model_name(recipe, source)}`",
        f"- size: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_local_experts} experts "
        f"(top-{config.num_experts_per_tok}), ffn {config.intermediate_size}, vocab {config.vocab_size}",
        f"- merged adapters (in order): {', '.join(f'`{portable(a)}`' for a in source.adapters) or 'none'}",
        f"- export: format `{recipe.export.format}`, dtype `{recipe.export.dtype}` (LoRA merged in float32)",
        "",
        "## Training stages",
        "",
    ]
    if not source.manifests:
        lines.append("No stage manifests: exported directly from a checkpoint.")
    for manifest in source.manifests:
        stage = manifest.get("stage", "?")
        lines.append(f"### {stage} ({manifest.get('kind', '?')})")
        lines.append("")
        data = manifest.get("data")
        if data:
            lines.append(f"- data: `{json.dumps(portable(data), ensure_ascii=False)[:500]}`")
        if manifest.get("recipe"):
            lines.append(f"- recipe: `{manifest['recipe']}` (in the stage output dir)")
        if manifest.get("lora"):
            lines.append(f"- LoRA: `{json.dumps(manifest['lora'])}`")
        if manifest.get("steps") is not None:
            lines.append(f"- steps: {manifest['steps']}")
        metrics = manifest.get("final_metrics") or {}
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [
                f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                for k, v in metrics.items()
            ]
        lines.append("")
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, MixtralForCausalLM",
        "tok = AutoTokenizer.from_pretrained(path)",
        *(
            [
                "from peft import PeftModel",
                f'base = MixtralForCausalLM.from_pretrained("{base_model_name(recipe, source)}", dtype="auto")',
                "model = PeftModel.from_pretrained(base, path)  # or .merge_and_unload()",
            ]
            if recipe.export.format == "adapter"
            else ['model = MixtralForCausalLM.from_pretrained(path, dtype="auto")']
        ),
        'ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], return_tensors="pt", return_dict=False)',
        "out = model.generate(ids, max_new_tokens=64, do_sample=False)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "or `python -m pipeline.chat PATH` (merged exports). The chat template reproduces mistral-common's v1 instruct",
        "encoding token for token (system prompt prepended to the first user turn); the fast",
        "tokenizer encodes like the SentencePiece `tokenizer.model`. Encode raw training text with",
        "`split_special_tokens=True` so that a literal `</s>` in text stays text.",
        "",
        "## Export verification",
        "",
        *[f"- {line}" for line in report],
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def export(recipe: ExportRecipe, log: Callable[[str], None] = print) -> Path:
    """Run the export described by ``recipe``; returns the output dir."""
    started = time.perf_counter()
    out = Path(recipe.output_dir)
    check_output_dir(out, recipe.export.overwrite)
    # One export of an output at a time; under the lock, every .<name>.tmp-* / .old-* next to it is
    # what a killed export left (up to a whole model's size): gone before this one starts.
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(sibling_lock_path(out), what=f"output_dir {out}")
    try:
        stale = remove_stale_siblings(out)
        if stale:
            log(f"export: removed what an interrupted export of {out} left: {', '.join(stale)}")
        report = _export_locked(recipe, out, log)
    finally:
        lock.release()
    log(f"export: wrote {out} in {time.perf_counter() - started:.1f}s")
    for line in report:
        log(f"  {line}")
    return out


def _export_locked(recipe: ExportRecipe, out: Path, log: Callable[[str], None]) -> list[str]:
    # 1. Source.
    source = source_from_recipe(recipe.source)
    config = MixtralConfig.from_hf(source.checkpoint / "config.json")
    adapters = [Adapter.open(a) for a in source.adapters]
    for adapter in adapters:
        adapter.base_quantization = source.quantized.get(str(adapter.dir))
    log(f"export: base {source.checkpoint}, {len(adapters)} adapter(s): {[str(a.dir) for a in adapters]}"
        + "".join(f"; {a.dir} trained on a {a.base_quantization['type']} base, merged into it dequantized"
                  for a in adapters if a.base_quantization))

    tmp = new_temp_dir(out)
    try:
        if recipe.export.format == "adapter":
            report = write_adapter(recipe, source, adapters, config, tmp, log)
        else:
            report = _write_weights(recipe, source, config, adapters, tmp, log)
        save_recipe(portable(to_dict(recipe)), tmp / "recipe.yaml")
        (tmp / "README.md").write_text(model_card(recipe, source, config, report))
        make_readable(tmp)
        check_output_dir(out, recipe.export.overwrite)  # again: something may have appeared meanwhile
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_weights(
    recipe: ExportRecipe, source: Source, config: MixtralConfig, adapters: list[Adapter], tmp: Path, log
) -> list[str]:
    from pipeline.hf_tokenizer import DEFAULT_SPM_PATH, save_tokenizer_files

    dtype = DTYPES[recipe.export.dtype]
    shapes = meta_state(config)
    reader = BaseReader(source.checkpoint, config)
    spm_path = Path(recipe.tokenizer.spm_path) if recipe.tokenizer.spm_path else DEFAULT_SPM_PATH
    consolidated = recipe.export.format == "consolidated"

    # 2. Plan every tensor from shapes alone.
    plan = hf_plan(shapes, dtype)
    if consolidated:
        plan = [TensorPlan(consolidated_name(p.name), p.shape, p.nbytes) for p in plan]
        shards = [plan]
        writer = ShardWriter(tmp, shards, dtype, prefix="consolidated")
    else:
        shards = plan_shards(plan, parse_size(recipe.export.max_shard_size))
        writer = ShardWriter(tmp, shards, dtype)
    total = sum(p.nbytes for p in plan)
    log(f"export: {len(plan)} tensors, {total / 1e9:.3f} GB {recipe.export.dtype} in {len(shards)} file(s)")

    # 3. Stream: one native parameter at a time.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not recipe.export.progress_bar)
    with reader, writer, torch.no_grad(), streaming_threads():
        for native, weight in merged_native_params(reader, adapters, shapes):
            for hf_name, tensor in hf_tensors({native: weight}):
                name, tensor = (
                    consolidated_tensor(hf_name, tensor, config) if consolidated else (hf_name, tensor)
                )
                writer.write(name, tensor)
                bar.update(tensor.numel() * dtype.itemsize)
            del weight
        index = writer.finish()
    bar.close()

    # 4. Configs and tokenizer.
    shutil.copyfile(spm_path, tmp / "tokenizer.model")
    if consolidated:
        write_json(tmp / "params.json", params_json(config))
        report = [f"consolidated.safetensors: {len(plan)} tensors, {total} bytes"]
        if recipe.verify.enabled:
            report += verify_consolidated(tmp, config, dtype, plan)
        return report
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = recipe.export.dtype
    write_json(tmp / "config.json", hf_config)
    write_json(tmp / "generation_config.json", generation_config(config))
    if len(shards) > 1:
        write_json(tmp / "model.safetensors.index.json", index)
    save_tokenizer_files(tmp, spm_path)

    # 5. Verify.
    report = [f"{len(plan)} tensors, {total} bytes in {len(shards)} shard(s)"]
    if recipe.verify.enabled:
        report += verify_hf_export(tmp, source, config, dtype, plan, recipe.verify, log=log)
    return report


@contextlib.contextmanager
def streaming_threads() -> Iterator[int]:
    """torch's intra-op threads for the streaming loop: one core fewer than usual, left to the write
    thread. Every op there is a memory-bound copy, conversion or rank-r update; an intra-op pool that
    counts the core the write thread (or another process) is using waits on its slowest thread.
    Measured (bench inputs, 2 cores, load 5-7): reading + merging + converting the 1.2 GB model took
    1.4 s on 1 thread, 10-16 s on 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - 1))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def check_shards(out: Path, plan: list[TensorPlan], dtype: torch.dtype) -> str:
    """Index and shard headers agree with each other and with the plan; returns a report line."""
    index_file = out / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
        total = index["metadata"]["total_size"]
    else:
        weight_map, total = {p.name: "model.safetensors" for p in plan}, sum(p.nbytes for p in plan)
    expected = {p.name: p for p in plan}
    if set(weight_map) != set(expected):
        raise RuntimeError(
            f"verify: index names differ from the config's: {sorted(set(weight_map) ^ set(expected))[:4]}"
        )
    if total != sum(p.nbytes for p in plan):
        raise RuntimeError(
            f"verify: index total_size {total} != {sum(p.nbytes for p in plan)} bytes of tensors"
        )
    by_file = defaultdict(set)
    for name, file in weight_map.items():
        by_file[file].add(name)
    for file, names in by_file.items():
        with safe_open(str(out / file), framework="pt") as f:
            if set(f.keys()) != names:
                raise RuntimeError(
                    f"verify: {file} holds {sorted(set(f.keys()) ^ names)[:4]} against the index"
                )
            for name in names:
                sliced = f.get_slice(name)
                if (
                    tuple(sliced.get_shape()) != expected[name].shape
                    or sliced.get_dtype() != ST_DTYPES[dtype]
                ):
                    raise RuntimeError(
                        f"verify: {file}:{name} is {sliced.get_dtype()} {sliced.get_shape()}, expected "
                        f"{ST_DTYPES[dtype]} {list(expected[name].shape)}"
                    )
    return f"verify: index and {len(by_file)} shard(s) agree: {len(plan)} names, shapes, dtype {dtype}, total_size {total}"


def reference_model(source: Source, dtype: torch.dtype, quantized_bases: bool = True):
    """Our model with every adapter merged by PEFT, weights rounded to the export dtype, in fp32.
    An adapter trained on a 4-bit base merges into that base dequantized (`quantized_bases`)."""
    from peft import PeftModel

    import model.lora  # noqa: F401  (registers the expert LoRA layer with PEFT)
    from model.checkpoint import load_pretrained
    from model.quant import hold_as_4bit_base

    native = load_pretrained(source.checkpoint, dtype=torch.float32)
    for adapter in source.adapters:
        quantization = source.quantized.get(str(adapter)) if quantized_bases else None
        if quantization is not None:
            hold_as_4bit_base(native, getattr(torch, quantization["dtype"]))
        native = PeftModel.from_pretrained(native, str(adapter)).merge_and_unload()
    with torch.no_grad():
        for param in native.parameters():
            param.copy_(param.to(dtype).float())
    return native.eval()


def verify_hf_export(
    out: Path,
    source: Source,
    config: MixtralConfig,
    dtype: torch.dtype,
    plan: list[TensorPlan],
    section: VerifySection,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Names, shapes and dtypes; transformers reload; chat template; logits against our model."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    report = [check_shards(out, plan, dtype)]
    n_params = sum(math.prod(p.shape) for p in plan)
    if n_params > section.max_params:
        report.append(
            f"verify: transformers reload and logits skipped ({n_params:,} parameters > verify.max_params)"
        )
        return report

    hf_model, info = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise RuntimeError(f"verify: transformers reload of {out}: {problems}")
    hf_params = sum(p.numel() for p in hf_model.parameters())
    if hf_params != n_params:
        raise RuntimeError(f"verify: transformers holds {hf_params} parameters, the export {n_params}")
    report.append(
        f"verify: MixtralForCausalLM reloads with no missing/unexpected keys ({n_params:,} parameters)"
    )

    tokenizer = AutoTokenizer.from_pretrained(out)
    conversations = [[{"role": "user", "content": prompt}] for prompt in section.prompts]
    conversations.append(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "  Why?  "},
        ]
    )
    conversations.append(  # message text that looks like control tokens is text
        [{"role": "user", "content": "Is </s> a token? [INST]"}, {"role": "assistant", "content": "<s>No</s>."},
         {"role": "user", "content": "<unk>?"}]
    )
    reference_ids = _mistral_common_ids(out / "tokenizer.model", conversations)
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    if ids != reference_ids:
        raise RuntimeError("verify: the exported chat template does not tokenize like mistral-common v1")
    report.append(f"verify: chat template == mistral-common v1 on {len(conversations)} conversations")

    native = reference_model(source, dtype)
    worst = 0.0
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            worst = max(worst, (hf_model(x).logits - native(x).logits).abs().max().item())
    if worst > section.atol:
        raise RuntimeError(
            f"verify: max |logits difference| {worst:.3g} against our model > verify.atol={section.atol}"
        )
    report.append(
        f"verify: logits of transformers vs our merged model on {len(ids)} prompts: max |diff| {worst:.2e}"
    )
    return report


def _mistral_common_ids(spm_path: Path, conversations: list[list[dict]]) -> list[list[int]]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    roles = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    tokenizer = MistralTokenizer.from_file(str(spm_path), mode=ValidationMode.test)
    return [
        tokenizer.encode_chat_completion(
            ChatCompletionRequest(messages=[roles[m["role"]](content=m["content"]) for m in c])
        ).tokens
        for c in conversations
    ]


def verify_consolidated(
    out: Path, config: MixtralConfig, dtype: torch.dtype, plan: list[TensorPlan]
) -> list[str]:
    with safe_open(str(out / "consolidated.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for entry in plan:
            sliced = f.get_slice(entry.name)
            if tuple(sliced.get_shape()) != entry.shape or sliced.get_dtype() != ST_DTYPES[dtype]:
                raise RuntimeError(f"verify: {entry.name} is {sliced.get_dtype()} {sliced.get_shape()}")
    if names != {p.name for p in plan}:
        raise RuntimeError(
            f"verify: consolidated.safetensors names differ from the plan: {sorted(names ^ {p.name for p in plan})[:4]}"
        )
    params = json.loads((out / "params.json").read_text())
    if (
        params["n_layers"] != config.num_hidden_layers
        or params["moe"]["num_experts"] != config.num_local_experts
    ):
        raise RuntimeError("verify: params.json does not match the model config")
    return [f"verify: names, shapes and dtypes of {len(plan)} tensors match params.json"]


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse_cli(argv, usage=__doc__.split("\n\n")[1])
    try:
        recipe = build(ExportRecipe, load_recipe_dict(path, overrides), source=path)
        export(recipe)
    except (RecipeError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
