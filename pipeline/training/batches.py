"""Row collation shared by the stages that read SFT-format token rows (SFT training, evaluation).

The batch contract (docs/interfaces.md): right padding, padded positions marked by document id -1
and label IGNORE_INDEX; any valid token id pads input_ids.
"""

from __future__ import annotations

import torch

from model.losses import IGNORE_INDEX

# Mixtral has no pad id; padded positions are masked out everywhere, so any valid id works.
PAD_ID = 0


def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Packed rows of different lengths -> right-padded [B, S] tensors; padding: document id -1 (the
    model's one padding encoding), label IGNORE_INDEX.

    Rows without position_ids / document_ids (one conversation per row) get 0..n-1 and document 0.
    """
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), PAD_ID, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
        "document_ids": torch.full((len(rows), width), -1, dtype=torch.long),
    }
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        batch["labels"][i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        batch["position_ids"][i, :n] = torch.as_tensor(row.get("position_ids") or range(n), dtype=torch.long)
        batch["document_ids"][i, :n] = torch.as_tensor(row.get("document_ids") or [0] * n, dtype=torch.long)
    return batch
