"""pipeline/parallel.py: the `parallel:` section checks, and real launches (accelerate, 2 CPU processes).

The launched part runs this file as a script: each rank trains a tiny Mixtral for a few AdamW steps
under the given accelerate config and, in the same process, an unsharded single-process reference
on the union of all ranks' batches; it writes what it saw to OUT/rank{r}.json for the test to check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.parallel import ParallelError, ParallelSection, deepspeed_config, validate

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
# SGD, not Adam: Adam turns reduction-order noise in near-zero grads into lr-sized steps.
LR = 1.0
AUX_COEF = 0.02


def test_ep3_with_8_experts_fails_fast():
    with pytest.raises(ParallelError, match=r"expert_parallel_size=3 must divide the number of experts \(8\)"):
        validate(ParallelSection(zero_stage=2, expert_parallel_size=3), num_experts=8, world_size=6)
    with pytest.raises(ParallelError, match=r"must divide the number of processes \(6\)"):
        validate(ParallelSection(zero_stage=2, expert_parallel_size=4), num_experts=8, world_size=6)
    validate(ParallelSection(zero_stage=2, expert_parallel_size=2), num_experts=8, world_size=6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expert_parallel_size=2, zero_stage=3), "needs parallel.zero_stage 1 or 2"),
        (dict(expert_parallel_size=2, zero_stage=0), "needs parallel.zero_stage 1 or 2"),
        (dict(zero_stage=4), "parallel.zero_stage must be null or 0"),
        (dict(offload_optimizer=True), "offload_optimizer needs DeepSpeed"),
        (dict(zero_stage=2, offload_params=True), "offload_params needs parallel.zero_stage: 3"),
        (dict(expert_parallel_size=0), "expert_parallel_size must be >= 1"),
    ],
)
def test_section_rejects_unsupported_combinations(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelSection(**kwargs)


def test_deepspeed_config_per_stage():
    z2 = deepspeed_config(ParallelSection(zero_stage=2, expert_parallel_size=2, offload_optimizer=True),
                          micro_batch_size=4, grad_accum_steps=8, bf16=True)
    assert z2["train_micro_batch_size_per_gpu"] == 4 and z2["gradient_accumulation_steps"] == 8
    zero = z2["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_scatter"] and zero["contiguous_gradients"]
    assert zero["offload_optimizer"]["device"] == "cpu" and "offload_param" not in zero
    assert z2["bf16"]["enabled"]
    z3 = deepspeed_config(ParallelSection(zero_stage=3, offload_params=True, offload_optimizer=True),
                          micro_batch_size=1, grad_accum_steps=1, bf16=False)
    assert z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


# ----------------------------------------------------------------------------------------------
# Launched worker
# ----------------------------------------------------------------------------------------------


def _batches(world: int, vocab: int):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (world, 2, 12), generator=g)  # [ranks, B, S]
        out.append(ids)
    return out


def _loss(model, ids):
    out = model(ids, labels=ids, output_router_logits=False)
    return out.loss + AUX_COEF * out.aux_loss


def _worker(out_dir: str, zero_stage: int, ep: int, lora: bool) -> None:
    import torch.distributed as dist

    from model import Mixtral, MixtralConfig
    from pipeline import parallel

    torch.set_num_threads(1)
    section = ParallelSection(backend="gloo", zero_stage=zero_stage, expert_parallel_size=ep)
    acc = parallel.make_accelerator(section, micro_batch_size=2, grad_accum_steps=1)
    rank, world = acc.process_index, acc.num_processes
    cfg = MixtralConfig.preset("tiny")
    torch.manual_seed(0)
    full = Mixtral(cfg)
    batches = _batches(world, cfg.vocab_size)

    def with_lora(m):
        from model.lora import apply_lora

        for p in m.parameters():
            p.requires_grad_(False)
        m = apply_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj", "experts"])
        with torch.no_grad():  # B starts at zero: make the adapters matter from step 0, same on every rank
            g = torch.Generator().manual_seed(7)
            for name, p in sorted(m.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return m

    def build_ref():
        m = Mixtral(cfg)
        m.load_state_dict(full.state_dict())
        return with_lora(m) if lora else m

    # Reference: one process, all experts, the data-parallel objective (mean of the ranks' losses).
    ref = build_ref()
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)
    ref_losses = []
    for ids in batches:
        per_rank = [_loss(ref, ids[r]) for r in range(world)]
        ref_losses.append([x.item() for x in per_rank])
        torch.stack(per_rank).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()

    # The run under test.
    place = parallel.placement(section, cfg.num_local_experts)
    model = Mixtral(cfg, expert_ids=place.expert_ids)
    lo, hi = place.first, place.first + place.num_local
    state = {k: (v[lo:hi] if ".experts." in k else v) for k, v in full.state_dict().items()}
    model.load_state_dict(state)
    if lora:
        model = with_lora(model)
        with torch.no_grad():  # the reference's adapters, this rank's slice of the expert ones
            donor = dict(build_ref().named_parameters())
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(donor[name][lo:hi] if ".experts." in name else donor[name])
    stats = parallel.apply(model, section, place)
    init_experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    parallel.moe_param_groups(opt)
    model, opt = acc.prepare(model, opt)
    inner = acc.unwrap_model(model)
    # The silent-corruption trap: DeepSpeed's init broadcast must not overwrite other ranks' experts.
    kept_after_prepare = all(torch.equal(p, init_experts[n]) for n, p in inner.named_parameters() if n in init_experts)

    losses = []
    for ids in batches:
        loss = _loss(model, ids[rank])
        losses.append(loss.item())
        acc.backward(loss)
        opt.step()
        opt.zero_grad()

    ep_group = parallel.expert_groups(ep)[0] if ep > 1 else None
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(inner.parameters())):
            got = {n: p.detach().clone() for n, p in inner.named_parameters()}
        kept_after_prepare = True  # ZeRO-3 partitions every param; nothing to compare before the gather
    else:
        got = parallel.full_state_dict(inner, place, ep_group)
    want = dict(ref.named_parameters())
    param_diff = max((got[n].float() - want[n].float()).abs().max().item() for n in want if want[n].requires_grad)
    metrics = parallel.expert_load_imbalance(stats, ep_group) if stats is not None else {}
    local = {n: p.detach() for n, p in inner.named_parameters() if ".experts." in n and p.requires_grad}
    checksum = float(sum(p.double().sum() for p in local.values()))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(dict(
        losses=losses, ref_losses=[r[rank] for r in ref_losses], param_diff=param_diff,
        kept_after_prepare=kept_after_prepare, expert_checksum=checksum, metrics=metrics,
        world=world,
    )))
    dist.barrier()


def _launch(tmp_path: Path, config: str, *args: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_DISABLE_RICH="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate" / config), "--main_process_port", "0", __file__, str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "config, zero_stage, ep, lora",
    [
        ("cpu_zero3.yaml", 3, 1, False),
        ("cpu_zero2_ep2.yaml", 2, 2, False),
        ("cpu_zero2_ep2.yaml", 2, 2, True),
    ],
    ids=["zero3", "zero2-ep2-full", "zero2-ep2-lora"],
)
def test_launched_training_matches_single_process(tmp_path, config, zero_stage, ep, lora):
    ranks = _launch(tmp_path, config, str(zero_stage), str(ep), str(int(lora)))
    for r, out in enumerate(ranks):
        assert out["world"] == 2
        assert out["kept_after_prepare"], f"rank {r}: DeepSpeed overwrote this rank's experts at init"
        for step, (got, want) in enumerate(zip(out["losses"], out["ref_losses"], strict=True)):
            assert abs(got - want) < 1e-4, f"rank {r} step {step}: loss {got} vs single-process {want}"
        assert out["param_diff"] < 1e-4, f"rank {r}: trained params differ from the reference by {out['param_diff']}"
    if ep > 1:
        assert ranks[0]["expert_checksum"] != ranks[1]["expert_checksum"]
        assert all(out["metrics"]["ep/all_to_all_bytes"] > 0 for out in ranks)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])))
