"""Host memory of a launched ZeRO-3 SFT run per process, against the checkpoint's size (make bench-zero3).

    python bench/bench_zero3_memory.py [--mode lora full] [--steps 2] [--layers 4 --ffn 3584] [--keep DIR]

Writes a random-init HF checkpoint of ~1.7 GB in fp32 (hidden 1024, 4 layers, 8 experts top-2, ffn
3584, vocab 32000: 428M parameters; `--layers 8 --ffn 1792` is as large, in twice the layers),
prepares the tiny recipe's data, and launches
`python -m pipeline.sft` under `accelerate launch --config_file recipes/accelerate/cpu_zero3.yaml`
(2 CPU processes, gloo, ZeRO-3, fp32) from that checkpoint, for `--steps` optimizer steps, LoRA r=16
and/or full fine-tuning, activation checkpointing on (as every Mixtral-8x7B recipe). Each process is this file in `--child` mode: it imports everything the
stage imports, records its resident memory (VmRSS, /proc/self/status) as the baseline, runs the
stage, and records its peak resident memory (VmHWM) at the end. Reported: peak - baseline per
process, and that over the checkpoint's bytes. A ZeRO-3 process holds its half of the weights
(0.5x) plus, for full fine-tuning, its half of the fp32 master copy, gradients and Adam state.

Takes ~3-6 min on 2 cores; RAM at the peak: ~2 x 2.3 GB (LoRA), ~8 + 7 GB (full fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = dict(vocab_size=32000, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
              num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, torch_dtype="float32")


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(out: Path, sft_args: list[str]) -> None:
    """One launched process: baseline after the stage's imports, the stage, then the peak."""
    import deepspeed  # noqa: F401
    import peft  # noqa: F401

    import model.lora  # noqa: F401
    from pipeline import sft

    baseline = status_kb("VmRSS")
    started = time.perf_counter()
    sft.main(sft_args)
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "baseline_kb": baseline, "peak_kb": status_kb("VmHWM"),
              "seconds": time.perf_counter() - started}
    (out / f"rss-rank{rank}.json").write_text(json.dumps(record))


def write_checkpoint(path: Path, layers: int, ffn: int) -> int:
    """A random-init checkpoint written one tensor at a time; returns its weight bytes."""
    import torch

    from model import Mixtral, MixtralConfig
    from model.checkpoint import save_pretrained
    from model.transformer import init_parameter

    config = MixtralConfig(**CONFIG, num_hidden_layers=layers, intermediate_size=ffn)
    meta = Mixtral(config, device="meta")

    def draws():
        torch.manual_seed(0)
        for name, param in meta.named_parameters():
            whole = torch.empty(param.shape)
            init_parameter(name, whole, config.initializer_range)
            yield name, whole

    save_pretrained(meta, path, dtype=torch.float32, max_shard_size="500MB", native_tensors=draws())
    return sum(p.numel() for p in meta.parameters()) * 4


def launch(work: Path, checkpoint: Path, mode: str, steps: int) -> list[dict]:
    out = work / f"run-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", ACCELERATE_DISABLE_RICH="1")
    sft_args = [
        str(ROOT / "recipes/tiny/sft.yaml"), f"data.output_dir={work / 'data'}", f"output_dir={out / 'sft'}",
        "model.preset=null", f"model.checkpoint={checkpoint}", "model.logits_chunk_size=null", "model.gradient_checkpointing=true",
        f"lora.enabled={mode == 'lora'}", f"train.max_steps={steps}", "train.micro_batch_size=1",
        "train.warmup_steps=0", "train.eval_max_batches=1", "tracking.report_to=none",
        "tracking.progress_bar=false", "parallel.backend=gloo", "parallel.zero_stage=3",
        "train.overwrite_output_dir=true",
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/cpu_zero3.yaml"), "--main_process_port", "0",
           str(Path(__file__).resolve()), "--child", str(out), "--", *sft_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"rss-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--keep", type=Path, default=None, help="work dir to keep (checkpoint reused if there)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child is not None:
        child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
        return
    with tempfile.TemporaryDirectory(prefix="bench-zero3-") as tmp:
        work = args.keep or Path(tmp)
        checkpoint = work / f"checkpoint-{args.layers}x{args.ffn}"
        if not (checkpoint / "config.json").is_file():
            model_bytes = write_checkpoint(checkpoint, args.layers, args.ffn)
        else:
            model_bytes = json.loads((checkpoint / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        if not (work / "data").is_dir():
            subprocess.run([sys.executable, "-m", "pipeline.prep", str(ROOT / "recipes/tiny/sft.yaml"),
                            f"data.output_dir={work / 'data'}"], cwd=ROOT, check=True, capture_output=True)
        print(f"checkpoint: {model_bytes / 1e9:.2f} GB of fp32 weights, {args.layers} layers, ffn {args.ffn}; "
              f"2 processes, ZeRO-3, {args.steps} steps")
        print("| mode | rank | import baseline | peak | peak - baseline | / checkpoint | run |")
        print("|---|---|---|---|---|---|---|")
        for mode in args.mode:
            for r in launch(work, checkpoint, mode, args.steps):
                grown = (r["peak_kb"] - r["baseline_kb"]) * 1024
                print(f"| {mode} | {r['rank']} | {r['baseline_kb'] / 2**20:.2f} GiB | {r['peak_kb'] / 2**20:.2f} GiB "
                      f"| {grown / 1e9:.2f} GB | {grown / model_bytes:.2f}x | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
