"""Host memory of a launched ZeRO-3 SFT run per process, against the checkpoint's size (make bench-zero3).

    python bench/bench_zero3_memory.py [--mode lora full] [--malloc pinned default] [--steps 2]
                                       [--layers 16 --ffn 896] [--keep DIR]

Writes a random-init HF checkpoint of ~1.8 GB in fp32 (hidden 1024, 16 layers, 8 experts top-2, ffn
896, vocab 32000: 460M parameters; a decoder layer is 1/16 of the weights, as 1/32 is in
Mixtral-8x7B; `--layers 4 --ffn 3584` is as large in 4 layers), prepares the tiny recipe's data,
and launches `python -m pipeline.sft` under `accelerate launch --config_file
recipes/accelerate/cpu_zero3.yaml` (2 CPU processes, gloo, ZeRO-3, fp32) from that checkpoint, for
`--steps` optimizer steps, LoRA r=16 and/or full fine-tuning, activation checkpointing on (as every
Mixtral-8x7B recipe). Each process is this file in `--child` mode: it imports everything the stage
imports, records its resident memory (VmRSS) as the baseline, runs the stage, and records its peak
resident memory (VmHWM) per phase (the peak is reset between phases through /proc/self/clear_refs):
building + loading the model, preparing the engine, training, saving. Reported: peak - baseline per
process and phase, and that over the checkpoint's bytes. A ZeRO-3 process holds its half of the
weights (0.5x) plus, for full fine-tuning, its half of the fp32 master copy, gradients and Adam state.

`--malloc pinned` runs the processes with MALLOC_MMAP_THRESHOLD_=65536: glibc then returns every
freed block over 64 KiB to the system, so resident memory is what is alive. By default glibc raises
that threshold up to 32 MiB as large blocks are freed and keeps freed blocks below it in its heap:
ZeRO-3 gathers and frees each layer's weights every step, and the resident memory then counts
several layers' worth of freed memory (`--malloc default`).

Takes ~3-5 min per run on 2 cores; RAM at the peak: ~2 x 2.5 GB (LoRA), ~8 + 7 GB (full fine-tuning).
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
    from pipeline.training import trainer

    phases: dict[str, int] = {}

    def end_phase(name: str) -> None:
        phases[name] = status_kb("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    # The phase boundaries: the stage's own functions, wrapped (this process only).
    build_model, train = sft.build_model, trainer.Trainer.train

    def timed_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        end_phase("build + load")
        return model

    def timed_train(self, *args, **kwargs):
        end_phase("prepare")
        result = train(self, *args, **kwargs)
        end_phase("train")
        return result

    sft.build_model, trainer.Trainer.train = timed_build, timed_train
    baseline = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    started = time.perf_counter()
    sft.main(sft_args)
    end_phase("save")
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "baseline_kb": baseline, "peak_kb": max(phases.values()), "phases_kb": phases,
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


def launch(work: Path, checkpoint: Path, mode: str, steps: int, malloc: str) -> list[dict]:
    out = work / f"run-{mode}-{malloc}"
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", ACCELERATE_DISABLE_RICH="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc == "pinned":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
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
    parser.add_argument("--malloc", nargs="+", choices=["pinned", "default"], default=["pinned", "default"],
                        help="glibc's mmap threshold: pinned at 64 KiB, or glibc's default (see the docstring)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=896)
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
        print("| mode | malloc | rank | build + load | prepare | train | save | peak / checkpoint | run |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for mode in args.mode:
            for malloc in args.malloc:
                for r in launch(work, checkpoint, mode, args.steps, malloc):
                    grown = {k: (v - r["baseline_kb"]) * 1024 for k, v in r["phases_kb"].items()}
                    cells = " | ".join(f"{g / 1e9:.2f} GB" for g in grown.values())
                    print(f"| {mode} | {malloc} | {r['rank']} | {cells} | **{max(grown.values()) / model_bytes:.2f}x** "
                          f"| {r['seconds']:.0f} s |")
        print(f"(peak resident memory of each phase above the process's import baseline; checkpoint "
              f"{model_bytes / 1e9:.2f} GB)")

if __name__ == "__main__":
    main()
