"""Expert-parallel dispatch: pure helpers, and ep=2 (2 gloo processes) against ep=1 in one process."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from model.moe import MoEBlock
from pipeline.distributed.expert_parallel import (
    ExpertPlacement,
    gather_expert_tensor,
    install_dispatch,
    load_local_experts,
    local_order,
    shard_experts,
    tag_expert_params,
)

E, H, F, K = 8, 32, 64, 2


def test_placement_blocks_and_errors():
    p = ExpertPlacement(num_experts=8, ep_size=4, ep_rank=3)
    assert (p.num_local, p.first, p.expert_ids) == (2, 6, [6, 7])
    with pytest.raises(ValueError, match="expert_parallel_size=3 must divide the number of experts"):
        ExpertPlacement(num_experts=8, ep_size=3, ep_rank=0)
    with pytest.raises(ValueError, match="ep_rank=2 is outside"):
        ExpertPlacement(num_experts=8, ep_size=2, ep_rank=2)


def test_load_local_experts_allocates_and_reads_only_this_ranks_experts(tmp_path):
    from safetensors.torch import load_file, save_file

    from model import Mixtral, MixtralConfig
    from model.checkpoint import save_pretrained

    cfg = MixtralConfig.preset("tiny")
    cfg.vocab_size = 64
    torch.manual_seed(0)
    whole = Mixtral(cfg)
    save_pretrained(whole, tmp_path)
    place = ExpertPlacement(num_experts=8, ep_size=4, ep_rank=3)  # experts 6 and 7
    # Sharding on the meta device allocates nothing and records the experts the model holds.
    meta = Mixtral(cfg, device="meta")
    shard_experts(meta, place)
    assert meta.expert_ids == [6, 7] and meta.layers[0].moe.experts.gate_up_proj.is_meta
    assert meta.layers[0].moe.experts.gate_up_proj.shape[0] == 2
    # Other ranks' experts are never read: the checkpoint may lack them.
    tensors = load_file(tmp_path / "model.safetensors")
    for name in [n for n in tensors if ".experts." in n and ".experts.6." not in n and ".experts.7." not in n]:
        del tensors[name]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    part = load_local_experts(tmp_path, place, dtype=torch.float32)
    assert part.expert_ids == [6, 7]
    for layer, ref in zip(part.layers, whole.layers, strict=True):
        assert torch.equal(layer.moe.experts.gate_up_proj, ref.moe.experts.gate_up_proj[6:])
        assert torch.equal(layer.moe.experts.down_proj, ref.moe.experts.down_proj[6:])
        assert torch.equal(layer.moe.gate.weight, ref.moe.gate.weight)


def test_local_order_regroups_source_major_rows_by_expert():
    # From rank 0: 2 rows for local expert 0, 1 for expert 1 -> rows 0,1 | 2.
    # From rank 1: 0 rows for expert 0, 3 for expert 1      -> rows 3,4,5.
    counts = torch.tensor([[2, 1], [0, 3]])
    # Expert 0: rank 0's rows 0,1; expert 1: rank 0's row 2, then rank 1's rows 3,4,5.
    assert local_order(counts).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[1, 2], [3, 0]])  # rows: r0e0 [0], r0e1 [1,2], r1e0 [3,4,5]
    assert local_order(counts).tolist() == [0, 3, 4, 5, 1, 2]
    assert local_order(counts, total=6).tolist() == [0, 3, 4, 5, 1, 2]  # M from the host: no device read
    assert local_order(torch.zeros(2, 4, dtype=torch.long)).tolist() == []


class _Holder(nn.Module):
    """The smallest tree with a `moe.experts` module, as in the Mixtral module tree."""

    def __init__(self):
        super().__init__()
        self.moe = MoEBlock(H, F, E, K)

    def forward(self, h, token_mask=None):
        return self.moe(h, token_mask)


def _full_model(lora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _Holder()
    nn.init.normal_(model.moe.gate.weight, std=0.5)
    nn.init.normal_(model.moe.experts.gate_up_proj, std=0.1)
    nn.init.normal_(model.moe.experts.down_proj, std=0.1)
    if lora:
        from model.lora import apply_lora

        model = apply_lora(model, r=4, alpha=8, target_modules=["experts"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(std=0.1)  # B starts at zero; make every adapter tensor matter
    return model


def _inputs(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    h = torch.randn(2, 6 + 3 * rank, H, generator=g)  # ranks see different token counts
    mask = torch.ones(2 * (6 + 3 * rank), dtype=torch.bool)
    mask[-2:] = False  # padding is neither routed nor computed
    upstream = torch.randn(2, 6 + 3 * rank, H, generator=g)  # a real gradient for grouped_mm on CPU
    return h, mask, upstream


def _loss(model, rank):
    h, mask, upstream = _inputs(rank)
    out, router_logits = model(h, mask)
    return (out * upstream).sum() + router_logits.square().mean()


def _trainable(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, world: int, init_file: str, lora: bool, use_grouped_mm: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # Reference: ep=1 on both ranks' inputs; the data-parallel objective is the mean of the ranks' losses.
        ref = _full_model(lora)
        ref_loss = [_loss(ref, r) for r in range(world)]
        sum(ref_loss).div(world).backward()
        ref_grads = {n: p.grad.clone() for n, p in _trainable(ref).items()}

        placement = ExpertPlacement(E, world, rank)
        torch.manual_seed(0)
        model = _Holder()
        model.load_state_dict(_full_model(False).state_dict())
        shard_experts(model, placement)
        if lora:
            from model.lora import apply_lora

            model = apply_lora(model, r=4, alpha=8, target_modules=["experts"])
            with torch.no_grad():  # this rank's slice of the reference adapters
                ref_params = dict(ref.named_parameters())
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(ref_params[name][placement.first : placement.first + placement.num_local])
        for name, module in model.named_modules():
            if name.endswith("moe.experts"):
                (module.get_base_layer() if lora else module).use_grouped_mm = None if use_grouped_mm else False
        tagged = tag_expert_params(model, placement)
        assert tagged == (6 if lora else 2)  # gate_up_proj, down_proj (+ 4 expert LoRA A/B)
        stats = install_dispatch(model, placement, dist.group.WORLD)

        loss = _loss(model, rank)
        torch.testing.assert_close(loss, ref_loss[rank], rtol=0, atol=1e-5)
        loss.div(world).backward()
        assert stats.all_to_all_bytes > 0 and stats.local_expert_rows.shape == (placement.num_local,)

        for name, p in _trainable(model).items():
            grad = p.grad
            if getattr(p, "allreduce", True):
                dist.all_reduce(grad)  # dense params: summed over ranks
            else:
                grad = gather_expert_tensor(grad, dist.group.WORLD)  # expert params: owned, not reduced
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ep2_forward_backward_equals_ep1(lora):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, lora, not lora), nprocs=2, join=True)
