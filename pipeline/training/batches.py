"""Row collation: SFT-format token rows (SFT training, evaluation) and preference pairs (DPO).

The batch contract (docs/interfaces.md): right padding, padded positions marked by document id -1
and label IGNORE_INDEX; any valid token id pads input_ids.
"""

from __future__ import annotations

import torch

from model.losses import IGNORE_INDEX

# Mixtral has no pad id; padded positions are masked out everywhere, so any valid id works.
PAD_ID = 0
# Reference log-probs a preference row may carry (precomputed, pipeline/training/reference_cache.py).
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


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


def collate_pairs(rows: list[dict]) -> dict[str, torch.Tensor]:
    """B preference rows -> one right-padded batch of 2B rows, ``[chosen; rejected]``.

    input_ids/labels [2B, S]; document_ids [2B, S] (0 on each sequence, -1 on its padding: the
    model's one padding encoding), which the model attends through per sequence (variable-length kernels, no
    [2B, 1, S, S] mask); with precomputed reference log-probs in the rows also
    ref_chosen_logps/ref_rejected_logps [B].
    """
    seqs = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    seqs += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    width = max(len(ids) for ids, _ in seqs)
    batch = {
        "input_ids": torch.full((len(seqs), width), PAD_ID, dtype=torch.long),
        "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
        "document_ids": torch.full((len(seqs), width), -1, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(seqs):
        batch["input_ids"][i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        batch["labels"][i, : len(labels)] = torch.as_tensor(labels, dtype=torch.long)
        batch["document_ids"][i, : len(ids)] = 0
    if all(name in rows[0] for name in REF_COLUMNS):
        for name in REF_COLUMNS:
            batch[name] = torch.tensor([r[name] for r in rows], dtype=torch.float32)
    return batch
