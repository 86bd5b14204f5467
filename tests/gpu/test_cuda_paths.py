"""The CUDA code paths against the CPU ones: `pytest -m cuda tests/gpu` on a GPU machine.

CI has no GPU, so these skip there; a session lent a GPU runs them first (then `make bench-gpu`).
Each compares a CUDA result with the same computation on the CPU (fp32, where the CPU path is the
tested reference) or with a bf16 tolerance: torch._grouped_mm dispatch, per-document attention
(the batch layout built on the device), the frozen-head CE, the KV cache and LoRA on the experts
through the unfused (CUDA) path. A training step as the GPU runs it (bf16, syncs, kernels,
compiled layers): test_cuda_step.py.
"""

import pytest
import torch
from packed_batches import packed_rows

from model import KVCache, Mixtral, MixtralConfig
from model.losses import chunked_lm_loss, masked_ce
from model.moe import grouped_mm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_grouped_mm_on_cuda_matches_the_per_expert_loop(dtype, tol):
    torch.manual_seed(0)
    # No empty group here: grouped_mm hands torch._grouped_mm what it gets, and an empty group is the
    # upstream bug (a backward hang); the experts pad their groups (test_cuda_step.py).
    counts = torch.tensor([40, 8, 24, 64], device=CUDA)
    x = torch.randn(int(counts.sum()), 64, device=CUDA, dtype=dtype, requires_grad=True)
    w = (torch.randn(4, 96, 64, device=CUDA, dtype=dtype) * 0.1).requires_grad_()
    grad = torch.randn(x.shape[0], 96, device=CUDA, dtype=dtype)
    results = []
    for use in (None, False):
        y = grouped_mm(x, w, counts, use_grouped_mm=use)
        results.append((y, *torch.autograd.grad(y, (x, w), grad)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_model_on_cuda_equals_cpu_on_packed_rows_fp32():
    cfg = MixtralConfig.preset("tiny-odd")
    cfg.vocab_size = 300
    torch.manual_seed(0)
    cpu_model = Mixtral(cfg)
    cuda_model = Mixtral(cfg, device=CUDA)
    cuda_model.load_state_dict(cpu_model.state_dict())
    ids, docs, positions, _ = packed_rows(cfg.vocab_size)
    labels = ids.clone()
    outs = []
    for model, device in ((cpu_model, "cpu"), (cuda_model, CUDA)):
        model.zero_grad()
        out = model(ids.to(device), position_ids=positions.to(device), document_ids=docs.to(device),
                    labels=labels.to(device), loss_reduction="sum", logits_chunk_size=16)
        (out.loss + 0.02 * out.aux_loss).backward()
        outs.append((out.loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (loss_cpu, grads_cpu), (loss_cuda, grads_cuda) = outs
    torch.testing.assert_close(loss_cuda, loss_cpu, atol=1e-3, rtol=1e-5)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_cuda[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_kv_cache_on_cuda_bf16_follows_the_full_forward():
    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 300
    torch.manual_seed(0)
    model = Mixtral(cfg, device=CUDA, dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (1, 20), device=CUDA)
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = KVCache(cfg.num_hidden_layers)
        steps = [model(ids[:, :12], kv_cache=cache).logits] + [
            model(ids[:, i : i + 1], kv_cache=cache).logits for i in range(12, 20)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full, atol=5e-2, rtol=5e-2)


def test_frozen_head_ce_on_cuda_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(40, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(500, 64, device=CUDA, dtype=torch.bfloat16)
    targets = torch.randint(0, 500, (40,), device=CUDA)
    targets[:5] = -100
    fused = chunked_lm_loss(hidden, weight, targets, chunk_size=16, reduction="sum")
    (g_fused,) = torch.autograd.grad(fused, hidden)
    plain = masked_ce(hidden @ weight.T, targets, "sum")
    (g_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(g_fused.float(), g_plain.float(), atol=3e-2, rtol=3e-2)


def test_expert_lora_on_cuda_equals_cpu_fp32():
    from model.lora import apply_lora

    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 300
    torch.manual_seed(0)
    cpu_model = apply_lora(Mixtral(cfg), r=4, alpha=8)
    with torch.no_grad():  # a non-zero B (PEFT starts it at zero), so the adapters act
        for name, p in cpu_model.named_parameters():
            if any(part == "lora_B" or (part.startswith("lora_") and part.endswith("_B")) for part in name.split(".")):
                p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    cuda_model = apply_lora(Mixtral(cfg, device=CUDA), r=4, alpha=8)
    cuda_model.load_state_dict(cpu_model.state_dict())
    ids, docs, positions, _ = packed_rows(cfg.vocab_size)
    results = []
    for model, device in ((cpu_model, "cpu"), (cuda_model, CUDA)):
        out = model(input_ids=ids.to(device), position_ids=positions.to(device),
                    document_ids=docs.to(device), labels=ids.to(device), loss_reduction="sum")
        out.loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach().cpu(), grads))
    (loss_cpu, grads_cpu), (loss_cuda, grads_cuda) = results
    assert grads_cpu and set(grads_cpu) == set(grads_cuda)
    assert any("experts" in name for name in grads_cpu)
    torch.testing.assert_close(loss_cuda, loss_cpu, atol=1e-3, rtol=1e-5)
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_cuda[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def _base_and_adapter(tmp_path):
    """A tiny base checkpoint and a random LoRA adapter on it (attention and experts)."""
    from model.checkpoint import save_pretrained
    from model.lora import apply_lora

    torch.manual_seed(0)
    base = Mixtral(MixtralConfig.preset("tiny"))
    save_pretrained(base, tmp_path / "base")
    adapter = apply_lora(base, r=4, alpha=8)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    adapter.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def _within_one_bf16_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-30).all())


@pytest.mark.parametrize("qlora", [False, True])
def test_eval_merge_on_cuda_equals_the_host_merge(tmp_path, qlora):
    """`adapter_merge.load_merged` merges where the model goes (eval: the GPU); the host's merge is
    export's default. fp32: equal to float rounding; bf16: at most one bf16 step apart (the GEMM's
    last bit). QLoRA: bitsandbytes' CUDA NF4 round trip against its CPU one."""
    from pipeline.adapter_merge import load_merged
    from pipeline.run_record import Source

    base, adapter = _base_and_adapter(tmp_path)
    quantized = {str(adapter): {"type": "nf4", "dtype": "bfloat16"}} if qlora else {}
    source = Source(base, [adapter], [], quantized)
    for dtype in (torch.float32, torch.bfloat16):
        host = load_merged(source, dtype=dtype, device="cpu").state_dict()
        gpu = load_merged(source, dtype=dtype, device=CUDA).state_dict()
        assert set(host) == set(gpu)
        for name, want in host.items():
            assert gpu[name].device.type == "cuda"
            got = gpu[name].cpu()
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
            else:
                assert _within_one_bf16_step(got, want), name


def test_export_merged_on_cuda_writes_the_host_export_within_a_bf16_step(tmp_path):
    from safetensors.torch import load_file

    from pipeline.config import build
    from pipeline.export import ExportRecipe, export

    base, adapter = _base_and_adapter(tmp_path)
    written = {}
    for device in ("cpu", "cuda"):
        raw = {"source": {"checkpoint": str(base), "adapters": [str(adapter)]}, "output_dir": str(tmp_path / device),
               "export": {"merge_device": device, "progress_bar": False}, "verify": {"enabled": False}}
        out = export(build(ExportRecipe, raw, source="test"), log=lambda _: None)
        written[device] = load_file(str(out / "model.safetensors"))
    assert set(written["cpu"]) == set(written["cuda"])
    for name, want in written["cpu"].items():
        assert _within_one_bf16_step(written["cuda"][name], want), name
