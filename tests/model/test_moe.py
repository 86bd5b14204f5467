import pytest
import torch

from model.moe import (
    GROUP_PAD_ROWS,
    MixtralExperts,
    MoEBlock,
    grouped_mm,
    moe_reference,
    pad_expert_groups,
    route_tokens,
    sort_by_expert,
    swiglu,
)


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
    torch.testing.assert_close(block(h, mask.nonzero().squeeze(1))[0], out)  # the indices the model passes
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


def test_swiglu_saves_the_input_only_and_equals_autograd():
    torch.manual_seed(0)
    gate_up = torch.randn(10, 12, requires_grad=True)
    grad = torch.randn(10, 6)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    (d_ref,) = torch.autograd.grad(ref, gate_up, grad)
    for use in (None, True):  # the CPU's blocked kernel, the accelerator's
        ours = swiglu(gate_up, use_grouped_mm=use)
        (d_ours,) = torch.autograd.grad(ours, gate_up, grad)
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
        torch.testing.assert_close(d_ours, d_ref, atol=1e-7, rtol=1e-6)


def test_pad_expert_groups_appends_zero_rows_to_every_group():
    x = torch.arange(1.0, 6.0)[:, None].expand(5, 2)  # rows 1..5
    padded, counts, rows = pad_expert_groups(x, torch.tensor([2, 0, 3]), pad=2)
    assert counts.tolist() == [4, 2, 5]
    assert rows.tolist() == [0, 1, 6, 7, 8]
    assert padded[:, 0].tolist() == [1, 2, 0, 0, 0, 0, 3, 4, 5, 0, 0]


@pytest.mark.parametrize("lora", [False, True])
def test_accelerator_path_never_hands_the_grouped_kernel_an_empty_group(lora, monkeypatch):
    """torch._grouped_mm hangs in backward (pytorch#152668) and gets wrong weight gradients on
    B200 (pytorch#172439) with an empty group: the accelerator path (forced here on the CPU) pads
    every group, and an expert that gets no rows still gets a zero gradient, forward and backward."""
    from model.lora import apply_lora

    group_sizes = []
    real = torch._grouped_mm

    def recording(x, w, offs, **kwargs):
        group_sizes.append(torch.diff(offs, prepend=offs.new_zeros(1)).tolist())
        return real(x, w, offs=offs, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    counts = torch.tensor([5, 0, 3, 4])
    x = torch.randn(12, 32)
    g = torch.randn(12, 32)
    results = {}
    for use in (True, False):
        torch.manual_seed(0)
        holder = torch.nn.Module()
        holder.experts = MixtralExperts(4, 32, 16)
        torch.nn.init.normal_(holder.experts.gate_up_proj, std=0.2)
        torch.nn.init.normal_(holder.experts.down_proj, std=0.2)
        if lora:
            holder = apply_lora(holder, r=4, alpha=8, target_modules=["experts"], init_lora_weights=False)
        experts = holder.experts
        experts.use_grouped_mm = use
        xi = x.clone().requires_grad_()
        y = experts(xi, counts)
        y.backward(g)
        grads = {n: p.grad for n, p in holder.named_parameters() if p.grad is not None}
        results[use] = (y, xi.grad, grads)
    assert group_sizes and all(min(sizes) >= GROUP_PAD_ROWS for sizes in group_sizes)
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results[True], results[False]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert grads and grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-5, msg=name)
        assert grad[1].abs().sum() == 0, name  # expert 1 had no rows


def test_grouped_mm_under_autocast_runs_in_the_autocast_dtype_off_the_cpu_path():
    torch.manual_seed(0)
    x, w = torch.randn(32, 16), torch.randn(2, 16, 16)
    counts = torch.tensor([20, 12])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped_mm(x, w, counts, use_grouped_mm=True).dtype == torch.bfloat16
        # bf16 rows (the SwiGLU of bf16 products) beside an fp32 model's weights: cast too
        assert grouped_mm(x.bfloat16(), w, counts, use_grouped_mm=True).dtype == torch.bfloat16
        assert grouped_mm(x, w, counts).dtype == torch.float32  # the CPU kernels keep fp32 weights fp32
