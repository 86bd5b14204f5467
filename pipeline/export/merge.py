"""Adapters merged into the base one native parameter at a time, in float32 (QLoRA adapters into
their base dequantized)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import MixtralConfig
from pipeline.export.source import BaseReader

PEFT_PREFIX = "base_model.model."
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
