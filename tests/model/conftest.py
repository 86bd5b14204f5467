"""`varlen_on_cpu`: torch's variable-length attention op with a CPU kernel, for one test.

torch 2.13 runs `torch.nn.attention.varlen.varlen_attn` only on CUDA (flash attention). Inside a
test that asks for this fixture, its custom ops (`torch_attn::_varlen_attn` and its backward) get a
CPU kernel with the documented semantics, computed per segment by SDPA; the model then goes through
the real public function, the op's autograd formula and torch.compile's tracing of it, and only the
kernel underneath is a stand-in. tests/gpu runs the real kernel.
"""

import pytest
import torch

FORWARD_OP, BACKWARD_OP = "torch_attn::_varlen_attn", "torch_attn::_varlen_attn_backward"


def segment_masks(cu_seqlens, window_size, is_causal):
    """(start, end, allowed [n, n] bool) per segment of the packed tokens: keys from `left` before
    the query to `right` after it (window_size = (left, right), -1 = unbounded; causal: right = 0)."""
    left, right = window_size
    if is_causal:
        right = 0
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = torch.arange(end - start)
        offset = n[None, :] - n[:, None]  # key - query
        allowed = offset <= (right if right >= 0 else end)
        if left >= 0:
            allowed = allowed & (offset >= -left)
        yield start, end, allowed


def _probabilities(q, k, allowed):
    """Attention probabilities [heads, n, n] of one segment; q [n, nh, D], k [n, nkv, D]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: each kv head serves a group
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def _forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None,
             window_size=None, enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert cu_seq_k is None or torch.equal(cu_seq_q, cu_seq_k)
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max()), "max_q must be the longest segment"
    assert scale is None and seqused_k is None and block_table is None
    assert enable_gqa or query.shape[1] == key.shape[1]
    out = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    for start, end, allowed in segment_masks(cu_seq_q, window_size or [-1, -1], is_causal):
        p = _probabilities(query[start:end], key[start:end], allowed)
        out[start:end] = torch.einsum("hqk,khd->qhd", p, value[start:end].repeat_interleave(group, dim=1))
    lse = torch.zeros(query.shape[1], query.shape[0])  # [heads, T]: unused by the backward below
    return out, lse, torch.zeros(2, dtype=torch.uint64)


def _backward(grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal,
              rng_state, scale=None, window_size=None):
    """Softmax attention's gradients written out (a kernel runs below autograd)."""
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    nkv, group = key.shape[1], query.shape[1] // key.shape[1]
    for start, end, allowed in segment_masks(cu_seq_q, window_size or [-1, -1], is_causal):
        q, k, v, g = query[start:end], key[start:end], value[start:end], grad_out[start:end]
        p = _probabilities(q, k, allowed)  # [nh, n, n]
        v_heads, k_heads = v.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
        dp = torch.einsum("qhd,khd->hqk", g, v_heads)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / q.shape[-1] ** 0.5
        dq[start:end] = torch.einsum("hqk,khd->qhd", ds, k_heads)
        n = end - start
        dk[start:end] = torch.einsum("hqk,qhd->khd", ds, q).reshape(n, nkv, group, -1).sum(2)
        dv[start:end] = torch.einsum("hqk,qhd->khd", p, g).reshape(n, nkv, group, -1).sum(2)
    return dq, dk, dv


def _no_cpu_kernel(*args, **kwargs):
    raise NotImplementedError("torch's varlen attention has no CPU kernel (tests lend one: varlen_on_cpu)")


@pytest.fixture
def varlen_on_cpu():
    import torch.nn.attention.varlen  # noqa: F401  (defines the ops)

    torch.library.register_kernel(FORWARD_OP, "cpu", _forward)
    torch.library.register_kernel(BACKWARD_OP, "cpu", _backward)
    try:
        yield
    finally:
        torch.library.register_kernel(FORWARD_OP, "cpu", _no_cpu_kernel)
        torch.library.register_kernel(BACKWARD_OP, "cpu", _no_cpu_kernel)
