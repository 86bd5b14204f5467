"""pipeline/distributed/parallel.py: the `parallel:` section checks and the DeepSpeed config.

Launched training (accelerate, 2 CPU processes) is tested through the real SFT entry point in
test_parallel_sft.py.
"""

from __future__ import annotations

import pytest

from pipeline.distributed.parallel import ParallelError, ParallelSection, deepspeed_config, validate


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


def test_lora_init_is_the_same_whatever_the_expert_placement_and_global_rng():
    import torch

    from model import Mixtral, MixtralConfig
    from model.lora import apply_lora
    from pipeline.distributed.expert_parallel import ExpertPlacement, shard_experts
    from pipeline.training.lora_init import placement_independent_lora_init

    def build(place: ExpertPlacement, rng_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Mixtral(MixtralConfig.preset("tiny"))
        if place.ep_size > 1:
            shard_experts(model, place)
        # PEFT's own A draw comes from the global RNG, which expert placement shifts between layers.
        torch.manual_seed(rng_seed)
        model = apply_lora(model, 4, 8, 0.0, ("q_proj", "v_proj", "experts"))
        drawn = placement_independent_lora_init(model, place, seed=3)
        a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and "_A" in n}
        assert drawn == len(a) == 2 * 4  # per layer: q, v, expert gate_up, expert down
        return a

    full = build(ExpertPlacement(8, 1, 0), rng_seed=1)
    rank1 = build(ExpertPlacement(8, 2, 1), rng_seed=2)
    assert full.keys() == rank1.keys()
    for name, want in full.items():
        torch.testing.assert_close(rank1[name], want[4:] if ".moe.experts." in name else want, rtol=0, atol=0,
                                   msg=name)


def _shared_dir_worker(rank: int, world: int, tmp: str) -> None:
    import os

    import torch.distributed as dist

    from pipeline.distributed.parallel import require_shared_directory

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        shared = os.path.join(tmp, "out")
        require_shared_directory(shared, "output_dir")  # one filesystem: passes, leaves nothing behind
        assert rank != 0 or not [n for n in os.listdir(shared) if n.startswith(".shared-fs-probe")]
        # Rank 1 on a node whose output_dir is another disk: here, another directory at the same path name.
        own = shared if rank == 0 else os.path.join(tmp, "node1-local", "out")
        with pytest.raises(ParallelError, match=r"output_dir=.*processes \[1\] of 2 do not see the files rank 0 "
                                                r"writes there.*filesystem shared by all nodes"):
            require_shared_directory(own, "output_dir")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_output_dir_not_shared_between_ranks_is_refused_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_shared_dir_worker, args=(2, str(tmp_path)), nprocs=2, join=True)


def test_cpu_adam_that_cannot_be_built_is_a_clear_error():
    import subprocess
    import sys

    from launching import ROOT, launch_env

    # No ninja on PATH: DeepSpeed's builder cannot JIT-compile (or load) the op, whatever is cached.
    env = {k: v for k, v in launch_env().items() if k != "PATH"}
    proc = subprocess.run([sys.executable, "-c", "from pipeline.distributed.parallel import require_cpu_adam; require_cpu_adam()"],
                          cwd=ROOT, env={**env, "PATH": "/nonexistent"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ParallelError: parallel.offload_optimizer=true steps the optimizer with DeepSpeed's CPU Adam" in proc.stderr
    assert "ninja" in proc.stderr and "pip install ninja" in proc.stderr
