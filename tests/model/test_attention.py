"""Attention per document on packed rows (DocumentLayout) against the [B, 1, S, S] mask path."""

import pytest
import torch

from model import Mixtral, MixtralConfig
from model.attention import Attention, DocumentLayout, build_attention_mask, document_layout, rope_cos_sin


def packed_batch(lengths_per_row: list[list[int]], width: int):
    """document_ids / position_ids [B, width] for rows holding documents of these lengths, then padding."""
    docs = torch.full((len(lengths_per_row), width), -1)
    positions = torch.zeros((len(lengths_per_row), width), dtype=torch.long)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for doc, n in enumerate(lengths):
            docs[row, start : start + n] = doc
            positions[row, start : start + n] = torch.arange(n)
            start += n
    return docs, positions


# Lengths across several buckets (1, <= 16, 17-32, 33-64, > 64), padding at row ends, a full row.
ROWS = [[5, 40, 1, 17, 9], [100, 3], [30, 33, 16, 24, 17]]


@pytest.fixture(scope="module")
def attention():
    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny-odd")  # kv heads < heads
    return cfg, Attention(cfg)


def test_layout_equals_mask_outputs_and_grads(attention):
    cfg, attn = attention
    docs, positions = packed_batch(ROWS, 120)
    layout = document_layout(docs)
    assert isinstance(layout, DocumentLayout) and len(layout.buckets) >= 4
    mask = build_attention_mask(*docs.shape, torch.device("cpu"), docs)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(*docs.shape, cfg.hidden_size)
    results = []
    for how in (layout, mask):
        xi = x.clone().requires_grad_()
        attn.zero_grad()
        out = attn(xi, cos, sin, how)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, xi.grad, [p.grad.clone() for p in attn.parameters()]))
    (out_l, dx_l, dw_l), (out_m, dx_m, dw_m) = results
    torch.testing.assert_close(out_l, out_m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx_l, dx_m, atol=1e-6, rtol=1e-5)
    for a, b in zip(dw_l, dw_m, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_on_packed_rows_equals_the_mask_path(monkeypatch):
    import model.transformer as transformer

    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 300
    model = Mixtral(cfg)
    docs, positions = packed_batch(ROWS, 120)
    ids = torch.randint(0, 300, docs.shape)
    assert document_layout(docs) is not None
    with torch.no_grad():
        via_layout = model(ids, position_ids=positions, document_ids=docs).logits
    monkeypatch.setattr(transformer, "document_layout", lambda *args, **kwargs: None)  # force the mask
    with torch.no_grad():
        via_mask = model(ids, position_ids=positions, document_ids=docs).logits
    real_tokens = docs >= 0
    torch.testing.assert_close(via_layout[real_tokens], via_mask[real_tokens], atol=1e-5, rtol=1e-5)


def test_layout_declines_where_only_the_mask_is_exact():
    # A document id that comes back later in the row: the mask lets both runs see each other.
    assert document_layout(torch.tensor([[0, 0, 1, 1, 0, 0]])) is None
    # attention_mask hiding a token of a document.
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert document_layout(docs, torch.tensor([[1, 0, 1, 1, 1, 0]])) is None
    assert document_layout(docs, torch.tensor([[1, 1, 1, 1, 1, 0]])) is not None
    # A sliding window shorter than a document.
    assert document_layout(docs, sliding_window=2) is None
    assert document_layout(docs, sliding_window=3) is not None
    # The same document id in two rows is two documents.
    assert document_layout(torch.tensor([[0, 0, 0], [0, 0, -1]])) is not None


def test_all_padding_and_single_token_documents(attention):
    cfg, attn = attention
    docs = torch.tensor([[-1, -1, -1], [0, 1, -1]])
    positions = torch.zeros_like(docs)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(2, 3, cfg.hidden_size)
    mask = build_attention_mask(2, 3, torch.device("cpu"), docs)
    with torch.no_grad():
        torch.testing.assert_close(
            attn(x, cos, sin, document_layout(docs)), attn(x, cos, sin, mask), atol=1e-6, rtol=1e-5
        )


def test_kv_cache_decoding_gives_the_full_forward_logits():
    from model import KVCache

    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny-odd")  # kv heads < heads, 3 layers
    cfg.vocab_size = 300
    model = Mixtral(cfg)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        full = model(ids).logits  # [2, 11, V]
        cache = KVCache(cfg.num_hidden_layers)
        # Prompt of 5, then 1 token, then a block of 3 (keys outnumber queries), then 2 single tokens.
        pieces = [model(ids[:, a:b], kv_cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11))]
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_refuses_padding_and_packing():
    from model import KVCache

    cfg = MixtralConfig.preset("tiny")
    model = Mixtral(cfg)
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), document_ids=torch.zeros(1, 3, dtype=torch.long),
              kv_cache=KVCache(cfg.num_hidden_layers))
