"""Rows of at most ``max_seq_len`` tokens: best-fit-decreasing packing, or one example per row.

A packed row concatenates whole documents; ``position_ids`` restart at 0 for each document and
``document_ids`` number them 0, 1, 2 ... within the row, so attention never crosses documents.
Every document starts with BOS whose label is -100, so no label asks a document to predict the
next one's first token.

Rows mix sources (the mixture is shuffled before it is packed), so each row carries
``document_sources``, the source of each of its documents in ``document_ids`` order: a token's
source is ``document_sources[document_ids[t]]``. ``source`` (the first document's) stays for
readers that want one label per row; per-source numbers must not use it.
"""

from __future__ import annotations

import bisect


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices: longest first, each into the fullest bin it still fits in.

    Open bins sit in a list sorted by (space left, bin id); the best fit for a length L is the
    first entry with space >= L, found by bisection.
    """
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the row capacity {capacity}; apply the length policy first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (space left, bin id), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(space, (n, -1))
        if at < len(space):
            left, b = space.pop(at)
        else:
            left, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - n > 0:
            bisect.insort(space, (left - n, b))
    return bins


def build_rows(examples: list[dict], groups: list[list[int]]) -> dict[str, list]:
    """Columns of the packed rows; ``examples`` hold input_ids, labels and source."""
    rows = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": [], "source": [],
            "document_sources": [], "num_documents": []}
    for group in groups:
        input_ids, labels, positions, documents = [], [], [], []
        for doc, i in enumerate(group):
            ids = examples[i]["input_ids"]
            input_ids += ids
            labels += examples[i]["labels"]
            positions += range(len(ids))
            documents += [doc] * len(ids)
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
        rows["document_ids"].append(documents)
        rows["source"].append(examples[group[0]]["source"])
        rows["document_sources"].append([examples[i]["source"] for i in group])
        rows["num_documents"].append(len(group))
    return rows


def pack(examples: list[dict], max_seq_len: int, packing: bool = True) -> dict[str, list]:
    """Packed rows (best fit decreasing), or one example per row when ``packing`` is False."""
    if packing:
        groups = best_fit_decreasing([len(e["input_ids"]) for e in examples], max_seq_len)
    else:
        groups = [[i] for i in range(len(examples))]
    return build_rows(examples, groups)
