"""Attention per document on packed and padded rows (model.attention) against the [B, 1, S, S] mask path."""

import warnings

import pytest
import torch

from model import Mixtral, MixtralConfig
from model.attention import (
    Attention,
    BatchLayout,
    BucketLayout,
    DocumentLayout,
    FlexLayout,
    VarlenLayout,
    batch_layout,
    build_attention_mask,
    rope_cos_sin,
)

CPU = torch.device("cpu")


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


def layout_for(docs, backend, sliding_window=None):
    return batch_layout(*docs.shape, CPU, docs, sliding_window, backend)


@pytest.fixture(scope="module")
def attention():
    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny-odd")  # kv heads < heads
    return cfg, Attention(cfg)


def outputs_and_grads(attn, x, cos, sin, how, real):
    """Attention output and gradients under an upstream gradient that is zero on padding (as in the
    model: nothing downstream reads a padding token's output)."""
    xi = x.clone().requires_grad_()
    attn.zero_grad()
    out = attn(xi, cos, sin, how)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out) * real[..., None]
    (out * weight).sum().backward()
    return out[real], xi.grad, [p.grad.clone() for p in attn.parameters()]


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flex"])
def test_each_kernel_equals_the_mask_path(attention, backend, request):
    cfg, attn = attention
    docs, positions = packed_batch(ROWS, 120)
    layout = layout_for(docs, backend).attention
    assert isinstance(layout, {"sdpa": BucketLayout, "varlen": VarlenLayout, "flex": FlexLayout}[backend])
    if backend == "sdpa":
        assert len(layout.buckets) >= 4
    if backend == "varlen":  # no CPU kernel in torch: its documented semantics stand in for it here
        request.getfixturevalue("varlen_on_cpu")
    mask = build_attention_mask(*docs.shape, CPU, docs)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(*docs.shape, cfg.hidden_size)
    real = docs >= 0
    want = outputs_and_grads(attn, x, cos, sin, mask, real)
    if backend == "flex":  # FlexAttention has no backward on the CPU (tests/gpu runs it): forward only
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager Flex warns that it is unfused
            got = attn(x, cos, sin, layout)[real]
        torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
        return
    got = outputs_and_grads(attn, x, cos, sin, layout, real)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1][real], want[1][real], atol=1e-6, rtol=1e-5)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_varlen_layout_segments_and_window():
    docs = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, 0, 0]])
    layout = layout_for(docs, "varlen", sliding_window=4)
    # Segments of the 14 flattened tokens: the two documents, the padding run, the second row.
    assert layout.attention.cu_seqlens.tolist() == [0, 3, 5, 7, 14]
    assert layout.attention.cu_seqlens.dtype == torch.int32
    assert layout.attention.max_len == 7
    assert layout.attention.window == (3, 0)  # flash counts the keys left of the query
    assert layout.real_tokens.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13]
    assert layout_for(docs, "varlen").attention.window == (-1, 0)


def test_model_on_packed_rows_equals_the_mask_path():
    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 300
    model = Mixtral(cfg)
    docs, positions = packed_batch(ROWS, 120)
    ids = torch.randint(0, 300, docs.shape)
    logits = {}
    for backend in ("sdpa", "mask"):
        model.attention_backend = backend
        with torch.no_grad():
            logits[backend] = model(ids, position_ids=positions, document_ids=docs).logits
    real_tokens = docs >= 0
    torch.testing.assert_close(logits["sdpa"][real_tokens], logits["mask"][real_tokens], atol=1e-5, rtol=1e-5)


def test_right_padded_rows_attend_through_the_layout_not_a_mask():
    docs = torch.tensor([[0, 0, 0, -1], [0, 0, 0, 0]])  # padding: document id -1
    for backend in ("sdpa", "varlen"):
        layout = batch_layout(2, 4, CPU, docs, backend=backend)
        assert not isinstance(layout.attention, torch.Tensor)
        assert layout.real_tokens.tolist() == [0, 1, 2, 4, 5, 6, 7]
    # Nothing to read: no document ids, no padding.
    assert batch_layout(2, 4, CPU).attention is None


def test_layout_falls_back_to_the_mask_where_only_the_mask_is_exact():
    def is_mask(docs, sliding_window=None, backend="sdpa"):
        return isinstance(layout_for(docs, backend, sliding_window).attention, torch.Tensor)

    for backend in ("sdpa", "varlen", "flex"):
        # A document id that comes back later in the row: the mask lets both runs see each other.
        assert is_mask(torch.tensor([[0, 0, 1, 1, 0, 0]]), backend=backend)
        assert not is_mask(torch.tensor([[0, 0, 0, 1, 1, -1]]), backend=backend)
        # The same document id in two rows is two documents.
        assert not is_mask(torch.tensor([[0, 0, 0], [0, 0, -1]]), backend=backend)
    # A sliding window shorter than a document: only varlen and flex take windows.
    docs = torch.tensor([[0, 0, 0, 1, 1, -1]])
    assert is_mask(docs, sliding_window=2)
    assert not is_mask(docs, sliding_window=3)
    assert not is_mask(docs, sliding_window=2, backend="varlen")


def test_sliding_window_kernels_equal_the_mask(attention, varlen_on_cpu):
    cfg, attn = attention
    docs, positions = packed_batch([[20, 9], [29]], 29)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(*docs.shape, cfg.hidden_size)
    mask = build_attention_mask(*docs.shape, CPU, docs, sliding_window=6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = attn(x, cos, sin, mask)
        for backend in ("varlen", "flex"):
            got = attn(x, cos, sin, layout_for(docs, backend, sliding_window=6).attention)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=backend)


def test_all_padding_and_single_token_documents(attention):
    cfg, attn = attention
    docs = torch.tensor([[-1, -1, -1], [0, 1, -1]])
    positions = torch.zeros_like(docs)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(2, 3, cfg.hidden_size)
    mask = build_attention_mask(2, 3, CPU, docs)
    real = docs >= 0
    with torch.no_grad():
        got = attn(x, cos, sin, layout_for(docs, "sdpa").attention)
        torch.testing.assert_close(got[real], attn(x, cos, sin, mask)[real], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("max_length", [None, 11, 64])
def test_kv_cache_decoding_gives_the_full_forward_logits(max_length):
    from model import KVCache

    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny-odd")  # kv heads < heads, 3 layers
    cfg.vocab_size = 300
    model = Mixtral(cfg)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        full = model(ids).logits  # [2, 11, V]
        cache = KVCache(cfg.num_hidden_layers, max_length=max_length)
        # Prompt of 5, then 1 token, then a block of 3 (keys outnumber queries), then 2 single tokens.
        pieces = [model(ids[:, a:b], kv_cache=cache).logits for a, b in ((0, 5), (5, 6), (6, 9), (9, 10), (10, 11))]
    assert cache.length == 11
    # A buffer written in place: sized once when told the length, grown by doubling otherwise.
    assert cache.layers[0].keys.shape[2] == {None: 20, 11: 11, 64: 64}[max_length]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_a_sliding_window_follows_the_windowed_forward():
    from model import KVCache

    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size, cfg.sliding_window = 300, 4
    model = Mixtral(cfg)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(cfg.num_hidden_layers)
        pieces = [model(ids[:, a:b], kv_cache=cache).logits for a, b in ((0, 3), (3, 7), (7, 8), (8, 12))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_prefill_computes_only_the_logits_it_keeps():
    torch.manual_seed(0)
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 300
    model = Mixtral(cfg)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 300)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_kv_cache_refuses_padding_and_packing():
    from model import KVCache

    cfg = MixtralConfig.preset("tiny")
    model = Mixtral(cfg)
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), document_ids=torch.zeros(1, 3, dtype=torch.long),
              kv_cache=KVCache(cfg.num_hidden_layers))


class _RecordingLayout(DocumentLayout):
    """Records the dtypes a per-document kernel receives (varlen and Flex refuse mixed ones)."""

    def __init__(self):
        self.seen = []

    def attend(self, q, k, v, *, enable_gqa):
        self.seen.append((q.dtype, k.dtype, v.dtype))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=enable_gqa
        ).transpose(1, 2)


def test_an_fp32_model_under_autocast_hands_the_kernel_one_dtype():
    """recipes/tiny/sft.yaml on a GPU: an fp32 model, mixed_precision bf16 (autocast), varlen."""
    config = MixtralConfig.preset("tiny")
    model = Mixtral(config)
    recording = _RecordingLayout()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, layout=BatchLayout(recording))
    assert recording.seen == [(torch.bfloat16,) * 3] * config.num_hidden_layers
