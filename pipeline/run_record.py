"""The run record: ``manifest.json``, written last by a training stage (SFT, DPO) into its output dir
and read by the stages after it (DPO, export, eval, the preflight). Read and written here only;
`resolve_source` follows a chain of records back to a base checkpoint and the adapters on it.

A record says what the run left and what it was trained on:

    kind               "lora" (an adapter over ``base.checkpoint``) or "full" (a whole model)
    base.checkpoint    the model the run trained on: an HF dir, or another stage's output dir (DPO
                       names its SFT dir, whose own record names the base: a chain)
    base.config        that model's HF config (the number of experts is read here before any weight)
    base.adapters      adapters already under the base (optional)
    adapter_dir | model_dir   where the adapter / the full model is (default: the run dir)
    quantization       the 4-bit base the adapter trained on (QLoRA), or null
    files, lora, data, steps, final_metrics, recipe, metrics, versions, finished_at: for people and
    the model card.

Paths in a record are absolute as written; a relative one is taken relative to the run dir unless it
exists as given (a record moved with its run dir still resolves).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.checkpoint import write_json
from pipeline.config import redact_env_secrets

RECORD_FILE = "manifest.json"
KINDS = ("lora", "full")
# DPO's model.sft_dir and the preflight's look at it: what a missing record means there.
SFT_DIR_HINT = "model.sft_dir must be a finished SFT output directory (make sft writes outputs/tiny/sft)"


@dataclass(frozen=True)
class RunRecord:
    run_dir: Path
    kind: str
    base_checkpoint: Path | None
    base_config: dict | None = None
    base_adapters: list[Path] = field(default_factory=list)
    adapter_dir: Path | None = None  # kind "lora"
    model_dir: Path | None = None  # kind "full"
    quantization: dict | None = None
    fields: dict = field(default_factory=dict)  # the whole record as written

    @property
    def path(self) -> Path:
        return self.run_dir / RECORD_FILE

    @staticmethod
    def exists(run_dir: str | os.PathLike) -> bool:
        return (Path(run_dir) / RECORD_FILE).is_file()

    @classmethod
    def read(cls, run_dir: str | os.PathLike, *, missing_hint: str | None = None) -> RunRecord:
        """The record of a finished run; errors name the file and the field."""
        run_dir = Path(run_dir)
        path = run_dir / RECORD_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found" + (f": {missing_hint}" if missing_hint else ""))
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a JSON object expected, got {type(raw).__name__}")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{path}: field 'kind' must be 'lora' or 'full', got {kind!r}")
        base = raw.get("base")
        base_fields = base if isinstance(base, dict) else {"checkpoint": base}
        base_dir = base_fields.get("checkpoint")
        if kind == "lora" and not base_dir:
            raise ValueError(f"{path}: field 'base.checkpoint' (the model the adapter was trained on) is missing")
        return cls(
            run_dir=run_dir,
            kind=kind,
            base_checkpoint=_resolve(base_dir, run_dir) if base_dir else None,
            base_config=base_fields.get("config"),
            base_adapters=[_resolve(a, run_dir) for a in base_fields.get("adapters") or []],
            adapter_dir=_resolve(raw.get("adapter_dir") or str(run_dir), run_dir) if kind == "lora" else None,
            model_dir=_resolve(raw.get("model_dir") or str(run_dir), run_dir) if kind == "full" else None,
            quantization=raw.get("quantization"),
            fields=raw,
        )

    def config_file(self) -> Path:
        """The config.json of the model this run's weights extend (full: its own), through a chain."""
        return hf_checkpoint_behind(self.model_dir if self.kind == "full" else self.base_checkpoint) / "config.json"

    def model_config(self) -> dict:
        """The HF config of the run's model: the one recorded, else the config.json behind it."""
        if self.base_config is not None:
            return self.base_config
        return json.loads(self.config_file().read_text())


def hf_checkpoint_behind(path: str | os.PathLike, max_depth: int = 8) -> Path:
    """The HF checkpoint dir a run dir's records lead to (DPO -> SFT -> base), or ``path`` itself when it
    holds no record. A full run's model dir is a checkpoint, usually the run dir itself."""
    path = Path(path)
    for _ in range(max_depth):
        if not RunRecord.exists(path):
            return path
        record = RunRecord.read(path)
        if record.kind == "full":
            return record.model_dir
        path = record.base_checkpoint
    raise ValueError(f"{path}: more than {max_depth} run records in a chain")


@dataclass
class Source:
    """A model as a base checkpoint plus the PEFT adapters merged onto it, in order (export's input,
    eval's model): what a run dir's records lead back to."""

    checkpoint: Path  # HF dir: config.json + safetensors (per-expert or fused names)
    adapters: list[Path]  # PEFT dirs, merged in order
    manifests: list[dict]  # stage manifests, oldest first (for the model card)
    # adapter dir -> its stage's `quantization` ({"type": "nf4", "dtype": ...}): trained on a 4-bit base
    quantized: dict[str, dict] = field(default_factory=dict)


def is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def resolve_source(path: str | os.PathLike) -> Source:
    """Follow a run dir's records back to an HF checkpoint; collect the adapters to merge on the way
    (a DPO run over a LoRA SFT run: [SFT adapter, DPO adapter]). An HF checkpoint dir is itself.

    Reads ``kind`` ("lora" or "full"), ``base.checkpoint`` (an HF dir or another stage dir),
    ``base.adapters`` (adapters already under the base, optional), ``adapter_dir`` / ``model_dir``.
    """
    path = Path(path)
    if not RunRecord.exists(path):
        if is_hf_checkpoint(path):
            return Source(path, [], [])
        if any(path.glob("model-rank*.safetensors")):
            raise ValueError(
                f"{path}: per-rank ZeRO/EP checkpoint shards (model-rank*.safetensors) are for resuming; "
                "use the finished stage output dir (its manifest.json names the gathered adapter or model)"
            )
        if (path / "adapter_config.json").is_file():
            raise ValueError(
                f"{path}: a PEFT adapter without manifest.json, so its base model is unknown (export takes "
                f"it as source.checkpoint: BASE and source.adapters: [{str(path)!r}])"
            )
        raise FileNotFoundError(
            f"{path}: neither a stage output dir (manifest.json) nor an HF checkpoint (config.json + "
            "model*.safetensors)"
        )
    record = RunRecord.read(path)
    if record.kind == "full":
        if not is_hf_checkpoint(record.model_dir):
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


def write_training_record(out: Path, *, stage: str, lora, quantization: dict | None, base: dict,
                          files: list[str], data: dict, final: dict[str, float], steps: int,
                          **extra) -> None:
    """The record of a finished SFT / DPO run, written last (atomically), env secrets redacted.

    ``lora``: the recipe's lora section; ``extra``: stage fields (DPO's ``reference``, ``dpo``)."""
    import peft
    import torch
    import transformers

    from pipeline.training.tracking import METRICS_FILE

    record = {
        "stage": stage,
        "kind": "lora" if lora.enabled else "full",
        "base": base,
        **extra,
        "adapter_dir" if lora.enabled else "model_dir": str(out.resolve()),
        "files": files,
        "quantization": quantization,
        "lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules,
                 "train_router": lora.train_router} if lora.enabled else None,
        "data": data,
        "steps": steps,
        "final_metrics": {k: v for k, v in final.items() if not k.startswith("expert_load/")},
        "recipe": "recipe.yaml",
        "metrics": METRICS_FILE,
        "versions": {"torch": torch.__version__, "peft": peft.__version__,
                     "transformers": transformers.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / RECORD_FILE, json.loads(redact_env_secrets(json.dumps(record))), sort_keys=True)


def _resolve(value: str, run_dir: Path) -> Path:
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    return run_dir / path
