"""Reading what `python -m pipeline.prep` wrote: the train/ and eval/ splits of data.output_dir."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data_prep.config import NOT_IN_OUTPUT, DataConfig, config_differences

# Columns each kind of prepared dataset must have (docs/interfaces.md).
COLUMNS = {
    "sft": ("input_ids", "labels", "position_ids", "document_ids"),
    "dpo": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
}


class PreparedDataError(ValueError):
    """data.output_dir does not hold what the recipe's `data:` section prepares; the message says
    which command fixes it. The same on every rank of a launch."""


def prepared_manifest(data: DataConfig, *, stage: str) -> dict:
    """The manifest of ``data.output_dir``, checked against ``data`` (kind and every key that
    changes the rows); raises PreparedDataError naming the differences."""
    root = Path(data.output_dir)
    fix = f"run `python -m pipeline.prep <recipe>` with this recipe (make {stage} does)"
    path = root / "manifest.json"
    if not path.is_file() or not (root / "train").is_dir():
        raise PreparedDataError(f"data.output_dir {root} holds no prepared data (no manifest.json or train/): {fix}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PreparedDataError(f"{path}: unreadable ({err}): {fix}") from err
    prepared = manifest.get("data") or {}
    if prepared.get("kind", manifest.get("kind")) != data.kind:
        raise PreparedDataError(
            f"data.output_dir {root} holds data.kind {manifest.get('kind')!r} rows, the {stage} stage needs "
            f"{data.kind!r}: {fix}"
        )
    diffs = config_differences(prepared, dataclasses.asdict(data), "data", [f"data.{k}" for k in NOT_IN_OUTPUT])
    if diffs:
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise PreparedDataError(
            f"data.output_dir {root} was prepared from a different data section (prepared -> recipe: {shown}): {fix}"
        )
    return manifest


def eval_rows(manifest: dict) -> int:
    return int(manifest.get("stats", {}).get("eval", {}).get("rows", 0))


def load_prepared(data: DataConfig, *, stage: str):
    """(train, eval or None) from ``data.output_dir``, after :func:`prepared_manifest`'s checks.

    An empty eval split is None: prep writes no eval/ for it (datasets cannot load a split of 0 rows
    back), and directories from before that may hold one that is never read.
    """
    import datasets

    manifest = prepared_manifest(data, stage=stage)
    root = Path(data.output_dir)
    train = datasets.load_from_disk(str(root / "train"))
    missing = [c for c in COLUMNS[data.kind] if c not in train.column_names]
    if missing:
        raise PreparedDataError(
            f"{root}/train lacks the {data.kind.upper()} columns {missing} (has {train.column_names}): run "
            f"`python -m pipeline.prep <recipe>` (make {stage} does)"
        )
    eval_set = None
    if eval_rows(manifest) > 0 and (root / "eval").is_dir():
        eval_set = datasets.load_from_disk(str(root / "eval"))
    return train, eval_set


def no_eval_note(data: DataConfig) -> str:
    """The one line a training stage prints when the prepared eval split is empty."""
    has_eval_source = any(s.role == "eval" for s in data.sources)
    if data.eval_fraction == 0 and not has_eval_source:
        why = "data.eval_fraction is 0 and no source has role: eval"
    else:
        why = f"every held-out example was rejected or a duplicate, see {Path(data.output_dir) / 'report.md'}"
    return (f"no eval rows in {data.output_dir} ({why}); training without eval: set data.eval_fraction "
            "(e.g. 0.05) or add a `role: eval` source to get an eval loss")
