"""The ``data:`` section of a recipe: where the records come from and how they become token rows.

Built with :func:`pipeline.config.build`; every check below names the YAML key it concerns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "preference")
# `data:` keys that do not change the prepared rows (where they go, and how fast they are made).
NOT_IN_OUTPUT = ("output_dir", "num_proc", "batch_size")


@dataclass
class SourceConfig:
    """One input: a local file or a Hugging Face dataset name."""

    # Local .jsonl / .json / .parquet / .csv file (relative paths are taken from the working dir).
    path: str | None = None
    # Hugging Face dataset name (or a local dataset directory) for `datasets.load_dataset`.
    hf: str | None = None
    split: str = "train"  # the split of `hf` to read
    subset: str | None = None  # the `name` (configuration) of `hf`
    revision: str | None = None  # a git revision of `hf`; pin it for reproducible runs
    # Record format; "auto" detects it per record from the keys present.
    format: Literal["auto", "messages", "sharegpt", "alpaca", "preference"] = "auto"
    # Share of this source's rows to use, drawn with `data.seed` (1.0 = all of them).
    fraction: float = 1.0
    # "train": feeds train (and the `data.eval_fraction` hold-out); "eval": goes whole to eval/.
    role: Literal["train", "eval"] = "train"

    def __post_init__(self):
        if (self.path is None) == (self.hf is None):
            raise ValueError("data.sources: give exactly one of `path` (a local file) or `hf` (a dataset name)")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"data.sources.fraction must be in (0, 1], got {self.fraction}")

    @property
    def name(self) -> str:
        """How reports and rejects refer to this source."""
        if self.path is not None:
            return self.path
        parts = [self.hf, self.subset, self.split]
        return ":".join(p for p in parts if p)


@dataclass
class DataConfig:
    """How `python -m pipeline.prep` turns sources into train/ and eval/ token datasets."""

    # "sft": packed conversations with answer labels; "dpo": prompt + chosen/rejected pairs.
    kind: Literal["sft", "dpo"] = "sft"
    sources: list[SourceConfig] = field(default_factory=list)
    output_dir: str = "outputs/data"
    # None: the Mixtral 8x7B SentencePiece model shipped in mistral-common; else a
    # tokenizer.model file or a directory holding tokenizer.model or tokenizer.json.
    tokenizer: str | None = None

    # --- length -------------------------------------------------------------------------------
    max_seq_len: int = 2048
    # "drop" over-long examples, or "truncate" them (SFT keeps the start; DPO keeps the end of
    # the prompt and the start of both answers).
    overlength: Literal["drop", "truncate"] = "drop"
    # DPO only: the prompt is cut to this many tokens (its end is kept) when a pair is too long;
    # None = max_seq_len // 2.
    max_prompt_len: int | None = None

    # --- labels -------------------------------------------------------------------------------
    # SFT: put labels on the last answer only instead of on every answer.
    train_on_last_answer_only: bool = False

    # --- rows ---------------------------------------------------------------------------------
    # SFT: best-fit-decreasing packing of several conversations per row of max_seq_len;
    # false = one conversation per row (the collator pads).
    packing: bool = True
    dedup: bool = True  # drop exact duplicates (same token ids); the first occurrence is kept

    # --- splits -------------------------------------------------------------------------------
    # Share of the train sources' accepted examples held out into eval/ (per source).
    eval_fraction: float = 0.0
    seed: int = 0

    # --- speed --------------------------------------------------------------------------------
    num_proc: int = 1  # worker processes for validation + tokenization
    batch_size: int = 1000  # records per tokenizer call (and per worker task)

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources is empty: list at least one `- path: file.jsonl` (or `- hf: name`)")
        names = [s.name for s in self.sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"data.sources lists {', '.join(twice)} more than once; use one entry with a fraction")
        if self.max_seq_len < 8:
            raise ValueError(f"data.max_seq_len must be >= 8, got {self.max_seq_len}")
        if self.max_prompt_len is not None and not 0 < self.max_prompt_len < self.max_seq_len:
            raise ValueError(
                f"data.max_prompt_len must be in (0, data.max_seq_len={self.max_seq_len}), got {self.max_prompt_len}"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1, got {self.num_proc}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.kind == "dpo" and any(s.format in ("messages", "sharegpt", "alpaca") for s in self.sources):
            raise ValueError("data.kind is dpo but a source sets an SFT format; use format: preference or auto")
        if self.kind == "sft" and any(s.format == "preference" for s in self.sources):
            raise ValueError("data.kind is sft but a source sets format: preference; use data.kind: dpo")

    @property
    def prompt_budget(self) -> int:
        """DPO: the most prompt tokens kept when a pair has to be truncated."""
        return self.max_prompt_len if self.max_prompt_len is not None else self.max_seq_len // 2


def config_differences(before: Any, after: Any, prefix: str = "", ignore: Sequence[str] = ()) -> list[str]:
    """``key: a -> b`` for every leaf that differs between two plain-data configs (dot paths; keys
    in ``ignore`` are skipped)."""
    if prefix in ignore:
        return []
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in before or key not in after:
                if dotted not in ignore:
                    out.append(f"{dotted}: {before.get(key, '<absent>')!r} -> {after.get(key, '<absent>')!r}")
                continue
            out += config_differences(before[key], after[key], dotted, ignore)
        return out
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)) and len(before) == len(after):
        out = []
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            out += config_differences(a, b, f"{prefix}.{i}", ignore)
        return out
    return [f"{prefix}: {before!r} -> {after!r}"] if before != after else []
