"""ZeRO-3 building and loading (pipeline/distributed/sharded_load.py): 2 gloo processes against one.

The workers build the tiny model under `deepspeed.zero.Init`, fill it from a checkpoint whose
tensors are split over several files, and check each rank's partition against the same slice of the
whole tensors a one-process load gives: each rank holds exactly its elements and nothing else. A
forward before DeepSpeed's engine (`forward_gathers`), the optimizer groups and the preset init are
compared with one process too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import Mixtral, MixtralConfig
from model.checkpoint import load_pretrained, save_pretrained
from pipeline.distributed.sharded_load import _piece_range
from pipeline.safetensors_io import read_into, read_safetensors_header

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}


def test_piece_ranges_are_the_fused_layout():
    gate_up = torch.arange(2 * 6 * 3).view(2, 6, 3)  # [E, 2F, H], F = 3
    down = torch.arange(2 * 3 * 3).view(2, 3, 3)  # [E, H, F]
    for piece, expert, want in [("w1", 1, gate_up[1, :3]), ("w3", 1, gate_up[1, 3:]), ("w3", 0, gate_up[0, 3:])]:
        start, shape = _piece_range(gate_up.shape, piece, expert)
        assert torch.equal(gate_up.view(-1)[start:start + want.numel()].view(shape), want)
    start, shape = _piece_range(down.shape, "w2", 1)
    assert torch.equal(down.view(-1)[start:start + 9].view(shape), down[1])
    assert _piece_range(down.shape, "all", None) == (0, (2, 3, 3))


def test_stored_elements_read_a_flat_range_with_conversion(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(5, 7)
    save_file({"t": t.to(torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    stored = read_safetensors_header(tmp_path / "x.safetensors")["t"]
    dest = torch.empty(11)
    fd = os.open(tmp_path / "x.safetensors", os.O_RDONLY)
    try:
        read_into(fd, stored.elements(9, 20), dest, torch.empty(8, dtype=torch.uint8), "x")  # 4-element chunks
    finally:
        os.close(fd)
    assert torch.equal(dest, t.to(torch.bfloat16).float().view(-1)[9:20])
    with pytest.raises(ValueError, match="outside"):
        stored.elements(30, 36)


def _checkpoint(root: Path) -> Path:
    torch.manual_seed(3)
    save_pretrained(Mixtral(MixtralConfig.preset("tiny")), root / "ckpt", max_shard_size="300KB")
    return root / "ckpt"


def _worker(rank: int, world: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world)
    try:
        import deepspeed

        from pipeline.distributed import parallel
        from pipeline.distributed.expert_parallel import ExpertPlacement
        from pipeline.distributed.sharded_load import (
            checkpoint_loader,
            forward_gathers,
            is_partitioned,
            own_range,
            random_init,
        )
        from pipeline.training.optim import param_groups

        torch.set_num_threads(1)
        ckpt = Path(root) / "ckpt"
        whole = load_pretrained(ckpt)
        model = checkpoint_loader(torch.float32, None, DS_CONFIG)(ckpt)
        reference = dict(whole.named_parameters())
        for name, p in model.named_parameters():
            assert is_partitioned(p) and p.numel() == 0, name
            lo, hi = own_range(p)
            assert p.ds_tensor.numel() == -(-reference[name].numel() // world)  # ceil(n / W): only its share
            assert torch.equal(p.ds_tensor[:hi - lo], reference[name].reshape(-1)[lo:hi]), name
            with deepspeed.zero.GatheredParameters([p]):
                assert torch.equal(p.data, reference[name]), name

        # A forward before the engine, gathering module by module (MoE blocks whole, as leaf modules;
        # lm_head.weight for the whole model's forward too, as the chunked loss reads it there).
        parallel.apply(model, parallel.ParallelSection(zero_stage=3), ExpertPlacement(8, 1, 0))
        ids = torch.randint(3, 32000, (2, 9), generator=torch.Generator().manual_seed(rank))
        labels = ids.clone()
        with forward_gathers(model):
            got = model(ids).logits
            chunked = model(ids, labels=labels, logits_chunk_size=5, loss_reduction="sum").loss
        with torch.no_grad():
            torch.testing.assert_close(got, whole(ids).logits, rtol=0, atol=1e-6)
            want = whole(ids, labels=labels, logits_chunk_size=5, loss_reduction="sum").loss
            torch.testing.assert_close(chunked, want, rtol=1e-6, atol=0)
        assert all(p.numel() == 0 for p in model.parameters())  # released again

        # Optimizer groups from the whole shapes (a partitioned weight's own shape is [0]).
        names = {g["name"]: len(g["params"]) for g in param_groups(model.named_parameters(), 0.1)}
        assert names == {g["name"]: len(g["params"]) for g in param_groups(whole.named_parameters(), 0.1)}

        # Preset: the one-process draws, sliced; rank 0 writes them as the base.
        torch.manual_seed(7)
        one = random_init(MixtralConfig.preset("tiny"), torch.float32, None)
        after_one = torch.get_rng_state()
        torch.manual_seed(7)
        base = Path(root) / "base"
        sharded = random_init(MixtralConfig.preset("tiny"), torch.float32, DS_CONFIG,
                              save_to=base if rank == 0 else None)
        assert torch.equal(torch.get_rng_state(), after_one)  # later draws (dropout, data) agree too
        for (name, p), (_, want) in zip(sharded.named_parameters(), one.named_parameters(), strict=True):
            lo, hi = own_range(p)
            assert torch.equal(p.ds_tensor[:hi - lo], want.detach().reshape(-1)[lo:hi]), name
        dist.barrier()
        saved = dict(load_pretrained(base).named_parameters())
        assert all(torch.equal(saved[n], p) for n, p in one.named_parameters())

        # A checkpoint that lacks a piece: the coverage check names the parameter.
        if rank == 0:
            _drop_tensor(ckpt, "model.layers.1.block_sparse_moe.experts.5.w3.weight")
        dist.barrier()
        with pytest.raises(ValueError, match=r"missing part of layers\.1\.moe\.experts\.gate_up_proj"):
            checkpoint_loader(torch.float32, None, DS_CONFIG)(ckpt)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_zero3_partitions_hold_only_their_slice_of_the_checkpoint():
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp))
        assert len(list(ckpt.glob("*.safetensors"))) > 3  # pieces of one parameter in several files
        mp.spawn(_worker, args=(2, tmp), nprocs=2, join=True)


def _drop_tensor(ckpt: Path, name: str) -> None:
    import json

    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    file = ckpt / index["weight_map"].pop(name)
    tensors = load_file(str(file))
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
