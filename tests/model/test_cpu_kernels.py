"""model/cpu_kernels.py: the CPU's expert products and SwiGLU against the plain math (model/moe.py's loop)."""

import pytest
import torch

from model import cpu_kernels
from model.cpu_kernels import bucket_rows, cpu_has_native_mm
from model.moe import grouped_mm


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
    monkeypatch.setattr(cpu_kernels, "cpu_has_native_mm", lambda dtype: dtype == torch.float32)
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
    monkeypatch.setattr(cpu_kernels, "cpu_has_native_mm", lambda dtype: True)
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
    got = {n: bucket_rows(n) for n in (1, 16, 17, 128, 129, 1000, 1024, 1025, 1792, 2000, 14336, 14337)}
    assert got == {1: 16, 16: 16, 17: 32, 128: 128, 129: 144, 1000: 1024, 1024: 1024, 1025: 1152,
                   1792: 1792, 2000: 2048, 14336: 14336, 14337: 15360}
    for n in range(1, 5000):
        assert n <= bucket_rows(n) <= max(16 * -(-n // 16), 1.125 * n)
    assert len({bucket_rows(n) for n in range(1, 16385)}) <= 70


def test_native_half_precision_products_see_bucket_sized_rows_only(monkeypatch):
    """oneDNN builds a kernel per shape: every expert product (forward, dX, dW) must have a bucket
    size where the row count enters, so that training steps with new routings reuse kernels."""
    monkeypatch.setattr(cpu_kernels, "cpu_has_native_mm", lambda dtype: True)
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
    monkeypatch.setattr(cpu_kernels, "_SWIGLU_BLOCK_BYTES", 3 * 2 * 6 * torch.empty(0, dtype=dtype).element_size())
    assert len(list(cpu_kernels._row_blocks(torch.zeros(10, 12, dtype=dtype)))) == 4  # 3 + 3 + 3 + 1 rows
    torch.manual_seed(0)
    gate_up = torch.randn(10, 12, dtype=dtype, requires_grad=True)
    grad = torch.randn(10, 6, dtype=dtype)
    ours = cpu_kernels.swiglu(gate_up)
    (d_ours,) = torch.autograd.grad(ours, gate_up, grad)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    (d_ref,) = torch.autograd.grad(ref, gate_up, grad)
    assert torch.equal(ours, ref)
    assert torch.equal(d_ours, d_ref)
