"""QLoRA's 4-bit base (model/quant.py): the quantized model against the unquantized model built from
its dequantized weights, LoRA on top, the per-expert dequantization, loading and the bytes held."""

import dataclasses

import pytest
import torch

from model import Mixtral, MixtralConfig
from model.checkpoint import load_pretrained, save_pretrained
from model.lora import apply_lora
from model.moe import MixtralExperts, grouped_mm
from model.quant import (
    NF4Experts,
    base_nbytes,
    dequantized_state_dict,
    is_nf4_linear,
    nf4_round_trip,
    quantize_model,
)
from pipeline.distributed.expert_parallel import ExpertPlacement, load_local_experts

pytest.importorskip("bitsandbytes")


def tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Mixtral(MixtralConfig.preset("tiny"), dtype=dtype)


def dequantized_twin(quantized: Mixtral, dtype) -> Mixtral:
    """The plain model holding the quantized model's weights, dequantized."""
    twin = Mixtral(quantized.config, device="meta", dtype=dtype)
    twin.load_state_dict(dequantized_state_dict(quantized), assign=True, strict=True)
    return twin


def batch(cfg, seed=1, b=2, s=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    docs = torch.cat([torch.zeros(b, s // 2), torch.ones(b, s - s // 2)], dim=1).long()
    return ids, docs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_forward_equals_dequantized_model(dtype):
    q = quantize_model(tiny(dtype=dtype))
    layer = q.layers[0]
    assert is_nf4_linear(layer.self_attn.q_proj) and isinstance(layer.moe.experts.gate_up_proj, NF4Experts)
    # Embeddings, norms, router and LM head keep the base dtype; nothing in the base trains.
    assert q.embed_tokens.weight.dtype == q.lm_head.weight.dtype == layer.moe.gate.weight.dtype == dtype
    assert not any(p.requires_grad for p in q.parameters())
    twin = dequantized_twin(q, dtype)
    ids, docs = batch(q.config)
    with torch.no_grad():
        a, b = q(ids, document_ids=docs, labels=ids), twin(ids, document_ids=docs, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    # And the 4-bit weights are a real approximation of the originals, not zeros.
    original = tiny(dtype=dtype).layers[0].moe.experts.gate_up_proj.float()
    error = (twin.layers[0].moe.experts.gate_up_proj.float() - original).abs().mean() / original.abs().mean()
    assert 0 < error < 0.15


def test_qlora_matches_lora_on_the_dequantized_base():
    """Same adapters over the 4-bit base and over its dequantized twin: loss and every adapter
    gradient agree (the 4-bit expert products and their backward are exact)."""
    q = quantize_model(tiny())
    twin = dequantized_twin(q, torch.float32).requires_grad_(False)
    models = [apply_lora(m, 4, 8, init_lora_weights=False) for m in (q, twin)]
    adapters = {n: p for n, p in models[0].state_dict().items() if "lora_" in n}
    models[1].load_state_dict(adapters, strict=False)  # same adapter weights
    ids, docs = batch(q.config)
    grads, losses = [], []
    for m in models:
        out = m(ids, document_ids=docs, labels=ids)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 24  # 2 layers x (4 x attn A/B + 4 expert)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.dtype == torch.float32 for p in models[0].parameters() if p.requires_grad)


def test_expert_products_dequantize_one_expert_block_at_a_time(monkeypatch):
    torch.manual_seed(0)
    experts = MixtralExperts(4, 32, 48)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    stack = NF4Experts.from_weight(experts.gate_up_proj.detach())
    shapes = []
    dequantize = NF4Experts.dequantize
    monkeypatch.setattr(NF4Experts, "dequantize", lambda self, e: shapes.append(e) or dequantize(self, e))
    x = torch.randn(10, 32, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])
    y = grouped_mm(x, stack, counts)
    y.square().sum().backward()
    assert shapes == [0, 2, 3, 0, 2, 3]  # non-empty experts only, forward then backward, one at a time
    w = torch.stack([dequantize(stack, e) for e in range(4)])
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = grouped_mm(x_ref, w, counts, use_grouped_mm=False)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_round_trip_and_loading_quantize_tensor_by_tensor(tmp_path):
    model = tiny()
    save_pretrained(model, tmp_path, max_shard_size="2MB")  # several shards
    whole = dequantized_state_dict(quantize_model(load_pretrained(tmp_path)))
    loaded = load_pretrained(tmp_path, quantization="nf4")
    assert loaded.quantization == "nf4" and loaded.is_loaded_in_4bit
    for name, tensor in dequantized_state_dict(loaded).items():
        assert torch.equal(tensor, whole[name]), name
    # Expert parallelism: a rank reads and quantizes only its experts.
    part = load_local_experts(tmp_path, ExpertPlacement(8, 4, 2), quantization="nf4")  # experts 4 and 5
    stack = part.layers[1].moe.experts.down_proj
    assert stack.shape[0] == 2
    assert torch.equal(stack.dequantize_all(), whole["layers.1.moe.experts.down_proj"][4:6])
    # What export merges into: the same numbers from the full-precision tensor alone.
    for name in ("layers.0.self_attn.k_proj.weight", "layers.0.moe.experts.gate_up_proj"):
        native = dict(model.named_parameters())[name].detach()
        assert torch.equal(nf4_round_trip(native, torch.float32), whole[name])


def test_4bit_base_is_under_0_3x_the_bf16_base():
    """A preset with Mixtral-8x7B's proportions (experts dominate; a 512-id vocabulary keeps the
    embeddings' share near 8x7B's 0.6%): the stored bytes of the 4-bit base against bf16."""
    cfg = dataclasses.replace(MixtralConfig.preset("bench-small"), num_hidden_layers=2, intermediate_size=896,
                              vocab_size=512)
    torch.manual_seed(0)
    model = Mixtral(cfg, dtype=torch.bfloat16).requires_grad_(False)  # a frozen base, as under LoRA
    bf16_bytes = base_nbytes(model)
    ratio = base_nbytes(quantize_model(model)) / bf16_bytes
    assert ratio <= 0.3, ratio


def test_merging_into_a_4bit_stack_quantizes_the_merged_expert():
    q = quantize_model(tiny())
    peft_model = apply_lora(q, 4, 8, init_lora_weights=False)
    layer = peft_model.base_model.model.layers[0].moe.experts
    before = layer.get_base_layer().gate_up_proj.dequantize(1).float()
    delta, _ = layer.get_delta_weight("default", 1)
    layer.merge()
    after = layer.get_base_layer().gate_up_proj.dequantize(1).float()
    assert torch.equal(after, nf4_round_trip(before + delta, torch.float32))
