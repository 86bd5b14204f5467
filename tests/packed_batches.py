"""The batches that the CPU host-sync counts (tests/model) and the CUDA tests (tests/gpu) both run,
so that the two count and compare the same step.

Imported by name from any test directory: tests/conftest.py puts this folder on sys.path.
"""

import torch


def packed_rows(vocab: int = 300, device: torch.device | str = "cpu"):
    """Two rows of 48 tokens: three documents and a run of padding (document id -1), then one
    document filling the row. -> input_ids, document_ids, position_ids, labels (-100 on padding),
    drawn on the CPU from seed 0 (the same values on every device), then moved to `device`."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 48))
    docs = torch.tensor([[0] * 7 + [1] * 20 + [2] * 15 + [-1] * 6, [0] * 48])
    positions = torch.stack([
        torch.cat([torch.arange(7), torch.arange(20), torch.arange(15), torch.zeros(6, dtype=torch.long)]),
        torch.arange(48),
    ])
    labels = torch.where(docs >= 0, ids, -100)
    return tuple(t.to(device) for t in (ids, docs, positions, labels))


def preference_rows() -> list[dict]:
    """Three DPO pairs (prepared rows, before collation): a 4-token prompt, chosen answers of 9, 14
    and 6 tokens, rejected answers of 5."""
    rows = []
    for length in (9, 14, 6):
        prompt, chosen, rejected = [1, 5, 6, 7], list(range(10, 10 + length)), list(range(40, 45))
        rows.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * 4 + chosen,
                     "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * 4 + rejected})
    return rows
