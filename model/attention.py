"""RMSNorm, rotary embeddings, grouped-query attention, the per-batch layout of packed rows, the KV cache.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, nh query heads, nkv key/value heads,
D head dim.

Packed rows (many documents per row, `document_ids`) and right-padded rows (padding: document id
-1, the one padding encoding of a batch) attend per document:
`batch_layout` reads where the documents lie once per batch (one host sync) and every layer
reuses it, through one of three kernels that give the same keys per query as the
[B, 1, S, S] mask of `build_attention_mask` (tests compare them):

- "varlen": torch's variable-length flash attention on the flattened tokens (CUDA, bf16/fp16);
- "flex": FlexAttention with a document block mask (compiled blocks; forward also on the CPU);
- "sdpa": documents cut out and run in batches of similar length through causal SDPA (the CPU's
  path, and the fallback everywhere).

The mask itself is used only where nothing else is exact (a document split in two runs of its row,
a sliding window shorter than a document on "sdpa").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("auto", "varlen", "flex", "sdpa", "mask")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as Mixtral/HF do, for bf16 parity).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> cos, sin [B, S, D], computed in fp32 then cast to `dtype`.

    Rotates pair (j, j + D/2) by position * theta^(-2j/D) (HF's rotate_half convention).
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, S, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, n, D], cos/sin [B, S, D] -> [B, S, n, D] in x's dtype.

    Under autocast an fp32 model's q/k come out of their projections in bf16 while cos/sin stay
    fp32: the product would promote q and k back to fp32 beside a bf16 v, which the flash-based
    kernels (varlen, Flex) refuse. The result is cast back, as the bf16 model computes it."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, S, n, D/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, S, n, D]
    return (x * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def build_attention_mask(
    batch: int,
    seq: int,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, S, S] (True = may attend), or None when plain causal attention is exact.

    Causal; within one document only (document_ids); never onto padding keys (document id < 0);
    within `sliding_window` tokens. Every query may attend to itself so that rows
    of padding never see an all-masked row (which would give NaN in softmax and in gradients).
    """
    needs_window = sliding_window is not None and seq > sliding_window
    if document_ids is None and not needs_window:
        return None
    q = torch.arange(seq, device=device)
    allowed = (q[None, :] <= q[:, None])[None]  # [1, S, S] key index <= query index
    if needs_window:
        allowed = allowed & (q[:, None] - q[None, :] < sliding_window)[None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])  # [B, S, S]
        allowed = allowed & (document_ids >= 0)[:, None, :]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return allowed.expand(batch, seq, seq)[:, None]  # [B, 1, S, S]


# ---- the per-batch layout ----------------------------------------------------------------


class DocumentLayout:
    """Attention within each document of packed or padded rows; `attend` is what a layer calls.

    Padding tokens (document id < 0) get outputs no real token ever reads (each kernel treats them
    its own way); the MoE skips them and the loss ignores them.
    """

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, enable_gqa: bool) -> torch.Tensor:
        """q [B, S, nh, D], k/v [B, S, nkv, D] -> [B, S, nh, D]."""
        raise NotImplementedError


class VarlenLayout(DocumentLayout):
    """Segments of the flattened [B*S] tokens (documents, and each row's runs of padding) for
    `torch.nn.attention.varlen.varlen_attn`: no copies, no padding, one kernel per layer."""

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int, sliding_window: int | None):
        self.cu_seqlens = cu_seqlens  # [n_seg + 1] int32: where each segment starts, then T
        self.max_len = max_len  # longest segment (host int: sizes the kernel's grid)
        # flash's window counts the keys left of the query; the mask's window includes the query.
        self.window = (-1 if sliding_window is None else sliding_window - 1, 0)

    def attend(self, q, k, v, *, enable_gqa):
        from torch.nn.attention.varlen import varlen_attn

        B, S, nh, D = q.shape
        flat_q, flat_k, flat_v = (t.reshape(B * S, t.shape[2], D) for t in (q, k, v))  # [T, n, D]
        out = varlen_attn(flat_q, flat_k, flat_v, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len,
                          window_size=self.window, enable_gqa=enable_gqa)  # [T, nh, D]
        return out.view(B, S, nh, D)


class FlexLayout(DocumentLayout):
    """A FlexAttention block mask over each row's segments (documents and padding runs), built once
    per batch. Fused only inside compiled code (`model.compile`); eager FlexAttention materialises
    the scores, and it has no backward on the CPU."""

    def __init__(self, segment_ids: torch.Tensor, sliding_window: int | None):
        from torch.nn.attention.flex_attention import create_block_mask

        B, S = segment_ids.shape
        window = S if sliding_window is None else sliding_window

        def same_segment_causal(b, h, q_idx, kv_idx):
            return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < window)

        self.block_mask = create_block_mask(same_segment_causal, B, None, S, S, device=segment_ids.device)

    def attend(self, q, k, v, *, enable_gqa):
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             block_mask=self.block_mask, enable_gqa=enable_gqa)  # [B, nh, S, D]
        return out.transpose(1, 2)


class BucketLayout(DocumentLayout):
    """Each document cut out and attended to on its own with causal SDPA: documents of similar length
    (buckets by powers of two, at least MIN_BUCKET) share one call, each padded at its end to the
    bucket's longest document, so padding keys come after every real query and are never seen."""

    MIN_BUCKET = 16

    def __init__(self, buckets: list[tuple[torch.Tensor, torch.Tensor]], inverse: torch.Tensor):
        self.buckets = buckets  # (gather [n, L]: token of each slot, slots [m]: the real slots of the n*L)
        self.inverse = inverse  # [T]: each token's row in the buckets' concatenated output (padding: the last)

    def attend(self, q, k, v, *, enable_gqa):
        B, S, nh, D = q.shape
        flat_q, flat_k, flat_v = (t.reshape(B * S, t.shape[2], D) for t in (q, k, v))  # [T, n, D]
        outs = []
        for gather, slots in self.buckets:
            n, L = gather.shape
            index = gather.reshape(-1)
            q_b, k_b, v_b = (t.index_select(0, index).view(n, L, t.shape[1], D).transpose(1, 2)
                             for t in (flat_q, flat_k, flat_v))  # [n, heads, L, D]
            out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, enable_gqa=enable_gqa)
            outs.append(out.transpose(1, 2).reshape(n * L, nh, D).index_select(0, slots))  # [m, nh, D]
        outs.append(q.new_zeros(1, nh, D))  # what padding tokens get
        return torch.cat(outs).index_select(0, self.inverse).view(B, S, nh, D)

    def outside_compiled_graphs(self) -> BucketLayout:
        """Keep `attend` out of compiled layers (`Mixtral.compile_blocks`): the number and sizes of
        the buckets change with every batch, and each new set would compile the layer again."""
        self.attend = torch.compiler.disable(self.attend)
        return self


@dataclass
class BatchLayout:
    """Where a batch's documents and padding lie: computed once per forward, read by every layer."""

    attention: DocumentLayout | torch.Tensor | None  # per-document kernel, a [B, 1, S, S] mask, or None (causal)
    token_mask: torch.Tensor | None = None  # [T] bool, True = real token; None: every token is real
    real_tokens: torch.Tensor | None = None  # [T_real] long, the flat indices where token_mask is True


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def batch_layout(
    batch: int,
    seq: int,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    backend: str = "sdpa",
) -> BatchLayout:
    """The layout of a batch's rows for `backend` ("varlen", "flex", "sdpa" or "mask").

    document_ids [B, S]: which document of its row each token belongs to, -1 (any negative id) on
    padding; None: every row is one document, no padding. Reads what it needs on the host in one transfer (one device sync per
    batch); the index tensors stay on the device.
    """
    if backend not in ATTENTION_BACKENDS[1:]:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS[1:])}, got {backend!r}")
    window_binds = sliding_window is not None and seq > sliding_window
    if document_ids is None:
        if not window_binds or backend in ("sdpa", "mask"):
            return BatchLayout(build_attention_mask(batch, seq, device, sliding_window=sliding_window))
        document_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    flat = document_ids.reshape(-1).long()  # [T]
    T = flat.numel()
    real = flat >= 0  # [T]
    position = torch.arange(T, device=device)
    # A segment begins at each row start and where the document id changes (a padding run is one).
    begins = torch.ones(T, dtype=torch.bool, device=device)
    begins[1:] = (flat[1:] != flat[:-1]) | (position[1:] % seq == 0)
    next_begin = torch.where(begins, position, T).flip(0).cummin(0).values.flip(0)  # first begin at or after
    seg_len = torch.cat((next_begin[1:], next_begin.new_full((1,), T))) - position  # [T], valid at begins
    seg_real = begins & (flat >= 0)
    # A document split in two runs of its row: two real segments with the same (row, document).
    key = torch.where(seg_real, (position // seq) * (1 << 32) + flat, -1 - position).sort().values
    split = ((key[1:] == key[:-1]) & (key[1:] >= 0)).any()
    real_len = torch.where(seg_real, seg_len, 0)
    stats = [begins.sum(), real.sum(), seg_real.sum(), split, torch.where(begins, seg_len, 0).max(),
             real_len.max()]
    if backend == "sdpa":
        bucket, num_buckets = _bucket_of(seg_len, seq)
        per_bucket = torch.zeros(3, num_buckets, dtype=torch.long, device=device)
        per_bucket[0].scatter_add_(0, bucket, seg_real.long())  # documents
        per_bucket[1].scatter_reduce_(0, bucket, real_len, "amax")  # longest document
        per_bucket[2].scatter_add_(0, bucket, real_len)  # tokens
        stats.append(per_bucket.reshape(-1))
    host = torch.cat([s.reshape(-1).long() for s in stats]).tolist()  # the one host sync
    n_seg, n_real, n_real_seg, any_split, max_len, max_real_len = host[:6]

    token_mask = real_tokens = None
    if n_real < T:
        token_mask = real
        real_tokens = torch.nonzero_static(real, size=n_real).squeeze(1)  # [T_real]
    use_mask = backend == "mask" or any_split
    if backend == "sdpa" and sliding_window is not None and max_real_len > sliding_window:
        use_mask = True
    if use_mask:
        attention = build_attention_mask(batch, seq, device, document_ids, sliding_window)
    elif backend == "varlen":
        starts = torch.nonzero_static(begins, size=n_seg).squeeze(1)  # [n_seg]
        cu_seqlens = torch.cat((starts, starts.new_full((1,), T))).to(torch.int32)
        attention = VarlenLayout(cu_seqlens, max_len, sliding_window)
    elif backend == "flex":
        attention = FlexLayout((torch.cumsum(begins, 0) - 1).view(batch, seq), sliding_window)
    else:
        attention = _bucket_layout(begins, seg_real, seg_len, bucket, n_real_seg, host[6:], T)
    return BatchLayout(attention, token_mask, real_tokens)


def _bucket_of(seg_len: torch.Tensor, seq: int) -> tuple[torch.Tensor, int]:
    """The bucket of a segment of each length (0: up to MIN_BUCKET tokens, then one per power of
    two), and how many buckets rows of `seq` tokens can need."""
    floor = BucketLayout.MIN_BUCKET.bit_length() - 1
    bucket = torch.ceil(torch.log2(seg_len.clamp(min=BucketLayout.MIN_BUCKET).double())).long() - floor
    return bucket, max(1, (max(seq, BucketLayout.MIN_BUCKET) - 1).bit_length() - floor + 1)


def _bucket_layout(begins, seg_real, seg_len, bucket, n_real_seg: int, per_bucket: list[int], T: int) -> BucketLayout:
    """BucketLayout from the per-token segment data of `batch_layout` and the host's per-bucket
    (documents, longest, tokens) counts; nothing more is read on the host."""
    num_buckets = len(per_bucket) // 3
    counts, widths, tokens = (per_bucket[i * num_buckets:(i + 1) * num_buckets] for i in range(3))
    position = torch.arange(T, device=begins.device)
    # Begins of real segments, bucket by bucket, in row order within a bucket.
    first = torch.argsort(torch.where(seg_real, bucket * T + position, num_buckets * T + position))[:n_real_seg]
    starts_all, lengths_all = first, seg_len.index_select(0, first)
    buckets, order_parts, start = [], [], 0
    for n, width, m in zip(counts, widths, tokens, strict=True):
        if not n:
            continue
        seg_start, length = starts_all[start:start + n], lengths_all[start:start + n]  # [n] each
        start += n
        offset = torch.arange(width, device=begins.device)  # [L]
        # Slots past a document's end repeat its last token: read only by queries that are dropped.
        gather = seg_start[:, None] + torch.minimum(offset[None], length[:, None] - 1)  # [n, L]
        slots = torch.nonzero_static((offset[None] < length[:, None]).reshape(-1), size=m).squeeze(1)  # [m]
        buckets.append((gather, slots))
        order_parts.append(gather.reshape(-1).index_select(0, slots))
    order = torch.cat(order_parts) if order_parts else position[:0]  # [R]: the token of each output row
    rows = order.numel()
    inverse = torch.full((T,), rows, dtype=torch.long, device=begins.device).index_copy_(
        0, order, torch.arange(rows, device=begins.device))
    return BucketLayout(buckets, inverse)


# ---- attention and its KV cache ----------------------------------------------------------


class LayerCache:
    """One layer's keys and values (after RoPE) of the tokens decoded so far, in a buffer
    [B, nkv, capacity, D] written in place; it doubles when full (no copy of the cache per step)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.keys: torch.Tensor | None = None  # [B, nkv, capacity, D]
        self.values: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, S, nkv, D] -> every cached key and value so far, [B, nkv, length, D] each."""
        end = self.length + k.shape[1]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(k, end)
        self.keys[:, :, self.length:end] = k.transpose(1, 2)
        self.values[:, :, self.length:end] = v.transpose(1, 2)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, k: torch.Tensor, end: int) -> None:
        B, _, n, D = k.shape
        held = 0 if self.keys is None else self.keys.shape[2]
        capacity = max(end, self.capacity or 0, 2 * held)
        keys, values = k.new_empty(B, n, capacity, D), k.new_empty(B, n, capacity, D)
        if self.keys is not None:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values


class KVCache:
    """Per-layer keys and values for incremental decoding: `model(ids, kv_cache=cache)` for the
    prompt, then `model(next_ids, kv_cache=cache)` per step; each call extends the cache.
    `max_length` (prompt + new tokens) sizes the buffers once; without it they grow by doubling."""

    def __init__(self, num_layers: int, max_length: int | None = None):
        self.layers = [LayerCache(max_length) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Tokens already in the cache (the position of the next token)."""
        return self.layers[0].length


class Attention(nn.Module):
    """Grouped-query attention with RoPE."""

    def __init__(self, config, *, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        H, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=False, device=device, dtype=dtype)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=False, device=device, dtype=dtype)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | DocumentLayout | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x [B, S, H], cos/sin [B, S, D] -> [B, S, H].

        mask: a DocumentLayout (packed or padded rows, from `batch_layout`), a bool mask
        [B, 1, S, S] (`build_attention_mask`), or None (plain causal). cache: this layer's keys and
        values of the tokens before x (incremental decoding; mask must be None), extended here.
        """
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)  # [B, S, nh, D]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.num_heads != self.num_kv_heads
        if cache is not None:
            out = self._attend_cached(q, k, v, cache, gqa)
        elif isinstance(mask, DocumentLayout):
            out = mask.attend(q, k, v, enable_gqa=gqa)  # [B, S, nh, D]
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
            ).transpose(1, 2)  # [B, S, nh, D]
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))  # [B, S, H]

    def _attend_cached(self, q, k, v, cache: LayerCache, gqa: bool) -> torch.Tensor:
        """Queries at positions past .. past+S-1 against every cached key: [B, S, nh, D]."""
        S, past = q.shape[1], cache.length
        keys, values = cache.append(k, v)  # [B, nkv, P+S, D]
        window = self.sliding_window
        first, mask, causal = 0, None, False
        if S == 1:  # one new token sees every cached key (within the window): no mask
            first = 0 if window is None else max(0, past + 1 - window)
        elif past == 0 and (window is None or S <= window):
            causal = True
        else:
            # A prompt continued: query i sits at position past + i (SDPA's is_causal aligns the
            # diagonal top-left, wrong once keys outnumber queries), so a small [S, P+S] mask.
            positions = torch.arange(past + S, device=q.device)
            mask = positions[None, :] <= positions[past:, None]  # [S, P+S]
            if window is not None:
                mask = mask & (positions[past:, None] - positions[None, :] < window)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys[:, :, first:], values[:, :, first:],
            attn_mask=mask, is_causal=causal, enable_gqa=gqa,
        )  # [B, nh, S, D]
        return out.transpose(1, 2)
