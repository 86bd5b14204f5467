"""Reading what `python -m pipeline.prep` wrote: the train/ and eval/ splits of data.output_dir."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

# Columns each kind of prepared dataset must have (docs/interfaces.md).
COLUMNS = {
    "sft": ("input_ids", "labels", "position_ids", "document_ids"),
    "dpo": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
}


def load_prepared(output_dir: str | os.PathLike, *, kind: Literal["sft", "dpo"], stage: str):
    """(train, eval or None) from a prep output dir, with errors that say which command fixes them."""
    import datasets

    root = Path(output_dir)
    if not (root / "train").is_dir():
        raise FileNotFoundError(
            f"{root}/train not found: run `python -m pipeline.prep <recipe>` first (make {stage} does)"
        )
    train = datasets.load_from_disk(str(root / "train"))
    missing = [c for c in COLUMNS[kind] if c not in train.column_names]
    if missing:
        raise ValueError(
            f"{root}/train lacks the {kind.upper()} columns {missing} (has {train.column_names}): was it "
            f"prepared with data.kind: {kind}?"
        )
    eval_set = datasets.load_from_disk(str(root / "eval")) if (root / "eval").is_dir() else None
    if eval_set is not None and len(eval_set) == 0:
        eval_set = None
    return train, eval_set
