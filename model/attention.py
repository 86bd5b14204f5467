"""RMSNorm, rotary embeddings, grouped-query attention and the attention mask for packed rows.

Shape legend: B batch, S sequence, H hidden, nh query heads, nkv key/value heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """x [B, S, n, D], cos/sin [B, S, D] -> [B, S, n, D]."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, S, n, D/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, S, n, D]
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def build_attention_mask(
    batch: int,
    seq: int,
    device: torch.device,
    document_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, S, S] (True = may attend), or None when plain causal attention is exact.

    Causal; within one document only (document_ids); never onto padding keys (attention_mask 0 or
    document id < 0); within `sliding_window` tokens. Every query may attend to itself so that rows
    of padding never see an all-masked row (which would give NaN in softmax and in gradients).
    """
    needs_window = sliding_window is not None and seq > sliding_window
    if document_ids is None and attention_mask is None and not needs_window:
        return None
    q = torch.arange(seq, device=device)
    allowed = (q[None, :] <= q[:, None])[None]  # [1, S, S] key index <= query index
    if needs_window:
        allowed = allowed & (q[:, None] - q[None, :] < sliding_window)[None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])  # [B, S, S]
        allowed = allowed & (document_ids >= 0)[:, None, :]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]  # [B, S, S]
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return allowed.expand(batch, seq, seq)[:, None]  # [B, 1, S, S]


class Attention(nn.Module):
    """Grouped-query attention with RoPE through F.scaled_dot_product_attention."""

    def __init__(self, config, *, device=None, dtype=None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
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

        mask: a DocumentLayout (packed rows: attention per document, `document_layout`), a bool
        mask [B, 1, S, S] (`build_attention_mask`), or None (plain causal). cache: this layer's
        keys and values of the tokens before x (incremental decoding; mask must be None), extended here.
        """
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)  # [B, S, nh, D]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, nkv, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.num_heads != self.num_kv_heads
        if cache is not None and cache.keys is not None:
            past = cache.keys.shape[1]
            k, v = torch.cat([cache.keys, k], dim=1), torch.cat([cache.values, v], dim=1)  # [B, P+S, nkv, D]
            # Query i sits at position past + i: it sees every cached key and the new ones up to itself.
            # (SDPA's is_causal aligns the diagonal top-left, which is wrong once keys outnumber queries.)
            mask = torch.arange(past + S, device=x.device)[None] <= past + torch.arange(S, device=x.device)[:, None]
        if cache is not None:
            cache.keys, cache.values = k, v
        if isinstance(mask, DocumentLayout):
            out = mask.attend(q, k, v, enable_gqa=gqa)  # [B, S, nh, D]
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, enable_gqa=gqa,
            ).transpose(1, 2)  # [B, S, nh, D]
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))  # [B, S, H]


class LayerCache:
    """One layer's keys and values [B, P, nkv, D] (after RoPE) of the P tokens decoded so far."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class KVCache:
    """Per-layer keys and values for incremental decoding: `model(ids, kv_cache=cache)` for the
    prompt, then `model(next_ids, kv_cache=cache)` per step; each call extends the cache."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Tokens already in the cache (the position of the next token)."""
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[1]


class DocumentLayout:
    """Where the documents of packed rows lie, for attention that only looks inside each document.

    A packed row holds many short documents; one [S, S] masked attention per row computes every
    query against every key of the row and throws most of it away (with 1024-token rows of ~40
    token chats, ~97%). Here each document is cut out and attended to on its own, causally:
    documents of similar length share one `scaled_dot_product_attention(is_causal=True)` call
    (buckets by powers of two, each padded at the end to its longest document, so padding keys
    come after every real query and are never seen). Same keys for every query as
    `build_attention_mask(document_ids=...)`, so the same numbers up to summation order.

    Build it with `document_layout` once per forward; every layer reuses it.
    """

    MIN_BUCKET = 16  # documents up to this many tokens share one bucket

    def __init__(self, starts: torch.Tensor, lengths: torch.Tensor, shape: tuple[int, int]):
        """starts, lengths [n_seg] long (segments of the flattened [B*S] tokens, covering each once)."""
        self.shape = shape
        self.buckets: list[tuple[torch.Tensor, torch.Tensor]] = []  # (gather [n, L], valid [n*L] bool)
        device = starts.device
        size = torch.clamp(lengths, min=self.MIN_BUCKET)
        bucket_of = torch.ceil(torch.log2(size.double())).long()  # [n_seg]
        order_parts = []
        for bucket in torch.unique(bucket_of).tolist():
            chosen = (bucket_of == bucket).nonzero().squeeze(1)  # [n]
            seg_start, seg_len = starts[chosen], lengths[chosen]  # [n] each
            width = int(seg_len.max())
            offset = torch.arange(width, device=device)  # [L]
            # Slots past a document's end repeat its last token: read only by queries that are dropped.
            gather = seg_start[:, None] + torch.minimum(offset[None], seg_len[:, None] - 1)  # [n, L]
            valid = (offset[None] < seg_len[:, None]).reshape(-1)  # [n*L]
            self.buckets.append((gather, valid))
            order_parts.append(gather.reshape(-1)[valid])
        order = torch.cat(order_parts)  # [T]: the token each output row of the buckets belongs to
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=device)  # [T]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, enable_gqa: bool) -> torch.Tensor:
        """q [B, S, nh, D], k/v [B, S, nkv, D] -> [B, S, nh, D]."""
        B, S, nh, D = q.shape
        flat_q, flat_k, flat_v = (t.reshape(B * S, t.shape[2], D) for t in (q, k, v))  # [T, n, D]
        outs = []
        for gather, valid in self.buckets:
            n, L = gather.shape
            index = gather.reshape(-1)
            q_b, k_b, v_b = (t.index_select(0, index).view(n, L, t.shape[1], D).transpose(1, 2)
                             for t in (flat_q, flat_k, flat_v))  # [n, heads, L, D]
            out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, enable_gqa=enable_gqa)
            outs.append(out.transpose(1, 2).reshape(n * L, nh, D)[valid])  # [real tokens, nh, D]
        return torch.cat(outs).index_select(0, self.inverse).view(B, S, nh, D)


def document_layout(
    document_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> DocumentLayout | None:
    """The DocumentLayout of packed rows, or None where only the mask gives the same attention.

    document_ids [B, S] (< 0 = padding: it attends to itself only, as in `build_attention_mask`).
    None (use the mask) when a document's tokens are not one contiguous run of its row, when
    attention_mask hides a token that belongs to a document, or when `sliding_window` is shorter
    than a document. Reads the ids on the host (one device sync per forward on GPU).
    """
    B, S = document_ids.shape
    if attention_mask is not None and bool(((attention_mask == 0) & (document_ids >= 0)).any()):
        return None
    flat = document_ids.reshape(-1)  # [T]
    T = flat.numel()
    position = torch.arange(T, device=flat.device)
    begins = torch.ones(T, dtype=torch.bool, device=flat.device)
    # A segment begins at each row start, where the document id changes, and at every padding token.
    begins[1:] = (flat[1:] != flat[:-1]) | (position[1:] % S == 0) | (flat[1:] < 0)
    starts = begins.nonzero().squeeze(1)  # [n_seg]
    lengths = torch.diff(starts, append=starts.new_tensor([T]))  # [n_seg]
    seg_doc = flat[starts]
    real = seg_doc >= 0
    # One segment per (row, document): otherwise a document is split and the mask is needed.
    keys = (starts[real] // S) * (int(flat.max()) + 1) + seg_doc[real]
    if torch.unique(keys).numel() != int(real.sum()):
        return None
    if sliding_window is not None and int(lengths.max()) > sliding_window:
        return None
    return DocumentLayout(starts, lengths, (B, S))
