"""LoRA on attention and experts through PEFT: the grouped expert layer against a dense per-expert loop,
and the PEFT workflows (merge, disable, save/load, trainable parameters) on the native model."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from model import Mixtral, MixtralConfig
from model.lora import ExpertLoraLayer, apply_lora, valid_lora_targets
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
    layer.use_grouped_mm = use_grouped_mm  # one switch for the base and the LoRA GEMMs
    assert layer.get_base_layer().use_grouped_mm is use_grouped_mm and layer.num_experts == E
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


def test_expert_lora_on_a_bf16_base_computes_in_autocast_dtype_and_keeps_fp32_adapters():
    """Under autocast the LoRA products run in its dtype (the fp32 adapter weights are cast, as PEFT's
    LoRA layers on the attention do); outside it they run in the adapters' fp32. Both stay within
    bf16 tolerance of the fp32 reference, and the adapter gradients are fp32."""
    layer = make_layer()
    randomise_b(layer)
    layer.get_base_layer().to(torch.bfloat16)
    x, tokens_per_expert = sorted_rows()
    x_bf16 = x.to(torch.bfloat16)
    assert layer._lora_gate_up("default", x_bf16, tokens_per_expert).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._lora_gate_up("default", x_bf16, tokens_per_expert).dtype == torch.bfloat16
        assert layer._lora_down("default", x_bf16[:, :1].expand(-1, FFN), tokens_per_expert).dtype == torch.bfloat16

    grad_out = torch.randn(x.shape[0], H)
    base = layer.get_base_layer()
    ref_lora = [t.detach().clone().requires_grad_(True) for t in lora_tensors(layer)]
    ref = dense_reference(x, tokens_per_expert, base.gate_up_proj.float(), base.down_proj.float(), *ref_lora, ALPHA / R)
    ref.backward(grad_out)
    for autocast in (False, True):
        for t in lora_tensors(layer):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x_bf16, tokens_per_expert)
        out.float().backward(grad_out)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
        for got, want in zip(lora_tensors(layer), ref_lora, strict=True):
            assert got.dtype == got.grad.dtype == torch.float32
            torch.testing.assert_close(got.grad, want.grad, atol=5e-2, rtol=5e-2)


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


def test_init_lora_weights_false_draws_a_and_b_like_peft_linear():
    layer = make_layer(init_lora_weights=False)
    a_gu, b_gu, a_d, b_d = lora_tensors(layer)
    # PEFT's nn.Linear A and B keep kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(in)); B is not zero.
    for tensor, fan_in in ((a_gu, H), (b_gu, R), (a_d, FFN), (b_d, R)):
        assert torch.isfinite(tensor).all()
        assert 0.9 / math.sqrt(fan_in) < tensor.abs().max() <= 1 / math.sqrt(fan_in)
    peft_q = apply_lora(
        Mixtral(MixtralConfig.preset("tiny")), R, ALPHA, 0.0, ["q_proj"], init_lora_weights=False
    )
    peft_b = peft_q.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert 0.9 / math.sqrt(R) < peft_b.abs().max() <= 1 / math.sqrt(R)
    x, tokens_per_expert = sorted_rows()
    assert not torch.allclose(layer(x, tokens_per_expert), layer.get_base_layer()(x, tokens_per_expert))
    gaussian = make_layer(init_lora_weights="gaussian")
    assert not lora_tensors(gaussian)[1].any()
    assert lora_tensors(gaussian)[0].std().item() == pytest.approx(1 / R, rel=0.1)


def test_rslora_scaling():
    assert make_layer(use_rslora=True).scaling["default"] == ALPHA / math.sqrt(R)
    assert make_layer().scaling["default"] == ALPHA / R


def test_dropout_acts_on_the_lora_input_only_in_training():
    layer = make_layer(dropout=0.5)
    randomise_b(layer)
    x, tokens_per_expert = sorted_rows()
    base = layer.get_base_layer()
    ref = dense_reference(
        x, tokens_per_expert, base.gate_up_proj, base.down_proj, *lora_tensors(layer), ALPHA / R
    )
    layer.eval()
    torch.testing.assert_close(layer(x, tokens_per_expert), ref, atol=1e-5, rtol=1e-5)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x, tokens_per_expert), ref, atol=1e-3)


def test_fused_cpu_path_with_dropout_matches_the_per_expert_loop_in_outputs_and_grads():
    # The CPU fp32 default adds the LoRA products inside the base GEMMs (_ExpertLoraMM); with
    # dropout its LoRA input is a different tensor from the base input, and x gets both gradients.
    grads = []
    for use_grouped_mm in (None, False):
        layer = make_layer(dropout=0.5)
        layer.use_grouped_mm = use_grouped_mm
        randomise_b(layer)
        x, tokens_per_expert = sorted_rows()
        x.requires_grad_(True)
        torch.manual_seed(3)  # the same dropout masks on both paths (drawn in the same order)
        out = layer(x, tokens_per_expert)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)))
        grads.append([out, x.grad, *(t.grad for t in lora_tensors(layer))])
    for fused, loop in zip(*grads, strict=True):
        torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)


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
        torch.testing.assert_close(
            base.down_proj[e], down_before[e] + scaling * b_d[e] @ a_d[e], atol=1e-6, rtol=1e-6
        )
    torch.testing.assert_close(layer(x, tokens_per_expert), adapted, atol=1e-5, rtol=1e-5)

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.gate_up_proj, gate_up_before, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(base.down_proj, down_before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"lora_bias": True}, {"init_lora_weights": "pissa"}])
def test_unsupported_lora_options_are_clear_errors(option):
    with pytest.raises(ValueError, match="experts"):
        make_layer(**option)


# ---- the PEFT workflows on the native model ---------------------------------------------------


def tiny_model(seed: int = 0) -> Mixtral:
    torch.manual_seed(seed)
    return Mixtral(MixtralConfig.preset("tiny"))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    input_ids = torch.randint(0, 32000, (2, 12))
    return input_ids, input_ids.clone()


def trained_lora_model(seed: int = 0, **kwargs) -> PeftModel:
    """A LoRA model whose B are non-zero, as after training (attention B included)."""
    peft_model = apply_lora(tiny_model(seed), r=R, alpha=ALPHA, **kwargs)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or name.rpartition(".")[0].endswith("_B"):
                param.normal_(std=0.05)
    return peft_model


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def test_lora_wraps_attention_and_experts_and_changes_the_output():
    peft_model = trained_lora_model()
    names = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    assert "base_model.model.layers.1.moe.experts" in names
    assert "base_model.model.layers.0.self_attn.o_proj" in names
    assert isinstance(peft_model.base_model.model.layers[0].moe.experts, ExpertLoraLayer)
    input_ids, _ = batch()
    assert not torch.allclose(logits(peft_model, input_ids), logits(tiny_model(), input_ids), atol=1e-3)


def test_only_adapter_parameters_are_trainable_and_get_grads():
    peft_model = trained_lora_model()
    input_ids, labels = batch()
    peft_model(input_ids, labels=labels).loss.backward()
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    expected_suffixes = ("lora_A.default.weight", "lora_B.default.weight") + tuple(
        f"{name}.default" for name in ExpertLoraLayer.adapter_layer_names
    )
    assert trainable and all(name.endswith(expected_suffixes) for name in trainable)
    assert any(".experts.lora_down_A." in name for name in trainable)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_merged_model_equals_adapter_model():
    peft_model = trained_lora_model()
    input_ids, _ = batch()
    adapted = logits(peft_model, input_ids)
    base_gate_up = (
        peft_model.base_model.model.layers[0].moe.experts.get_base_layer().gate_up_proj.detach().clone()
    )

    peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, input_ids), adapted, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    experts = peft_model.base_model.model.layers[0].moe.experts
    torch.testing.assert_close(experts.get_base_layer().gate_up_proj, base_gate_up, atol=1e-6, rtol=1e-6)

    merged = peft_model.merge_and_unload()
    assert isinstance(merged, Mixtral) and type(merged.layers[0].moe.experts) is MixtralExperts
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=1e-5)


def test_disable_adapter_gives_the_base_model_exactly():
    peft_model = trained_lora_model()
    input_ids, _ = batch()
    base = logits(tiny_model(), input_ids)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, input_ids), base)
    assert not torch.allclose(logits(peft_model, input_ids), base, atol=1e-3)


def test_save_and_peft_from_pretrained_restore_the_adapter(tmp_path):
    peft_model = trained_lora_model(train_router=True)
    input_ids, _ = batch()
    adapted = logits(peft_model, input_ids)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.layers.0.moe.experts.lora_gate_up_A"].shape == (8, 2 * R, 64)
    assert any(key.endswith("moe.gate.weight") for key in saved)

    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert torch.equal(logits(reloaded, input_ids), adapted)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_train_router_trains_a_copy_of_the_router_that_disable_adapter_bypasses():
    peft_model = apply_lora(tiny_model(), r=R, alpha=ALPHA, target_modules=["experts"], train_router=True)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any(name.endswith("moe.gate.modules_to_save.default.weight") for name in trainable)
    with torch.no_grad():
        peft_model.base_model.model.layers[0].moe.gate.modules_to_save["default"].weight.mul_(3.0)
    input_ids, _ = batch()
    base = logits(tiny_model(), input_ids)
    assert not torch.allclose(logits(peft_model, input_ids), base, atol=1e-3)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, input_ids), base)


def test_a_second_named_adapter_can_be_added_and_switched():
    peft_model = trained_lora_model()
    input_ids, _ = batch()
    adapted = logits(peft_model, input_ids)
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["experts"]))
    peft_model.set_adapter("other")
    # The fresh adapter has B = 0: only "default"'s attention and expert deltas are gone.
    assert torch.equal(logits(peft_model, input_ids), logits(tiny_model(), input_ids))
    experts = peft_model.base_model.model.layers[0].moe.experts
    assert experts.lora_gate_up_A["other"].shape == (8, 4, 64)
    assert (
        experts.lora_gate_up_A["other"].requires_grad and not experts.lora_gate_up_A["default"].requires_grad
    )
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model, input_ids), adapted)


def test_bf16_base_keeps_fp32_adapters_and_runs():
    model = tiny_model().to(torch.bfloat16)
    peft_model = apply_lora(model, r=R, alpha=ALPHA)
    experts = peft_model.base_model.model.layers[0].moe.experts
    assert experts.lora_down_B["default"].dtype == torch.float32
    assert experts.get_base_layer().down_proj.dtype == torch.bfloat16
    input_ids, labels = batch()
    out = peft_model(input_ids, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and experts.lora_down_B["default"].grad.abs().sum() > 0


def test_valid_targets_and_unknown_target_errors():
    model = tiny_model()
    assert valid_lora_targets(model) == ("experts", "k_proj", "o_proj", "q_proj", "v_proj")
    with pytest.raises(
        ValueError, match=r"unknown lora target\(s\) \['w1'\].*valid targets are experts, k_proj"
    ):
        apply_lora(model, r=R, alpha=ALPHA, target_modules=["q_proj", "w1"])
    with pytest.raises(ValueError, match="train_router"):
        apply_lora(model, r=R, alpha=ALPHA, target_modules=["gate"])
    with pytest.raises(ValueError, match="list of module names"):
        apply_lora(model, r=R, alpha=ALPHA, target_modules="q_proj")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base_untouched():
    layer = make_layer()
    randomise_b(layer)
    with torch.no_grad():
        layer.lora_down_B["default"][3, 0, 0] = float("inf")
    before = layer.get_base_layer().gate_up_proj.detach().clone()
    with pytest.raises(ValueError, match="non-finite weights in expert 3"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.get_base_layer().gate_up_proj, before)


def test_lora_grads_are_the_same_under_activation_checkpointing():
    input_ids, labels = batch()
    grads = []
    for checkpointing in (False, True):
        peft_model = trained_lora_model()
        peft_model.base_model.model.gradient_checkpointing = checkpointing
        peft_model(input_ids, labels=labels).loss.backward()
        grads.append({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
