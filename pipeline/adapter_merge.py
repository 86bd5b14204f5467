"""PEFT adapters merged into a base checkpoint's native parameters, one parameter at a time, in
float32: the one merge behind what export writes and what eval evaluates.

    BaseReader             an HF checkpoint's native parameters (per-expert or fused names), read one
                           at a time in fp32; of an expert stack, only the experts asked for
    Adapter                one PEFT adapter's tensors, grouped by the native parameter they change
    merged_native_params   (name, fp32 base + every adapter's delta), in model order
    load_merged            that model in memory, rounded once to a dtype, on a device (eval)

Every adapter's delta is added to the fp32 base by `model.lora.add_lora_delta` and the sum is
rounded once: to the export dtype by export, to the eval dtype by eval, so eval at the export's dtype
evaluates the bits export writes (tests/pipeline/test_export.py checks it). An adapter trained on a
4-bit base (QLoRA) merges into that base dequantized (`quantized_base`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from model.checkpoint import hf_to_native, weight_files
from model.config import MixtralConfig
from model.lora import add_lora_delta
from pipeline.run_record import Source
from pipeline.safetensors_io import READ_CHUNK_BYTES, StoredTensor, read_into, read_safetensors_header

PEFT_PREFIX = "base_model.model."
_EXPERT_LORA = re.compile(r"^(?P<module>.+\.experts)\.lora_(?P<which>gate_up|down)_(?P<ab>[AB])$")
_LINEAR_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


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

    def read(self, native: str, shape: torch.Size, experts: list[int] | None = None) -> torch.Tensor:
        """``native`` [shape] in fp32. ``experts``: of an expert stack, only these experts, in this
        order (``shape[0] == len(experts)``); the others' bytes are not read."""
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
        total = shape[0] if experts is None else self.config.num_local_experts  # of an expert stack
        held = range(total) if experts is None else experts
        index = {e: i for i, e in enumerate(held)} if is_expert_stack(native) else {}  # expert id -> row
        filled = set()
        for file, hf_name, target, stored in pieces:
            where = f"{self.dir / file}: {hf_name}"
            if target.piece == "stack" and experts is not None:
                # Fused [E, ...]: expert e is one contiguous run of its elements.
                if stored.shape != (total, *shape[1:]):
                    raise ValueError(f"{where} has shape {list(stored.shape)}, config.json implies "
                                     f"{[total, *shape[1:]]}")
                per = math.prod(shape[1:])
                for e, i in index.items():
                    read_into(self._fd(file), stored.elements(e * per, (e + 1) * per), out[i], self._staging, where)
                filled.add(("stack", None))
                continue
            if target.piece in ("all", "stack"):
                dest, key = out, (target.piece, None)
            else:
                if target.expert >= total:
                    raise ValueError(
                        f"{self.dir / file}: {hf_name} is for expert {target.expert}, config.json has {total}"
                    )
                if target.expert not in index:
                    continue  # an expert not asked for: never read
                i = index[target.expert]
                dest = {"w1": out[i, :ffn], "w3": out[i, ffn:], "w2": out[i]}[target.piece]
                key = (target.piece, target.expert)
            if tuple(dest.shape) != stored.shape:
                raise ValueError(
                    f"{self.dir / file}: {hf_name} has shape {list(stored.shape)}, config.json implies "
                    f"{list(dest.shape)}"
                )
            if key in filled:
                raise ValueError(f"{self.dir / file}: {hf_name} fills {native} {key} a second time")
            filled.add(key)
            read_into(self._fd(file), stored, dest, self._staging, where)
        expected = self._expected_keys(native, list(index))
        if expected - filled and not any(k[0] in ("all", "stack") for k in filled):
            missing = sorted(expected - filled)
            raise ValueError(f"{self.dir}: checkpoint is missing {native} pieces {missing[:4]}")
        return out

    @staticmethod
    def _expected_keys(native: str, experts: list[int]) -> set:
        if native.endswith("experts.gate_up_proj"):
            return {(p, e) for e in experts for p in ("w1", "w3")}
        if native.endswith("experts.down_proj"):
            return {("w2", e) for e in experts}
        return {("all", None)}


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
    def open(cls, adapter_dir: str | os.PathLike, base_quantization: dict | None = None) -> Adapter:
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
            if not key.startswith(PEFT_PREFIX):
                raise ValueError(
                    f"{weights}: tensor {key!r} does not start with {PEFT_PREFIX!r}; not a PEFT adapter"
                )
            name = key[len(PEFT_PREFIX) :]
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
        return cls(adapter_dir, scale, dict(deltas), replacements, base_quantization)

    def apply(self, native: str, weight: torch.Tensor, experts: list[int] | None = None) -> torch.Tensor:
        """``weight`` (fp32) with this adapter's replacement and LoRA delta, in place where possible.
        ``experts``: ``weight`` holds only these experts of an expert stack."""
        replacement = self.replacement(native, experts)
        if replacement is not None:
            if replacement.shape != weight.shape:
                raise ValueError(
                    f"{self.dir / 'adapter_model.safetensors'}: {self.replacements[native]} has shape "
                    f"{list(replacement.shape)}, the base {native} {list(weight.shape)}"
                )
            weight = replacement.to(weight.device)
        parts = self.lora_parts(native, experts)
        if parts:
            add_lora_delta(weight, {k: v.to(weight.device) for k, v in parts.items()}, self.scale)
        return weight

    def replacement(self, native: str, experts: list[int] | None = None) -> torch.Tensor | None:
        """The fully trained copy of ``native`` (modules_to_save, e.g. the router), fp32, or None."""
        if native not in self.replacements:
            return None
        with safe_open(str(self.dir / "adapter_model.safetensors"), framework="pt") as f:
            return _held(f.get_tensor(self.replacements[native]).float(), experts)

    def lora_parts(self, native: str, experts: list[int] | None = None) -> dict[str, torch.Tensor]:
        """This adapter's LoRA tensors on ``native`` in fp32 ({} if none), keyed as in ``deltas``;
        of an expert stack's, only ``experts``."""
        keys = self.deltas.get(native, {})
        if not keys:
            return {}
        with safe_open(str(self.dir / "adapter_model.safetensors"), framework="pt") as f:
            return {k: _held(f.get_tensor(v).float(), experts) for k, v in keys.items()}

    def natives(self) -> set[str]:
        return set(self.deltas) | set(self.replacements)


def _held(tensor: torch.Tensor, experts: list[int] | None) -> torch.Tensor:
    """An expert-stacked tensor [E, ...] cut to ``experts`` (None: all)."""
    return tensor if experts is None else tensor[experts]


def is_expert_stack(native: str) -> bool:
    return native.endswith(("experts.gate_up_proj", "experts.down_proj"))


def open_adapters(source: Source) -> list[Adapter]:
    """The adapters of ``source`` in merge order, each knowing the 4-bit base it trained on, if any."""
    return [Adapter.open(a, source.quantized.get(str(a))) for a in source.adapters]


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
                if not is_expert_stack(native):
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
    reader: BaseReader, adapters: list[Adapter], shapes: dict[str, torch.Tensor], experts: list[int] | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(native name, merged fp32 tensor), one parameter at a time, in model order. The tensor may be
    the reader's reused buffer: use it before asking for the next one. ``experts``: of every expert
    stack, only these experts (read, merged and yielded; an expert-parallel rank's). ``device``: where
    the fp32 merge runs (the base is read on the host and copied there; export: the host)."""
    check_adapters(adapters, shapes)
    from model.quant import is_quantized_name

    quantizable = {n for n in shapes if is_quantized_name(n)}
    for native, meta in shapes.items():
        held = experts if experts is not None and is_expert_stack(native) else None
        shape = meta.shape if held is None else torch.Size((len(held), *meta.shape[1:]))
        weight = reader.read(native, shape, held).to(device)
        for adapter in adapters:
            weight = quantized_base(native, weight, adapter.base_quantization, quantizable)
            weight = adapter.apply(native, weight, held)
        yield native, weight


def quantized_base(native: str, weight: torch.Tensor, quantization: dict | None, quantizable: set[str]) -> torch.Tensor:
    """``weight`` (fp32) as a stage with ``quantization`` held it: cast to its dtype, NF4 and back."""
    if quantization is None or native not in quantizable:
        return weight
    from model import quant

    return quant.nf4_round_trip(weight, getattr(torch, quantization["dtype"]))


def load_merged(source: Source, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                on_meta: Callable[[torch.nn.Module], object] | None = None, quantization: str | None = None,
                quantize_device: str | torch.device | None = None):
    """The Mixtral ``source`` names (`run_record.resolve_source`: a base checkpoint and the adapters
    on it), merged as export merges it and rounded once to ``dtype``, on ``device``.

    Built on the meta device (``on_meta``: e.g. keep an expert-parallel rank's experts, which
    ``model.expert_ids`` then names: only those are read and merged), allocated on ``device``, and
    filled one native parameter at a time, each merged in fp32 on ``device`` (on the host a
    Mixtral-8x7B layer takes seconds, with a QLoRA base tens of seconds: bench/bench_eval_merge.py)
    and rounded once there: the host holds one fp32 parameter, never the model.
    On the host these are export's bytes; on a GPU its matrix products may round the fp32 sum's last
    bit differently, so a weight can rarely sit one bf16 step from export's.

    ``quantization`` ("nf4"): a 4-bit base of the merged model (DPO with QLoRA on a full-precision
    SFT adapter): every weight is merged on ``quantize_device`` (default ``device``); each one QLoRA
    quantizes is cast to ``dtype`` and quantized there at once, so the merged model never exists
    whole in ``dtype``; the rest is copied to ``device``. The model comes back frozen, marked 4-bit.
    """
    from model.transformer import Mixtral

    config = MixtralConfig.from_hf(source.checkpoint / "config.json")
    with torch.device("meta"):
        model = Mixtral(config, dtype=dtype)
    if on_meta is not None:
        on_meta(model)
    # Lazily allocated on the host: the pages of a weight replaced by its 4-bit form are never touched.
    model = model.to_empty(device=device)
    experts = model.expert_ids if len(model.expert_ids) < config.num_local_experts else None
    params = dict(model.named_parameters())
    to_quantize: set[str] = set()
    if quantization is not None:
        from model import quant

        quant.check_quantization(quantization)
        to_quantize = set(quant.quantized_parameter_names(model))
        quantize_device = quantize_device or device
    with BaseReader(source.checkpoint, config) as reader, torch.no_grad():
        for native, weight in merged_native_params(reader, open_adapters(source), meta_state(config), experts,
                                                   device=quantize_device if quantization else device):
            if native in to_quantize:
                module_name, _, leaf = native.rpartition(".")
                model.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(
                    weight.to(quantize_device, dtype, copy=True), requires_grad=False)  # the one rounding
                quant.quantize_parameter(model, native, quantize_device)
                del params[native]
            else:
                params[native].copy_(weight)  # the one rounding to dtype (copy_ casts as .to() does), no temporary
    if quantization is not None:
        quant.mark_quantized(model, quantization)
    return model
