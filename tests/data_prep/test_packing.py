"""Best-fit-decreasing packing: whole documents, restarting positions, no cross-document ids."""

import random

import pytest

from data_prep.pack import best_fit_decreasing, pack


def test_best_fit_picks_the_fullest_bin_that_fits():
    # Sorted: 6, 5, 4, 3, 2 (capacity 10). 6 -> bin0 (4 left); 5 -> bin1 (5 left);
    # 4 -> bin0 (best fit: 4 left < 5 left) -> full; 3 -> bin1 (2 left); 2 -> bin1 (full).
    assert best_fit_decreasing([3, 6, 2, 5, 4], 10) == [[1, 4], [3, 0, 2]]


def test_rejects_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="longer than the row capacity"):
        best_fit_decreasing([5, 11], 10)


def _examples(rng, n, max_len):
    out = []
    for i in range(n):
        length = rng.randint(2, max_len)
        ids = [1] + [1000 * i + j for j in range(1, length)]
        labels = [-100] + [t if j % 2 else -100 for j, t in enumerate(ids[1:])]
        out.append({"input_ids": ids, "labels": labels, "source": f"src{i % 3}"})
    return out


def test_packed_rows_keep_every_document_whole():
    rng = random.Random(0)
    examples = _examples(rng, 300, 64)
    rows = pack(examples, max_seq_len=64)
    seen = []
    for r in range(len(rows["input_ids"])):
        ids, labels = rows["input_ids"][r], rows["labels"][r]
        pos, doc = rows["position_ids"][r], rows["document_ids"][r]
        assert len(ids) == len(labels) == len(pos) == len(doc) <= 64
        starts = [k for k in range(len(ids)) if pos[k] == 0]
        assert starts[0] == 0 and rows["num_documents"][r] == len(starts)
        for d, (start, end) in enumerate(zip(starts, starts[1:] + [len(ids)], strict=True)):
            assert doc[start:end] == [d] * (end - start)  # one id per document, numbered in order
            assert pos[start:end] == list(range(end - start))  # positions restart per document
            # a document is one example, whole: the owner of its first token owns all of it
            owner = ids[start + 1] // 1000 if end - start > 1 else None
            match = [e for e in examples if e["input_ids"] == ids[start:end] and e["labels"] == labels[start:end]]
            assert match, f"row {r} document {d} is not an example"
            assert rows["document_sources"][r][d] == match[0]["source"]  # each document keeps its own source
            if owner is not None:
                assert all(t // 1000 == owner for t in ids[start + 1 : end])
            seen.append(tuple(ids[start:end]))
        assert len(rows["document_sources"][r]) == len(starts)
        assert rows["source"][r] == rows["document_sources"][r][0]  # the first document's, as before
    assert sorted(seen) == sorted(tuple(e["input_ids"]) for e in examples)  # each exactly once
    # Rows do mix sources here, so a row-level source would misattribute documents.
    assert any(len(set(sources)) > 1 for sources in rows["document_sources"])


def test_packing_is_dense_and_padding_only_mode_is_one_per_row():
    rng = random.Random(1)
    examples = _examples(rng, 500, 40)
    tokens = sum(len(e["input_ids"]) for e in examples)
    packed = pack(examples, max_seq_len=128)
    assert tokens / (len(packed["input_ids"]) * 128) > 0.95
    single = pack(examples, max_seq_len=128, packing=False)
    assert single["input_ids"] == [e["input_ids"] for e in examples]
    assert all(set(d) == {0} for d in single["document_ids"])
    assert single["num_documents"] == [1] * len(examples)
    assert single["document_sources"] == [[e["source"]] for e in examples]
