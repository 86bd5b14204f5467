"""A training step on CUDA as the GPU runs it: `pytest -m cuda tests/gpu` on a GPU machine (make bench-gpu).

bf16 base weights, fp32 LoRA adapters, bf16 autocast, packed rows, the default kernels ("auto":
varlen attention where torch has it, torch._grouped_mm on padded expert groups). Checked here and
nowhere else (CPU tests count the same syncs with the accelerator path forced, tests/model):
- torch.cuda.set_sync_debug_mode("error") passes the layers' forward and backward: no host sync
  inside a layer; a whole step (layout and loss included) syncs a fixed number of times;
- the real varlen and FlexAttention kernels, forward and backward, equal the mask path;
- an expert that gets no rows never reaches torch._grouped_mm as an empty group, forward and backward;
- compiled layers (inductor) train like eager, with 0 graph breaks inside a layer.
The expert-parallel dispatch over NCCL (one sync per layer) has its own test (issue 14's
tests/gpu/test_nccl_expert_parallel.py).
"""

import contextlib
import warnings

import pytest
import torch
from packed_batches import packed_rows, preference_rows

from model import Mixtral, MixtralConfig
from model.attention import build_attention_mask, rope_cos_sin, varlen_available

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
BF16 = torch.bfloat16


def lora_model(num_layers: int = 2, lora: bool = True):
    """The tiny shape in bf16 on the GPU, LoRA r=8 (bf16 rows of 16 bytes for torch._grouped_mm)."""
    cfg = MixtralConfig.preset("tiny")
    cfg.num_hidden_layers, cfg.vocab_size = num_layers, 300
    torch.manual_seed(0)
    model = Mixtral(cfg, device=CUDA, dtype=BF16)
    if not lora:
        return model
    from model.lora import apply_lora

    model.requires_grad_(False)
    model = apply_lora(model, r=8, alpha=16, init_lora_weights=False)  # B non-zero: the adapters act
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def sync_debug(mode: str):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def counted_syncs():
    """Host syncs inside, as set_sync_debug_mode("warn") reports them (a list of 'file:line')."""
    found = []
    with sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
        torch.cuda.synchronize()
    found += [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_layers_forward_and_backward_never_sync(lora):
    model = lora_model(2, lora)
    ids, docs, positions, _ = packed_rows(device=CUDA)
    layout = base_of(model).batch_layout(ids, docs)  # the batch's one read, outside
    grad = torch.randn(2, 48, 300, device=CUDA)
    with torch.autocast("cuda", dtype=BF16), sync_debug("error"):
        out = model(input_ids=ids, position_ids=positions, layout=layout)
        loss = (out.logits.float() * grad).sum() + 0.02 * out.aux_loss + 0.001 * out.z_loss
        loss.backward()


def sft_step(model, rows):
    ids, docs, positions, labels = rows
    with torch.autocast("cuda", dtype=BF16):
        out = model(input_ids=ids, position_ids=positions, document_ids=docs, labels=labels, loss_reduction="sum", logits_chunk_size=16)
    (out.loss + 0.02 * out.aux_loss).backward()


def test_sft_step_syncs_a_fixed_number_of_times():
    """The batch layout (one read) and the labelled tokens of the loss (one nonzero), whatever the depth."""
    rows = packed_rows(device=CUDA)
    counts = {}
    for layers in (2, 4):
        model = lora_model(layers)
        sft_step(model, rows)  # warm-up: first calls may set things up
        with counted_syncs() as syncs:
            sft_step(model, rows)
        counts[layers] = syncs
    assert len(counts[2]) == len(counts[4]) == 2, counts


def test_dpo_step_syncs_a_fixed_number_of_times():
    from pipeline.recipe import DPOSection
    from pipeline.training.batches import collate_pairs
    from pipeline.training.tasks import DPOTask, Reference

    batch = {k: v.to(CUDA) for k, v in collate_pairs(preference_rows()).items()}
    counts = {}
    for layers in (2, 4):
        model = lora_model(layers)
        task = DPOTask(DPOSection(), aux_coef=0.02, z_coef=0.0, reference=Reference(None), logits_chunk_size=8)
        for _ in range(2):  # warm-up, then counted
            with counted_syncs() as syncs, torch.autocast("cuda", dtype=BF16):
                out = task.forward(model, batch)
                (out.loss_sum + out.extra).backward()
        counts[layers] = syncs
    # policy and reference forwards (a layout and a loss each) and the task's token count
    assert len(counts[2]) == len(counts[4]) == 5, counts


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_attention_kernels_on_cuda_equal_the_mask_path(backend):
    if backend == "varlen" and not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    from model.attention import Attention, batch_layout

    cfg = MixtralConfig.preset("tiny-odd")  # kv heads < heads
    torch.manual_seed(0)
    attn = Attention(cfg, device=CUDA, dtype=BF16)
    _, docs, positions, _ = packed_rows(device=CUDA)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, BF16)
    x = torch.randn(2, 48, cfg.hidden_size, device=CUDA, dtype=BF16)
    real = docs >= 0
    weight = torch.randn(2, 48, cfg.hidden_size, device=CUDA, dtype=BF16) * real[..., None]
    results = []
    for how in (build_attention_mask(2, 48, CUDA, docs), batch_layout(2, 48, CUDA, docs, backend=backend).attention):
        xi = x.clone().requires_grad_()
        attn.zero_grad()
        out = attn(xi, cos, sin, how)
        (out * weight).sum().backward()
        results.append((out[real].float(), xi.grad[real].float(), [p.grad.float() for p in attn.parameters()]))
    (out_m, dx_m, dw_m), (out_k, dx_k, dw_k) = results
    torch.testing.assert_close(out_k, out_m, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx_k, dx_m, atol=5e-2, rtol=5e-2)
    for a, b in zip(dw_k, dw_m, strict=True):
        torch.testing.assert_close(a, b, atol=0.25, rtol=5e-2)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_an_expert_without_rows_on_cuda_bf16(lora):
    """Forward and backward through torch._grouped_mm with one expert routed no rows: padded groups,
    same results as the per-expert loop (run under `timeout`: the upstream bug is a hang)."""
    from model.moe import MixtralExperts

    counts = torch.tensor([40, 0, 24, 64], device=CUDA)
    torch.manual_seed(0)
    x = torch.randn(128, 64, device=CUDA, dtype=BF16)
    g = torch.randn(128, 64, device=CUDA, dtype=BF16)
    results = []
    for use in (None, False):
        torch.manual_seed(0)
        holder = torch.nn.Module()
        holder.experts = MixtralExperts(4, 64, 96, device=CUDA, dtype=BF16)
        torch.nn.init.normal_(holder.experts.gate_up_proj, std=0.1)
        torch.nn.init.normal_(holder.experts.down_proj, std=0.1)
        if lora:
            from model.lora import apply_lora

            holder = apply_lora(holder, r=8, alpha=16, target_modules=["experts"], init_lora_weights=False)
        holder.experts.use_grouped_mm = use
        xi = x.clone().requires_grad_()
        y = holder.experts(xi, counts)
        y.backward(g)
        grads = {n: p.grad.float() for n, p in holder.named_parameters() if p.grad is not None}
        results.append((y.float(), xi.grad.float(), grads))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    torch.testing.assert_close(y, y_ref, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(dx, dx_ref, atol=3e-2, rtol=3e-2)
    assert dw.keys() == dw_ref.keys()
    for name in dw:
        torch.testing.assert_close(dw[name], dw_ref[name], atol=5e-2, rtol=5e-2, msg=name)
        if "lora" in name or name.endswith("_proj"):
            assert dw[name][1].abs().max() == 0, f"{name}: the expert without rows got a gradient"


def test_compiled_layers_on_cuda_train_like_eager_without_graph_breaks():
    rows = packed_rows(device=CUDA)
    ids, docs, positions, _ = rows
    model = lora_model(2)
    base = base_of(model)
    layout = base.batch_layout(ids, docs)
    h = base.embed_tokens(ids)
    cos, sin = rope_cos_sin(positions, base.config.head_dim, base.config.rope_theta, h.dtype)
    torch._dynamo.reset()
    with torch.autocast("cuda", dtype=BF16):
        explanation = torch._dynamo.explain(base.layers[0])(h, cos, sin, layout)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]

    def step():
        model.zero_grad()
        sft_step(model, rows)
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    want = step()
    torch._dynamo.reset()
    base.compile_blocks()
    for _ in range(2):  # the second call runs the cached graphs
        got = step()
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=5e-2, rtol=5e-2, msg=name)
    with sync_debug("error"), torch.autocast("cuda", dtype=BF16):  # compiled, still no sync in a layer
        out = model(input_ids=ids, position_ids=positions, layout=layout)
        out.logits.float().sum().backward()
