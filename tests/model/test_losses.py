import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from model import losses
from model.losses import chunked_lm_loss, load_balancing_loss, masked_ce, router_z_loss, shift_labels

LN3 = math.log(3.0)


def test_load_balancing_hand_worked_one_layer():
    # probs [.75, .25] -> expert 0, [.25, .75] -> expert 1: f = P = [.5, .5]; 2 * (.25 + .25) = 1
    logits = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    assert load_balancing_loss([logits], top_k=1).item() == pytest.approx(1.0)


def test_load_balancing_averages_layers_before_the_product():
    # Layer A sends both tokens to expert 0, layer B one each. Counts [3, 1] / 4 rows, probs
    # [2.5, 1.5] / 4: 2 * (.75 * .625 + .25 * .375) = 1.125 (a per-layer mean would give 1.25).
    layer_a = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    layer_b = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    assert load_balancing_loss([layer_a, layer_b], top_k=1).item() == pytest.approx(1.125)


def test_load_balancing_mask_excludes_padding():
    logits = torch.tensor([[LN3, 0.0], [0.0, LN3], [50.0, 0.0]])
    mask = torch.tensor([True, True, False])
    assert load_balancing_loss([logits], top_k=1, token_mask=mask).item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_matches_transformers(top_k):
    torch.manual_seed(top_k)
    logits = tuple(torch.randn(12, 5) * 2 for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    ref = load_balancing_loss_func(logits, 5, top_k, mask)
    torch.testing.assert_close(load_balancing_loss(logits, top_k, mask), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(load_balancing_loss(logits, top_k), load_balancing_loss_func(logits, 5, top_k))


def test_router_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [9.0, 9.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss([logits], torch.tensor([True, True, False])).item() == pytest.approx(expected)
    two_layers = router_z_loss([logits[:1], logits[1:2]])
    assert two_layers.item() == pytest.approx(expected)


def test_masked_ce_hand_worked():
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0], [5.0, 1.0]])
    targets = torch.tensor([1, 0, -100])
    # -log(1/2) and -log(3/4)
    expected = math.log(2.0) + math.log(4.0 / 3.0)
    assert masked_ce(logits, targets, "sum").item() == pytest.approx(expected)
    assert masked_ce(logits, targets, "mean").item() == pytest.approx(expected / 2)
    assert masked_ce(logits, torch.full((3,), -100), "mean").item() == 0.0
    per_token = masked_ce(logits, targets, "none")
    assert per_token.tolist() == pytest.approx([math.log(2.0), math.log(4.0 / 3.0), 0.0])


def test_shift_labels():
    assert shift_labels(torch.tensor([[5, 6, 7]])).tolist() == [[6, 7, -100]]


@pytest.mark.parametrize("head_trained", [True, False], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_plain_value_and_grads(reduction, head_trained, monkeypatch):
    frozen_calls = []
    apply = losses._FrozenHeadCE.apply
    monkeypatch.setattr(losses._FrozenHeadCE, "apply", lambda h, *a: frozen_calls.append(len(h)) or apply(h, *a))
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=head_trained)
    targets = torch.randint(0, 50, (13,))
    targets[[0, 5, 6]] = -100
    inputs = (hidden, weight) if head_trained else (hidden,)
    # Per-token losses get a different weight each, so a misplaced token shows in the grads.
    upstream = torch.linspace(0.5, 2.0, 13) if reduction == "none" else None
    plain = masked_ce(hidden @ weight.T, targets, reduction)
    g_plain = torch.autograd.grad(plain, inputs, upstream)
    chunked = chunked_lm_loss(hidden, weight, targets, chunk_size=4, reduction=reduction)
    # A frozen head takes the path that computes the hidden gradient in the forward pass.
    assert frozen_calls == ([] if head_trained else [13 - 3])
    g_chunked = torch.autograd.grad(chunked, inputs, upstream)
    torch.testing.assert_close(chunked, plain)
    if reduction == "none":
        assert chunked.shape == (13,) and chunked[[0, 5, 6]].eq(0).all()
    for a, b in zip(g_chunked, g_plain, strict=True):
        torch.testing.assert_close(a, b)


def test_frozen_head_bf16_and_no_grad():
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 40, (9,))
    fused = chunked_lm_loss(hidden, weight, targets, chunk_size=4, reduction="sum")
    (g_fused,) = torch.autograd.grad(fused, hidden)
    plain = masked_ce(hidden @ weight.T, targets, "sum")
    (g_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(g_fused, g_plain, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(hidden, weight, targets, 4, "sum"), plain.detach())


def test_bad_reduction_and_chunk_size():
    with pytest.raises(ValueError, match="reduction"):
        masked_ce(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "avg")
    with pytest.raises(ValueError, match="logits_chunk_size"):
        chunked_lm_loss(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="reduction"):
        chunked_lm_loss(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), 2, "avg")
