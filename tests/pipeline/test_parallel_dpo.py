"""`python -m pipeline.dpo` launched through `accelerate launch` (2 CPU processes, gloo) vs one process.

The starting point is a real SFT run kept as short as it can be (2 LoRA steps), so that DPO's
parallel path includes merging an SFT adapter that is not zero and, under ep=2, cutting its expert
tensors to each rank's experts. DPO then trains a fresh LoRA adapter for 4 steps, in three ways that
see the same pairs: one process (micro-batch 1 x 2 accumulation steps), plain DDP on 2 processes,
ZeRO-2 + expert parallel 2 and ZeRO-3 with precomputed reference log-probs (micro-batch 1 each).
Prep, SFT and the one-process DPO run in this process (as their command lines would, on one thread),
the three launches as subprocesses, with W&B on (offline), the recipes' default.
The reference is the policy with its adapter disabled, so under EP its forwards are collectives too.
Launches are shared between the assertions through one module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from launching import ROOT, accelerate_launch, assert_finished_with_wandb, run_command
from safetensors.torch import load_file

from pipeline.training.tracking import read_metrics

SFT_RECIPE = ROOT / "recipes/tiny/sft.yaml"
DPO_RECIPE = ROOT / "recipes/tiny/dpo.yaml"
STEPS = 4
QUIET = ["tracking.report_to=none", "tracking.progress_bar=false"]
# lr 1e-3 (recipe 3e-4) moves the margins to ~1e-2 in 4 steps (measured 6.6e-3 to 2.5e-2), far above the
# rounding noise below.
# Every run evaluates once, at the end, on eval pairs 0, 1 and 2 (eval_max_batches counts micro-batches
# over all processes): the single process takes all three, of 2 processes rank 0 takes pairs 0 and 2
# and rank 1 pair 1, then repeats it uncounted (every rank runs as many forwards: EP's are collectives).
DPO_COMMON = [
    f"train.max_steps={STEPS}", "train.micro_batch_size=1", "train.warmup_steps=1", "train.log_every=1",
    "train.lr=1e-3", "train.eval_every=null", "train.eval_max_batches=3", "train.save_every=null", "train.resume=never",
    "train.overwrite_output_dir=true", "parallel.backend=gloo", "tracking.progress_bar=false",
]
# Tolerances from fp32 rounding. A pair's summed log-prob (~100-220) has an ulp of 1.5e-5, and under
# EP the experts see their rows in other GEMM blocks, so a sum can end an ulp or two away. Measured
# over 6 runs (2 SFT adapters, DPO seeds 0-3, lr 1e-3 and 3e-4), ZeRO-2 + ep=2 vs one process: logps
# differ by <= 7.6e-6; rewards, margins, loss and nll by <= 9.5e-7; DDP logs bit-identical values.
# LOGPS_TOL is 4 ulps of a sum in [128, 256); TOL is that times beta = 0.1 (rewards are beta times
# log-prob differences, and the loss moves by at most the margin's change) and 6 ulps of nll (~10).
# Skipping the placement-independent LoRA init under ep=2 (ep=2 then trains other adapters) moves
# the loss by 1.7e-3 and the margins by 3.4e-3: ~300x TOL.
LOGPS_TOL, TOL = 6e-5, 6e-6
# The DPO adapter after 4 steps, ep=2 vs one process: measured <= 1.8e-6, the B factors moved ~2.5e-3.
ADAPTER_TOL = 1e-5
TRAIN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "aux_loss", "nll", "grad_norm")
EVAL_KEYS = tuple(f"eval_{k}" for k in TRAIN_KEYS if k != "grad_norm")
EP2 = ["parallel.zero_stage=2", "parallel.expert_parallel_size=2"]
# ZeRO-3: the SFT model built partitioned (adapter merged under gathered weights), the reference
# log-probs precomputed before DeepSpeed's engine exists (pipeline/distributed/sharded_load.py forward_gathers).
Z3 = ["parallel.zero_stage=3", "model.logits_chunk_size=null", "dpo.precompute_ref_log_probs=true"]
LAUNCHED = {"ddp": ("cpu_ddp.yaml", []), "z2ep2": ("cpu_zero2_ep2.yaml", EP2), "z3": ("cpu_zero3.yaml", Z3)}

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _launch(config: str, data: Path, sft: Path, out: Path, *args: str) -> Path:
    """A launched DPO run with W&B on (offline), as the Mixtral-8x7B recipe runs it (the tiny one has it off)."""
    run_command([*accelerate_launch(config), "-m", "pipeline.dpo", str(DPO_RECIPE),
                 f"data.output_dir={data}", f"model.sft_dir={sft}", f"output_dir={out}", *DPO_COMMON,
                 "tracking.report_to=wandb", *args])
    return out


@contextlib.contextmanager
def _as_a_command():
    """A stage run in this process as its command line runs it: from the repository (the recipes name
    their sources relative to it), on one thread like the launched workers (OMP_NUM_THREADS=1), with
    accelerate's process-wide state fresh afterwards. Saves each run ~8 s of interpreter start-up."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.chdir(ROOT):
            yield
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from pipeline import dpo, prep, sft

    tmp = tmp_path_factory.mktemp("parallel_dpo")
    out = {name: tmp / name for name in ("sft", "ref", *LAUNCHED)}
    sft_data, data = tmp / "data_sft", tmp / "data_dpo"
    with _as_a_command():
        assert prep.main([str(SFT_RECIPE), f"data.output_dir={sft_data}"]) == 0
        assert prep.main([str(DPO_RECIPE), f"data.output_dir={data}"]) == 0
    # The shortest real SFT run: 2 LoRA steps at a high lr leave an adapter that is not zero.
    with _as_a_command():
        code = sft.main([
            str(SFT_RECIPE), f"data.output_dir={sft_data}", f"output_dir={out['sft']}", "lora.enabled=true",
            "train.lr=1e-2", "train.max_steps=2", "train.micro_batch_size=1", "train.warmup_steps=0",
            "train.save_every=null", "train.eval_every=null", "train.eval_max_batches=1", *QUIET,
        ])
    assert code == 0, "the short SFT run failed"
    with _as_a_command():
        code = dpo.main([
            str(DPO_RECIPE), f"data.output_dir={data}", f"model.sft_dir={out['sft']}", f"output_dir={out['ref']}",
            *DPO_COMMON, "train.grad_accum_steps=2", *QUIET,
        ])
    assert code == 0, "the single-process DPO run failed"
    for mode, (config, args) in LAUNCHED.items():
        _launch(config, data, out["sft"], out[mode], *args)
    return out


def _rows(run: Path) -> list[dict]:
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


@pytest.mark.parametrize("mode", sorted(LAUNCHED))
def test_launch_ran_two_processes(runs, mode):
    # One process alone on half the rows logs plausible losses too: the final checkpoint records
    # how many processes wrote it.
    state = json.loads((runs[mode] / f"checkpoints/step-{STEPS:06d}/state.json").read_text())
    assert state["world_size"] == 2


def test_single_process_run_moved_away_from_the_reference(runs):
    # Guards the comparison below: at step 1 the DPO adapter is zero (loss log 2, rewards 0).
    last = _rows(runs["ref"])[-1]
    assert last["rewards/margins"] > 5e-3 and last["loss"] < math.log(2) - 1e-3, last
    assert last["eval_rewards/margins"] > 5e-3, last


@pytest.mark.parametrize("mode", sorted(LAUNCHED))
def test_launched_dpo_metrics_match_single_process(runs, mode):
    got, want = _rows(runs[mode]), _rows(runs["ref"])
    for g, w in zip(got, want, strict=True):
        keys = TRAIN_KEYS + (EVAL_KEYS if g["step"] == STEPS else ())
        for key in keys:
            if key.endswith("rewards/accuracies") and abs(w[key.replace("accuracies", "margins")]) < 1e-4:
                # Step 1: a zero adapter, every reward is policy - reference = 0 up to an fp32 ulp of
                # the log-probs (ZeRO-3 sums in its own order: 3.8e-7 measured on an AMD EPYC host),
                # and the accuracy counts that ulp's sign. The rewards themselves are compared.
                continue
            tol = LOGPS_TOL if "logps/" in key else TOL
            assert abs(g[key] - w[key]) <= tol, f"{mode} step {g['step']}: {key} {g[key]} vs single-process {w[key]}"


def test_expert_parallel_dispatch_ran(runs):
    for row in read_metrics(runs["z2ep2"] / "metrics.jsonl"):
        assert row["ep/all_to_all_bytes"] > 0 and row["ep/rank_rows_max"] >= row["ep/rank_rows_min"] > 0


def test_ep2_adapter_is_gathered_and_loads_on_the_sft_model(runs):
    from pipeline.distributed.sharded_load import merge_adapter_fp32
    from pipeline.dpo import load_sft_model

    got = load_file(runs["z2ep2"] / "adapter_model.safetensors")
    want = load_file(runs["ref"] / "adapter_model.safetensors")
    assert got.keys() == want.keys() and any(".moe.experts.lora_" in k for k in want)
    for k in want:
        assert got[k].shape == want[k].shape, k  # every expert in dim 0, not one rank's part
        assert (got[k] - want[k]).abs().max().item() < ADAPTER_TOL, k
    # What export does with it: PEFT places every tensor on the SFT model (raises on one it cannot).
    sft = load_sft_model(runs["sft"], torch.float32)
    sft_weights = {k: v.clone() for k, v in sft.state_dict().items()}
    merged = merge_adapter_fp32(sft, runs["z2ep2"]).state_dict()
    assert merged.keys() == sft_weights.keys()
    assert max((merged[k] - sft_weights[k]).abs().max().item() for k in merged) > 1e-6


@pytest.mark.parametrize("mode", sorted(LAUNCHED))
def test_launched_runs_write_adapter_manifest_and_wandb_run(runs, mode):
    assert_finished_with_wandb(runs[mode])
