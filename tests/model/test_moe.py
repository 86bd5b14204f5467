import pytest
import torch

from model.moe import MixtralExperts, MoEBlock, grouped_mm, moe_reference, route_tokens, sort_by_expert


def _block(H=32, F=48, E=8, K=2, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    block = MoEBlock(H, F, E, K, dtype=dtype)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
    return block


def _grads(block, h, g):
    block.zero_grad()
    h = h.detach().clone().requires_grad_()
    out, logits = block(h)
    (out * g).sum().backward()
    return out.detach(), h.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


def test_grouped_mm_matches_loop_with_empty_groups():
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    w = torch.randn(3, 4, 8)
    counts = torch.tensor([4, 0, 6])
    expected = torch.cat([x[:4] @ w[0].T, x[4:] @ w[2].T])
    torch.testing.assert_close(grouped_mm(x, w, counts, use_grouped_mm=True), expected)
    torch.testing.assert_close(grouped_mm(x, w, counts, use_grouped_mm=False), expected)


def test_grouped_mm_falls_back_on_unaligned_dims():
    x = torch.randn(5, 7)
    w = torch.randn(2, 3, 7)
    counts = torch.tensor([2, 3])
    expected = torch.cat([x[:2] @ w[0].T, x[2:] @ w[1].T])
    torch.testing.assert_close(grouped_mm(x, w, counts), expected)
    with pytest.raises(ValueError, match="multiple of 16"):
        grouped_mm(x, w, counts, use_grouped_mm=True)


def test_grouped_mm_sum_backward():
    # The CPU kernel rejects zero-stride grads; grouped_mm must hand it a real one.
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(2, 4, 16, requires_grad=True)
    grouped_mm(x, w, torch.tensor([3, 5]), use_grouped_mm=True).sum().backward()
    torch.testing.assert_close(
        x.grad, torch.cat([w[0].sum(0).expand(3, 16), w[1].sum(0).expand(5, 16)]).detach()
    )


def test_route_tokens_renormalises_top_k():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    weights, ids = route_tokens(logits, 2)
    assert ids.tolist() == [[3, 2]]
    e = torch.exp(torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(weights, (e / e.sum())[None])


def test_sort_by_expert_is_stable_and_counts():
    ids = torch.tensor([[2, 0], [0, 2], [1, 2]])
    order, counts = sort_by_expert(ids, 4)
    assert order.tolist() == [1, 2, 4, 0, 3, 5]
    assert counts.tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("E,K", [(8, 2), (8, 1), (4, 4), (6, 2)])
def test_block_matches_reference_and_loop(E, K):
    block = _block(E=E, K=K)
    torch.manual_seed(1)
    h = torch.randn(2, 5, 32)
    g = torch.randn(2, 5, 32)
    ref = moe_reference(
        h.view(-1, 32), block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, K
    )
    out_g, dh_g, grads_g = _grads(block, h, g)
    torch.testing.assert_close(out_g.view(-1, 32), ref.detach(), atol=1e-5, rtol=1e-5)
    block.experts.use_grouped_mm = False
    out_l, dh_l, grads_l = _grads(block, h, g)
    torch.testing.assert_close(out_g, out_l, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dh_g, dh_l, atol=1e-6, rtol=1e-6)
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_l[name], atol=1e-6, rtol=1e-6, msg=name)


def test_expert_with_no_tokens_gets_zero_grad():
    block = _block(E=4, K=1)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[0, 0] = 10.0  # every token with h[..., 0] > 0 goes to expert 0
    h = torch.randn(1, 6, 32).abs()
    out, _ = block(h)
    (out * torch.randn_like(out)).sum().backward()
    assert block.experts.gate_up_proj.grad[1:].abs().sum() == 0
    assert block.experts.gate_up_proj.grad[0].abs().sum() > 0
    ref = moe_reference(
        h.view(-1, 32), block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, 1
    )
    torch.testing.assert_close(out.view(-1, 32), ref.detach())


def test_padding_not_routed():
    block = _block()
    h = torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool).view(-1)
    out, logits = block(h, mask)
    assert logits.shape == (8, 8)
    assert out.view(-1, 32)[~mask].abs().sum() == 0
    ref = moe_reference(
        h.view(-1, 32)[mask], block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, 2
    )
    torch.testing.assert_close(out.view(-1, 32)[mask], ref.detach(), atol=1e-5, rtol=1e-5)


def test_single_expert_is_dense_swiglu():
    block = _block(E=1, K=1)
    h = torch.randn(1, 3, 32)
    w1, w3 = block.experts.gate_up_proj[0].chunk(2)
    dense = (torch.nn.functional.silu(h @ w1.T) * (h @ w3.T)) @ block.experts.down_proj[0].T
    torch.testing.assert_close(block(h)[0], dense, atol=1e-5, rtol=1e-5)


def test_experts_bf16_grouped_equals_loop():
    torch.manual_seed(0)
    experts = MixtralExperts(4, 32, 16, dtype=torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(12, 32, dtype=torch.bfloat16)
    counts = torch.tensor([5, 0, 3, 4])
    y = experts(x, counts)
    experts.use_grouped_mm = False
    torch.testing.assert_close(y, experts(x, counts))


def _fwd_bwd(x, w, counts, g, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = grouped_mm(x, w, counts, **kw)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_cpu_expert_mm_matches_loop_forward_and_backward():
    # Unaligned dims (torch._grouped_mm refuses them) and an empty expert (zero weight gradient).
    torch.manual_seed(0)
    x, w, g = torch.randn(9, 7), torch.randn(3, 5, 7), torch.randn(9, 5)
    counts = torch.tensor([4, 0, 5])
    y, dx, dw = _fwd_bwd(x, w, counts, g)
    y_ref, dx_ref, dw_ref = _fwd_bwd(x, w, counts, g, use_grouped_mm=False)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx, dx_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dw, dw_ref, atol=1e-6, rtol=1e-6)
    assert dw[1].abs().sum() == 0
    torch.testing.assert_close(dw[0], g[:4].T @ x[:4])


def _bf16_case(in_dim=32):
    torch.manual_seed(0)
    x = torch.randn(12, in_dim, dtype=torch.bfloat16)
    w = torch.randn(3, 16, in_dim, dtype=torch.bfloat16)
    g = torch.randn(12, 16, dtype=torch.bfloat16)
    return x, w, g, torch.tensor([5, 3, 4])


def test_cpu_expert_mm_bf16_without_native_instructions_is_fp32_math_rounded_once(monkeypatch):
    from model import moe

    monkeypatch.setattr(moe, "cpu_has_native_mm", lambda dtype: dtype == torch.float32)
    x, w, g, counts = _bf16_case()
    y, dx, dw = _fwd_bwd(x, w, counts, g)
    y32, dx32, dw32 = _fwd_bwd(x.float(), w.float(), counts, g.float(), use_grouped_mm=False)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    assert torch.equal(y, y32.to(torch.bfloat16))
    assert torch.equal(dx, dx32.to(torch.bfloat16))
    assert torch.equal(dw, dw32.to(torch.bfloat16))
    # and within bf16 tolerance of the bf16 reference loop
    y_bf, dx_bf, dw_bf = _fwd_bwd(x, w, counts, g, use_grouped_mm=False)
    torch.testing.assert_close(y, y_bf)
    torch.testing.assert_close(dw, dw_bf)


@pytest.mark.parametrize("in_dim", [32, 256])  # below and at _COPY_G_T_MIN_IN: g.T as a view / copied
def test_cpu_expert_mm_bf16_with_native_instructions_multiplies_in_bf16(in_dim, monkeypatch):
    from model import moe

    monkeypatch.setattr(moe, "cpu_has_native_mm", lambda dtype: True)
    x, w, g, counts = _bf16_case(in_dim)
    y, dx, dw = _fwd_bwd(x, w, counts, g)
    rows = [slice(0, 5), slice(5, 8), slice(8, 12)]
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    # Rows are independent: padding each expert's rows with zero rows changes no bit of y or dx.
    assert torch.equal(y, torch.cat([x[r] @ w[e].t() for e, r in enumerate(rows)]))
    assert torch.equal(dx, torch.cat([g[r] @ w[e] for e, r in enumerate(rows)]))
    # dW sums over the (padded) rows: the zero rows add nothing, the kernel may sum in another order.
    torch.testing.assert_close(dw, torch.stack([g[r].t() @ x[r] for r in rows]), atol=0, rtol=1e-2)
    y_bf, dx_bf, dw_bf = _fwd_bwd(x, w, counts, g, use_grouped_mm=False)
    torch.testing.assert_close(y, y_bf)
    torch.testing.assert_close(dx, dx_bf)
    torch.testing.assert_close(dw, dw_bf)


def test_bucket_rows_sizes():
    from model.moe import bucket_rows

    got = {n: bucket_rows(n) for n in (1, 16, 17, 128, 129, 1000, 1024, 1025, 1792, 2000, 14336, 14337)}
    assert got == {1: 16, 16: 16, 17: 32, 128: 128, 129: 144, 1000: 1024, 1024: 1024, 1025: 1152,
                   1792: 1792, 2000: 2048, 14336: 14336, 14337: 15360}
    for n in range(1, 5000):
        assert n <= bucket_rows(n) <= max(16 * -(-n // 16), 1.125 * n)
    assert len({bucket_rows(n) for n in range(1, 16385)}) <= 70


def test_native_half_precision_products_see_bucket_sized_rows_only(monkeypatch):
    """oneDNN builds a kernel per shape: every expert product (forward, dX, dW) must have a bucket
    size where the row count enters, so that training steps with new routings reuse kernels."""
    from model import moe

    monkeypatch.setattr(moe, "cpu_has_native_mm", lambda dtype: True)
    shapes = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: shapes.append((a.shape, b.shape)) or real_mm(a, b, **kw))
    x, w, g, counts = _bf16_case(256)
    y, dx, dw = _fwd_bwd(x, w, counts, g)
    assert len(shapes) == 9  # 3 experts x (forward, dX, dW)
    for a_shape, _ in shapes:
        assert a_shape[0] == 16 or a_shape[1] == 16  # 5, 3 and 4 rows -> 16; the dW products sum over them
    torch.testing.assert_close(y, _fwd_bwd(x, w, counts, g, use_grouped_mm=False)[0])


def test_cpu_has_native_mm_answers_for_every_dtype():
    from model.moe import cpu_has_native_mm

    assert cpu_has_native_mm(torch.float32)
    assert not cpu_has_native_mm(torch.int64)
    for dtype in (torch.bfloat16, torch.float16):
        assert isinstance(cpu_has_native_mm(dtype), bool)


def test_cpu_expert_mm_sum_backward():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(2, 4, 16, requires_grad=True)
    grouped_mm(x, w, torch.tensor([3, 5])).sum().backward()
    torch.testing.assert_close(
        x.grad, torch.cat([w[0].sum(0).expand(3, 16), w[1].sum(0).expand(5, 16)]).detach()
    )


def test_cpu_many_rows_per_expert_takes_the_grouped_kernel_with_the_same_numbers(monkeypatch):
    """At >= 256 rows per expert fp32 goes to torch._grouped_mm (measured faster there); same math."""
    torch.manual_seed(0)
    counts = torch.tensor([700, 0, 300, 600])  # 400 rows per expert on average, one expert empty
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    w = torch.randn(4, 32, 16, requires_grad=True)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = grouped_mm(x, w, counts)
    assert calls, "expected torch._grouped_mm at 400 rows per expert"
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    y_ref = grouped_mm(x, w, counts, use_grouped_mm=False)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dw, dw_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_autograd_silu_times_up_over_several_row_blocks(dtype, monkeypatch):
    from model import moe

    monkeypatch.setattr(moe, "_SWIGLU_BLOCK_BYTES", 3 * 2 * 6 * torch.empty(0, dtype=dtype).element_size())
    assert len(list(moe._swiglu_row_blocks(torch.zeros(10, 12, dtype=dtype)))) == 4  # 3 + 3 + 3 + 1 rows
    torch.manual_seed(0)
    gate_up = torch.randn(10, 12, dtype=dtype, requires_grad=True)
    grad = torch.randn(10, 6, dtype=dtype)
    ours = moe.swiglu(gate_up)
    (d_ours,) = torch.autograd.grad(ours, gate_up, grad)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    (d_ref,) = torch.autograd.grad(ref, gate_up, grad)
    assert torch.equal(ours, ref)
    assert torch.equal(d_ours, d_ref)
