"""Expert-parallel dispatch on a real NCCL group: `pytest -m cuda tests/gpu` on a GPU machine.

NCCL refuses two ranks on one GPU, so one GPU runs an EP group of size 1 forced through the whole
dispatch: the count exchange, the uneven all_to_all forward and back, the regrouping by local
expert and the stats gather, all on the device `pipeline.distributed.comm.group_device` picks for NCCL. gloo
accepts CPU tensors where NCCL does not, so this is the check the CPU suite cannot make. It also
counts the host syncs of one layer's dispatch with CUDA's sync debug mode: exactly one (the split
sizes the uneven all_to_all needs), none in combine or backward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from model.moe import MoEBlock
from pipeline.distributed.comm import group_device
from pipeline.distributed.expert_parallel import (
    ExpertParallelDispatch,
    ExpertParallelStats,
    ExpertPlacement,
    gather_expert_tensor,
    install_dispatch,
)
from pipeline.distributed.parallel import expert_load_imbalance

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA + NCCL"),
]
E, H, F, K = 8, 64, 128, 2


@pytest.fixture
def nccl_group(tmp_path):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = MoEBlock(H, F, E, K, device="cuda")

    def forward(self, h):
        return self.moe(h)[0]


def _model(lora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _Holder()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    if lora:
        from model.lora import apply_lora

        model = apply_lora(model, r=4, alpha=8, target_modules=["experts"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.1)
    return model


def test_nccl_group_communicates_on_the_current_gpu(nccl_group):
    assert group_device(nccl_group) == torch.device("cuda", torch.cuda.current_device())
    counts = torch.zeros(1, E, dtype=torch.long)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_to_all_single(torch.empty_like(counts), counts, group=nccl_group)  # what the old dispatch did


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ep1_dispatch_through_all_to_all_equals_the_plain_block(nccl_group, lora):
    torch.manual_seed(1)
    h = torch.randn(2, 24, H, device="cuda")
    upstream = torch.randn(2, 24, H, device="cuda")
    ref = _model(lora)
    (ref(h) * upstream).sum().backward()
    model = _model(lora)
    stats = install_dispatch(model, ExpertPlacement(E, 1, 0), nccl_group)
    out = model(h)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out, ref(h), rtol=1e-5, atol=1e-5)
    want = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    assert stats.calls == 1 and stats.local_expert_rows.device.type == "cuda"
    assert int(stats.local_expert_rows.sum()) == 2 * 24 * K
    metrics = expert_load_imbalance(stats, nccl_group)
    assert metrics["ep/rank_rows_max"] == metrics["ep/rank_rows_min"] == 2 * 24 * K
    experts = next(m for n, m in model.named_modules() if n.endswith("moe.experts"))
    weight = experts.get_base_layer().gate_up_proj if lora else experts.gate_up_proj
    assert torch.equal(gather_expert_tensor(weight.detach(), nccl_group), weight.detach())


def test_one_host_sync_per_dispatch_none_in_combine_or_backward(nccl_group):
    hooks = ExpertParallelDispatch(ExpertPlacement(E, 1, 0), nccl_group, ExpertParallelStats())
    x = torch.randn(40, H, device="cuda", requires_grad=True)
    tokens_per_expert = torch.tensor([5, 0, 7, 3, 9, 0, 10, 6], device="cuda")
    torch.cuda.synchronize()

    def syncs(fn):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return result, sum("synchronizing" in str(w.message) for w in caught)

    (rows, local_counts), dispatched = syncs(lambda: hooks.dispatch(None, (x, tokens_per_expert)))
    y, combined = syncs(lambda: hooks.combine(None, (rows, local_counts), rows * 2.0))
    _, backward = syncs(lambda: y.sum().backward())
    assert (dispatched, combined, backward) == (1, 0, 0)
    torch.testing.assert_close(y, 2.0 * x.detach())
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
