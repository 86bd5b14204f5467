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
    """x [B, n, S, D], cos/sin [B, S, D] -> [B, n, S, D]."""
    x1, x2 = x.chunk(2, dim=-1)  # [B, n, S, D/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, n, S, D]
    return x * cos[:, None] + rotated * sin[:, None]


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
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, S, H], cos/sin [B, S, D], mask [B, 1, S, S] bool or None (causal) -> [B, S, H]."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, D]
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, S, D]
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.num_heads != self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
        )  # [B, nh, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))  # [B, S, nh*D]
