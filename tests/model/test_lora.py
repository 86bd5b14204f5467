"""LoRA on attention and experts through PEFT: the grouped expert layer against a dense per-expert loop,
and the PEFT workflows (merge, disable, save/load, trainable parameters) on the native model."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig

from model.lora import ExpertLoraLayer
from model.moe import MixtralExperts

E, H, FFN, R, ALPHA = 4, 32, 48, 4, 8


def make_experts(seed: int = 0) -> MixtralExperts:
    torch.manual_seed(seed)
    experts = MixtralExperts(E, H, FFN)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    return experts


def make_layer(seed: int = 0, dropout: float = 0.0, **config) -> ExpertLoraLayer:
    lora_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, **config)
    return ExpertLoraLayer(make_experts(seed), "default", config=lora_config, r=R, lora_alpha=ALPHA)


def randomise_b(layer: ExpertLoraLayer, std: float = 0.1) -> None:
    """Training moves B away from its zero init; without this every test would see a zero delta."""
    with torch.no_grad():
        for name in ("lora_gate_up_B", "lora_down_B"):
            for b in getattr(layer, name).values():
                b.normal_(std=std)


def sorted_rows(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    # Uneven counts and one idle expert: the grouped path must keep every expert's rows apart.
    tokens_per_expert = torch.tensor([5, 0, 3, 8])
    torch.manual_seed(seed)
    return torch.randn(int(tokens_per_expert.sum()), H), tokens_per_expert


def dense_reference(x, tokens_per_expert, gate_up_proj, down_proj, a_gu, b_gu, a_d, b_d, scaling):
    """Per-expert loop with the adapted weights W_e + scaling * B_e A_e, w1 and w3 adapted separately."""
    outs = []
    for e, x_e in enumerate(x.split(tokens_per_expert.tolist())):
        w1 = gate_up_proj[e, :FFN] + scaling * b_gu[e, :FFN] @ a_gu[e, :R]
        w3 = gate_up_proj[e, FFN:] + scaling * b_gu[e, FFN:] @ a_gu[e, R:]
        w2 = down_proj[e] + scaling * b_d[e] @ a_d[e]
        outs.append((F.silu(x_e @ w1.T) * (x_e @ w3.T)) @ w2.T)
    return torch.cat(outs)


def lora_tensors(layer: ExpertLoraLayer, adapter: str = "default") -> list[torch.Tensor]:
    return [getattr(layer, name)[adapter] for name in ExpertLoraLayer.adapter_layer_names]


@pytest.mark.parametrize("use_grouped_mm", [None, False])
def test_expert_lora_matches_dense_reference_outputs_and_grads(use_grouped_mm):
    layer = make_layer()
    layer.get_base_layer().use_grouped_mm = use_grouped_mm
    randomise_b(layer)
    x, tokens_per_expert = sorted_rows()
    x.requires_grad_(True)
    grad_out = torch.randn(x.shape[0], H)

    out = layer(x, tokens_per_expert)
    out.backward(grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    ref_lora = [t.detach().clone().requires_grad_(True) for t in lora_tensors(layer)]
    base = layer.get_base_layer()
    ref = dense_reference(x_ref, tokens_per_expert, base.gate_up_proj, base.down_proj, *ref_lora, ALPHA / R)
    ref.backward(grad_out)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    for got, want in zip(lora_tensors(layer), ref_lora, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_fresh_adapter_is_a_no_op_and_initialised_like_peft():
    layer = make_layer()
    x, tokens_per_expert = sorted_rows()
    assert torch.equal(layer(x, tokens_per_expert), layer.get_base_layer()(x, tokens_per_expert))
    a_gu, b_gu, a_d, b_d = lora_tensors(layer)
    assert a_gu.shape == (E, 2 * R, H) and b_gu.shape == (E, 2 * FFN, R)
    assert a_d.shape == (E, R, FFN) and b_d.shape == (E, H, R)
    assert not b_gu.any() and not b_d.any()
    # kaiming_uniform_(a=sqrt(5)) per expert: bound 1/sqrt(fan_in), fan_in = in features (H or F).
    assert 0.9 / math.sqrt(H) < a_gu.abs().max() <= 1 / math.sqrt(H)
    assert 0.9 / math.sqrt(FFN) < a_d.abs().max() <= 1 / math.sqrt(FFN)


def test_rslora_scaling():
    assert make_layer(use_rslora=True).scaling["default"] == ALPHA / math.sqrt(R)
    assert make_layer().scaling["default"] == ALPHA / R


def test_dropout_acts_on_the_lora_input_only_in_training():
    layer = make_layer(dropout=0.5)
    randomise_b(layer)
    x, tokens_per_expert = sorted_rows()
    base = layer.get_base_layer()
    ref = dense_reference(x, tokens_per_expert, base.gate_up_proj, base.down_proj, *lora_tensors(layer), ALPHA / R)
    layer.eval()
    torch.testing.assert_close(layer(x, tokens_per_expert), ref, atol=1e-5, rtol=1e-5)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x, tokens_per_expert), ref, atol=1e-3)


def test_merge_adds_the_exact_delta_and_unmerge_removes_it():
    layer = make_layer()
    randomise_b(layer)
    base = layer.get_base_layer()
    gate_up_before, down_before = base.gate_up_proj.detach().clone(), base.down_proj.detach().clone()
    x, tokens_per_expert = sorted_rows()
    adapted = layer(x, tokens_per_expert)

    layer.merge()
    assert layer.merged
    a_gu, b_gu, a_d, b_d = lora_tensors(layer)
    scaling = ALPHA / R
    for e in range(E):
        w1 = gate_up_before[e, :FFN] + scaling * b_gu[e, :FFN] @ a_gu[e, :R]
        w3 = gate_up_before[e, FFN:] + scaling * b_gu[e, FFN:] @ a_gu[e, R:]
        torch.testing.assert_close(base.gate_up_proj[e], torch.cat((w1, w3)), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(base.down_proj[e], down_before[e] + scaling * b_d[e] @ a_d[e], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer(x, tokens_per_expert), adapted, atol=1e-5, rtol=1e-5)

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.gate_up_proj, gate_up_before, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base.down_proj, down_before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"lora_bias": True}, {"init_lora_weights": "pissa"}])
def test_unsupported_lora_options_are_clear_errors(option):
    with pytest.raises(ValueError, match="experts"):
        make_layer(**option)
