"""Predicted (`pipeline.plan`) vs measured (bench/plan_probe.py) peak memory of SFT runs on CPU.

    python bench/bench_plan.py [--cases test|all] [--work DIR]      # make bench-plan

Each case is a real 2-step SFT run of the tiny recipe (model.preset tiny or bench-small), one
process (`python`) or two (`accelerate launch` with a recipes/accelerate/cpu_* config), measured by
bench/plan_probe.py: the peak bytes of torch's CPU tensors in rank 0, per phase (load, prepare,
train, final; see that file for what is and is not counted). The plan predicts the same quantity
for a CPU launch: per phase, the largest moment of every tensor of the main process
(`Plan.phase_peaks`). The data is made to be the plan's worst case, with the real prep: answers
longer than data.max_seq_len (256), truncated, so every row is full and ~95% of its tokens carry a
label (the plan assumes all but a row's first).

`--cases test` are the four the test suite runs (tests/pipeline/test_plan.py): tiny and
bench-small, one and two processes, LoRA and full, ZeRO-2 and ZeRO-3, checkpointing on and off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/tiny/sft.yaml"
SEQ = 256


@dataclass(frozen=True)
class Case:
    name: str
    config: str | None  # recipes/accelerate/<config>, None: one process (python)
    overrides: tuple[str, ...] = ()


TEST_CASES = (
    Case("tiny, 1 process, full, no checkpointing", None, ("model.gradient_checkpointing=false",)),
    Case("bench-small, 1 process, LoRA, checkpointing", None,
         ("model.preset=bench-small", "lora.enabled=true", "model.gradient_checkpointing=true")),
    Case("tiny, 2 processes, ZeRO-2, full, checkpointing", "cpu_zero2.yaml",
         ("parallel.zero_stage=2", "model.gradient_checkpointing=true")),
    Case("bench-small, 2 processes, ZeRO-3, LoRA, no checkpointing", "cpu_zero3.yaml",
         ("model.preset=bench-small", "lora.enabled=true", "parallel.zero_stage=3", "model.logits_chunk_size=null",
          "train.micro_batch_size=2")),
)
CASES = TEST_CASES + (
    Case("tiny, 1 process, LoRA, checkpointing", None, ("lora.enabled=true", "model.gradient_checkpointing=true")),
    Case("bench-small, 1 process, LoRA r=16 dropout 0.05, no checkpointing", None,
         ("model.preset=bench-small", "lora.enabled=true", "lora.dropout=0.05")),
    Case("tiny, 2 processes, DDP, full", "cpu_ddp.yaml", ()),
    Case("tiny, 2 processes, ZeRO-2 + EP2, LoRA, checkpointing", "cpu_zero2_ep2.yaml",
         ("lora.enabled=true", "parallel.zero_stage=2", "parallel.expert_parallel_size=2",
          "model.gradient_checkpointing=true")),
    Case("tiny, 2 processes, ZeRO-3, full", "cpu_zero3.yaml",
         ("parallel.zero_stage=3", "model.logits_chunk_size=null")),
    Case("bench-small, 2 processes, ZeRO-2, LoRA, checkpointing", "cpu_zero2.yaml",
         ("model.preset=bench-small", "lora.enabled=true", "parallel.zero_stage=2",
          "model.gradient_checkpointing=true")),
)


def write_long_data(work: Path) -> Path:
    """Prepared rows that fill data.max_seq_len: one short question, an answer longer than a row."""
    words = "apple river stone cloud garden piano candle lemon forest window silver orange bridge valley".split()
    rng = random.Random(0)
    for name, n, ask in (("train.jsonl", 64, "Say"), ("eval.jsonl", 8, "Tell")):
        with open(work / name, "w") as f:
            for i in range(n):
                answer = " ".join(rng.choice(words) for _ in range(2 * SEQ))
                messages = [{"role": "user", "content": f"{ask} words {i}."},
                            {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": messages}) + "\n")
    data = work / "data"
    # The tiny SFT recipe with this data section: prep writes the rows, the runs train on them (SFT
    # refuses prepared data whose data section differs from its recipe's).
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["data"] = {"kind": "sft", "output_dir": str(data), "max_seq_len": SEQ, "overlength": "truncate",
                      "packing": True, "dedup": False, "num_proc": 1,
                      "sources": [{"path": str(work / "train.jsonl")},
                                  {"path": str(work / "eval.jsonl"), "role": "eval"}]}
    recipe_of(data).write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run([sys.executable, "-m", "pipeline.prep", str(recipe_of(data))], cwd=ROOT, env=child_env(),
                   check=True, capture_output=True, text=True, timeout=300)
    return data


def recipe_of(data: Path) -> Path:
    """The SFT recipe `write_long_data` wrote beside the prepared rows."""
    return data.parent / "sft.yaml"


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               ACCELERATE_DISABLE_RICH="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def overrides(case: Case, data: Path, out: Path) -> list[str]:
    """The case's recipe overrides: 2 steps (the second has Adam's state), one eval batch, W&B off
    (it allocates no torch tensors; the multi-process tests run it on)."""
    common = [f"data.output_dir={data}", f"output_dir={out}", "train.max_steps=2", "train.warmup_steps=0",
              "train.eval_max_batches=1", "train.save_every=null", "train.resume=never",
              "train.overwrite_output_dir=true", "tracking.report_to=none", "tracking.progress_bar=false"]
    if case.config is not None:
        common.append("parallel.backend=gloo")
    return [*common, *case.overrides]


def measure(case: Case, data: Path, work: Path) -> dict:
    """Rank 0's probe result (bench/plan_probe.py) for one run of the case."""
    out = work / "probe"
    args = [str(ROOT / "bench/plan_probe.py"), str(out), "pipeline.sft", str(recipe_of(data)),
            *overrides(case, data, work / "run")]
    if case.config is None:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes/accelerate" / case.config), "--main_process_port", "0",
               "--monitor_interval", "0.1", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{case.name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out / "probe-rank0.json").read_text())


def predict(case: Case, data: Path, work: Path):
    """The plan of the same recipe under the same launch, on the CPU."""
    from pipeline.plan import plan
    from pipeline.preflight import LaunchSpec, load_stage_recipe

    recipe = load_stage_recipe(recipe_of(data), overrides(case, data, work / "run"), stage="sft")
    launch = (LaunchSpec.single() if case.config is None
              else LaunchSpec.from_config_file(ROOT / "recipes/accelerate" / case.config))
    return plan(recipe, launch, device="cpu", source=case.name)


def compare(case: Case, data: Path, work: Path) -> dict:
    measured = measure(case, data, work)
    predicted = predict(case, data, work).phase_peaks()
    phases = {name: (predicted.get(name, 0.0), float(measured["phase_peak_bytes"].get(name, 0)))
              for name in ("load", "prepare", "train", "final")}
    return {"case": case.name, "predicted": max(predicted.values()), "measured": float(measured["peak_bytes"]),
            "phases": phases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", choices=("test", "all"), default="all")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_long_data(work)
    print("| case | predicted peak | measured peak | predicted / measured | by phase (predicted / measured MB) |")
    print("|---|---:|---:|---:|---|")
    for case in TEST_CASES if args.cases == "test" else CASES:
        if args.only not in case.name:
            continue
        row = compare(case, data, work)
        phases = ", ".join(f"{k} {p / 1e6:,.0f} / {m / 1e6:,.0f}" for k, (p, m) in row["phases"].items() if m)
        print(f"| {row['case']} | {row['predicted'] / 1e6:,.0f} MB | {row['measured'] / 1e6:,.0f} MB | "
              f"{row['predicted'] / row['measured']:.3f} | {phases} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
