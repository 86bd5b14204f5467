import itertools
import math

import pytest
import torch

from pipeline.evaluation.routing import (
    RoutingStats,
    default_layers,
    document_keys,
    expert_counts,
    hoeffding_radius,
    random_baselines,
    repetition_counts,
    shares,
    token_sources,
    top_k_experts,
    total_variation,
)

# A hand-made trace: 2 rows of 4 tokens, E = 4, top-2 (first choice first).
# Row 0 packs two documents (0, 0 | 1, 1); row 1 is one document and one padding token.
TRACE = [[[0, 1], [0, 2], [0, 3], [2, 1]],
         [[2, 3], [3, 2], [3, 0], [3, 0]]]
DOCS = torch.tensor([[0, 0, 1, 1], [0, 0, 0, -1]])


def logits_for(trace, num_experts=4):
    """Router logits whose top-k is exactly ``trace`` (first choice 2.0, second 1.0, others 0)."""
    flat = [tok for row in trace for tok in row]
    logits = torch.zeros(len(flat), num_experts)
    for t, experts in enumerate(flat):
        for rank, e in enumerate(experts):
            logits[t, e] = 2.0 - rank
    return logits


def test_top_k_experts_reads_the_trace():
    experts = top_k_experts(logits_for(TRACE), 2)
    assert experts.tolist() == [tok for row in TRACE for tok in row]


def test_repetition_counts_match_hand_computation():
    # Consecutive pairs inside one document:
    #   row 0 (t0, t1): [0,1] -> [0,2]  same first, overlap
    #   row 0 (t1, t2): crosses the packed boundary (the same first choice 0 must NOT count)
    #   row 0 (t2, t3): [0,3] -> [2,1]  neither
    #   row 0 t3 -> row 1 t0: crosses rows (first choice 2 in both, must NOT count)
    #   row 1 (t0, t1): [2,3] -> [3,2]  overlap only
    #   row 1 (t1, t2): [3,2] -> [3,0]  same first, overlap
    #   row 1 (t2, t3): t3 is padding (same first choice 3, must NOT count)
    keys = document_keys(DOCS, DOCS.shape)
    same_first, overlap, pairs = repetition_counts(top_k_experts(logits_for(TRACE), 2), keys)
    assert (same_first, overlap, pairs) == (2, 3, 4)


def test_padding_is_excluded():
    assert document_keys(DOCS, DOCS.shape).tolist() == [0, 0, 1, 1, 2, 2, 2, -1]


def test_rows_without_document_ids_are_one_document_each():
    assert document_keys(None, (2, 3)).tolist() == [0, 0, 0, 1, 1, 1]


def test_expert_counts_and_shares_by_hand():
    experts = top_k_experts(logits_for(TRACE), 2)
    valid = document_keys(DOCS, DOCS.shape) >= 0
    # 7 real tokens, 14 slots: expert 0 in r0t0 r0t1 r0t2 r1t2; 1 in r0t0 r0t3; 2 in r0t1 r0t3 r1t0 r1t1;
    # 3 in r0t2 r1t0 r1t1 r1t2.
    counts = expert_counts(experts, 4, valid)
    assert counts.tolist() == [4, 2, 4, 4]
    assert shares(counts).tolist() == pytest.approx([4 / 14, 2 / 14, 4 / 14, 4 / 14])
    assert expert_counts(experts[:, :1], 4, valid).tolist() == [3, 0, 2, 2]


def test_total_variation_by_hand():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    assert total_variation(p, q).item() == pytest.approx(0.5)
    assert total_variation(p, p).item() == 0.0
    assert total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item() == 1.0


@pytest.mark.parametrize("num_experts,k", [(8, 2), (4, 2), (6, 3), (5, 1)])
def test_random_baseline_matches_enumeration(num_experts, k):
    # Every ordered pair of k-subsets is equally likely under a uniform router.
    subsets = list(itertools.combinations(range(num_experts), k))
    overlap = sum(bool(set(a) & set(b)) for a in subsets for b in subsets) / len(subsets) ** 2
    first, topk = random_baselines(num_experts, k)
    assert first == 1 / num_experts
    assert topk == pytest.approx(overlap, abs=1e-12)


def test_random_baseline_mixtral_value():
    # E = 8, k = 2: 1 - C(6,2)/C(8,2) = 13/28, the ~46% the paper's random baseline shows.
    assert random_baselines(8, 2) == (0.125, pytest.approx(13 / 28))


def test_uniform_random_router_sits_at_the_baselines():
    """A router with iid Gaussian logits picks k of E uniformly, independently per token.

    Why the rates are means of iid Bernoulli variables, so Hoeffding applies exactly:
    - same first choice: with f_t iid uniform on E, the differences d_t = f_{t+1} - f_t (mod E) are
      iid uniform (a bijection of the f's), and the indicator is [d_t = 0], p = 1/E.
    - top-k overlap: S_{t+1} is independent of S_1..S_t and uniform, and for any fixed k-set the
      chance to meet it is p; so P(Y_t = 1 | Y_1..Y_{t-1}) = p whatever came before: iid Bernoulli(p).
    Pairs of different documents are never counted, and documents are independent of each other.
    With delta = 1e-6 per check, all checks together fail with probability < 1e-5.
    """
    num_experts, k, batch, seq = 8, 2, 50, 4000
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch * seq, num_experts, generator=gen)
    # Documents of random lengths packed into each row, and some padding at the end of each row.
    doc_ids = torch.cumsum(torch.rand(batch, seq, generator=gen) < 0.01, dim=1)
    doc_ids[:, -37:] = -1  # padding
    keys = document_keys(doc_ids, (batch, seq))
    same_first, overlap, pairs = repetition_counts(top_k_experts(logits, k), keys)
    assert pairs > 0.98 * batch * (seq - 37)  # almost every pair is inside a document

    first_base, topk_base = random_baselines(num_experts, k)
    radius = hoeffding_radius(pairs, 1e-6)
    assert radius < 0.01  # rates checked to within one percentage point
    assert abs(same_first / pairs - first_base) < radius
    assert abs(overlap / pairs - topk_base) < radius

    # Each expert's share of top-k slots: per token a Bernoulli(k/E) indicator, iid over tokens.
    tokens = int((keys >= 0).sum())
    counts = expert_counts(top_k_experts(logits, k), num_experts, keys >= 0)
    share_radius = hoeffding_radius(tokens, 1e-6) / k
    assert (shares(counts) - 1 / num_experts).abs().max().item() < share_radius


def test_a_sticky_router_is_far_above_the_baseline():
    # Guard that the random-router test can fail: a router that repeats its choice 90% of the time.
    gen = torch.Generator().manual_seed(1)
    seq = 20000
    logits = torch.randn(seq, 8, generator=gen)
    keep = torch.rand(seq, generator=gen) < 0.9
    for t in range(1, seq):
        if keep[t]:
            logits[t] = logits[t - 1]
    keys = document_keys(None, (1, seq))
    same_first, _, pairs = repetition_counts(top_k_experts(logits, 2), keys)
    assert same_first / pairs - 0.125 > 10 * hoeffding_radius(pairs, 1e-6)


def test_routing_stats_per_source_and_overall():
    stats = RoutingStats(num_layers=2, num_experts=4, k=2)
    keys = document_keys(DOCS, DOCS.shape)
    layer0 = logits_for(TRACE)
    layer1 = logits_for([[[1, 0]] * 4, [[1, 0]] * 4])  # every token: expert 1 then 0
    stats.add([layer0, layer1], keys, ["code", "chat"])
    summary = stats.summary()
    assert summary["baseline"] == {"same_first": 0.25, "topk_overlap": pytest.approx(5 / 6), "share": 0.25}
    # Layer 0, source "code" is row 0: pairs (t0,t1) same+overlap and (t2,t3) neither.
    code = summary["repetition"]["code"]
    assert code["pairs"] == [2, 2] and code["same_first"] == [0.5, 1.0] and code["topk_overlap"] == [0.5, 1.0]
    everything = summary["repetition"]["all"]
    assert everything["pairs"] == [4, 4]
    assert everything["same_first"] == [0.5, 1.0] and everything["topk_overlap"] == [0.75, 1.0]
    assert summary["expert_share"]["all"][0] == pytest.approx([4 / 14, 2 / 14, 4 / 14, 4 / 14])
    assert summary["expert_share"]["chat"][1] == [0.5, 0.5, 0.0, 0.0]
    assert summary["first_choice_share"]["code"][0] == [0.75, 0.0, 0.25, 0.0]


def test_token_sources_by_document():
    # Row 0 packs a "code" then a "chat" document; row 1 is one "chat" document and padding.
    names, index = token_sources([["code", "chat"], "chat"], DOCS, DOCS.shape)
    assert names == ["chat", "code"]
    assert index.tolist() == [1, 1, 0, 0, 0, 0, 0, -1]
    assert token_sources(["code", "chat"], None, (2, 2))[1].tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="document id 1 but 1 document sources"):
        token_sources([["code"], "chat"], DOCS, DOCS.shape)
    with pytest.raises(ValueError, match="need the batch's document_ids"):
        token_sources([["code", "chat"], "chat"], None, DOCS.shape)
    with pytest.raises(ValueError, match="3 row sources for 2 rows"):
        token_sources(["a", "b", "c"], DOCS, DOCS.shape)


def test_routing_stats_split_a_mixed_row_by_document():
    """Per-document sources give each source exactly what its documents alone give."""
    layer1 = [[[1, 0]] * 4, [[1, 0]] * 4]
    packed = RoutingStats(num_layers=2, num_experts=4, k=2)
    packed.add([logits_for(TRACE), logits_for(layer1)], document_keys(DOCS, DOCS.shape),
               [["code", "chat"], ["chat"]], DOCS)
    # The same three documents, each as its own row (padding to width 3).
    alone_trace = [[TRACE[0][0], TRACE[0][1], [0, 1]], [TRACE[0][2], TRACE[0][3], [0, 1]], TRACE[1][:3]]
    alone_docs = torch.tensor([[0, 0, -1], [0, 0, -1], [0, 0, 0]])
    alone = RoutingStats(num_layers=2, num_experts=4, k=2)
    alone.add([logits_for(alone_trace), logits_for([[[1, 0]] * 3] * 3)], document_keys(alone_docs, (3, 3)),
              ["code", "chat", "chat"])
    assert set(packed.counts) == set(alone.counts) == {"code", "chat"}
    for table in ("counts", "first_counts", "pairs"):
        for source in ("code", "chat"):
            assert torch.equal(getattr(packed, table)[source], getattr(alone, table)[source]), (table, source)
    # By hand, layer 0: "code" = r0 t0, t1 -> slots {0, 1} and {0, 2}; one pair, same first and overlap.
    assert packed.counts["code"][0].tolist() == [2, 1, 1, 0]
    assert packed.pairs["code"][0].tolist() == [1, 1, 1]
    # "chat" = r0 t2, t3 (pair: neither) + r1 t0..t2 (pairs: overlap only; same first and overlap).
    assert packed.counts["chat"][0].tolist() == [2, 1, 3, 4]
    assert packed.pairs["chat"][0].tolist() == [1, 2, 3]
    # A row-level source (the first document's) would put r0 t2, t3 under "code" instead.
    by_row = RoutingStats(num_layers=2, num_experts=4, k=2)
    by_row.add([logits_for(TRACE), logits_for(layer1)], document_keys(DOCS, DOCS.shape), ["code", "chat"])
    assert not torch.equal(by_row.counts["code"], packed.counts["code"])


def test_routing_stats_rejects_wrong_layer_count():
    stats = RoutingStats(num_layers=3, num_experts=4, k=2)
    with pytest.raises(ValueError, match="3 layers"):
        stats.add([logits_for(TRACE)], document_keys(DOCS, DOCS.shape), ["a", "b"])


@pytest.mark.parametrize("layers,expected", [(32, [0, 15, 31]), (4, [0, 1, 3]), (2, [0, 1]), (1, [0])])
def test_default_layers_first_middle_last(layers, expected):
    assert default_layers(layers) == expected


def test_hoeffding_radius_formula():
    assert hoeffding_radius(1000, 0.05) == pytest.approx(math.sqrt(math.log(40) / 2000))


def test_routing_stats_with_a_uniform_router_report_the_baselines():
    # The same iid-Bernoulli argument as above, per layer and per source, through RoutingStats.
    gen = torch.Generator().manual_seed(2)
    batch, seq, layers, num_experts, k = 8, 6000, 2, 8, 2
    stats = RoutingStats(layers, num_experts, k)
    doc_ids = torch.cumsum(torch.rand(batch, seq, generator=gen) < 0.005, dim=1)
    keys = document_keys(doc_ids, (batch, seq))
    logits = [torch.randn(batch * seq, num_experts, generator=gen) for _ in range(layers)]
    stats.add(logits, keys, ["a", "b"] * (batch // 2))
    summary = stats.summary()
    for source in ("a", "b", "all"):
        rep = summary["repetition"][source]
        for layer in range(layers):
            radius = hoeffding_radius(rep["pairs"][layer], 1e-6)
            assert abs(rep["same_first"][layer] - 1 / 8) < radius
            assert abs(rep["topk_overlap"][layer] - 13 / 28) < radius
    assert summary["repetition"]["all"]["pairs"][0] == sum(summary["repetition"][s]["pairs"][0] for s in "ab")
