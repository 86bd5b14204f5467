"""Peak memory and time of the export vs transformers' load + save_pretrained, on a ~1.2 GB model.

    .venv/bin/python bench/bench_export.py [--layers 12] [--shard-mb 320] [--repeat 3] [--keep DIR]

Builds a random Mixtral (hidden 512, 8 experts of ffn 1792, vocab 32000) with a random LoRA
adapter (attention + experts, r 8), saved as a bf16 base checkpoint + PEFT adapter. Then, each in a
fresh process whose peak RSS (VmHWM) is read at its end:

  idle         the imports only (the fixed overhead every process pays)
  ours         python -m pipeline.export: merge in fp32, write fp32 shards, no verification
  transformers MixtralForCausalLM.from_pretrained(base, fp32) + save_pretrained(max_shard_size), no merge

ours and transformers alternate --repeat times (each into a fresh output dir, removed outside the
timing); the table gives the median seconds and the largest peak RSS, and the load average is
printed, since a shared machine's timings move by 2x from run to run.

The claim checked: ours peaks under 1.5 x the largest shard + the idle overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# VmHWM, not ru_maxrss: on Linux ru_maxrss of a child keeps the parent's size at fork, and this
# parent has just built the model.
MEASURE = """
import re, time
t = time.perf_counter()
{body}
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print("RESULT", hwm, time.perf_counter() - t)
"""

IDLE = "import torch, transformers, safetensors, peft, tqdm\nfrom pipeline import export, hf_tokenizer"
OURS = "from pipeline.export import main\nassert main([{recipe!r}, 'verify.enabled=false', 'export.progress_bar=false']) == 0"
REFERENCE = (
    "import torch\nfrom transformers import MixtralForCausalLM\n"
    "m = MixtralForCausalLM.from_pretrained({base!r}, dtype=torch.float32)\n"
    "m.save_pretrained({out!r}, max_shard_size='{shard_mb}MB')"
)


def run(body: str) -> tuple[int, float]:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE.format(body=body)], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measured process failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    _, rss, seconds = line.split()
    return int(rss), float(seconds)


def build_inputs(root: Path, layers: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from model import Mixtral, MixtralConfig
    from model.checkpoint import save_pretrained
    from model.lora import apply_lora

    torch.manual_seed(0)
    cfg = MixtralConfig(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        torch_dtype="bfloat16",
    )
    model = Mixtral(cfg)
    save_pretrained(model, root / "base", max_shard_size="200MB", dtype=torch.bfloat16)
    peft_model = apply_lora(model, r=8, alpha=16)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(root / "adapter")


def largest_shard(out: Path) -> int:
    return max(p.stat().st_size for p in out.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard-mb", type=int, default=320)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of ours and transformers")
    parser.add_argument("--keep", default=None, help="work in this dir and keep it")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_export_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        build_inputs(root, args.layers)
        print(f"inputs built in {time.perf_counter() - started:.0f}s under {root}")
        recipe = root / "export.yaml"
        recipe.write_text(
            json.dumps(
                {
                    "source": {"checkpoint": str(root / "base"), "adapters": [str(root / "adapter")]},
                    "output_dir": str(root / "ours"),
                    "export": {"dtype": "float32", "max_shard_size": f"{args.shard_mb}MB", "overwrite": True},
                }
            )
        )
        idle_rss, _ = run(IDLE)
        load_before = os.getloadavg()[0]
        ours_runs, ref_runs = [], []
        for _ in range(args.repeat):
            for out in (root / "ours", root / "ref"):
                shutil.rmtree(out, ignore_errors=True)
            ours_runs.append(run(OURS.format(recipe=str(recipe))))
            ref_runs.append(
                run(REFERENCE.format(base=str(root / "base"), out=str(root / "ref"), shard_mb=args.shard_mb))
            )
        ours_rss, ours_s = max(r for r, _ in ours_runs), statistics.median(t for _, t in ours_runs)
        ref_rss, ref_s = max(r for r, _ in ref_runs), statistics.median(t for _, t in ref_runs)
        ours_shard, ref_shard = largest_shard(root / "ours"), largest_shard(root / "ref")
        total = sum(p.stat().st_size for p in (root / "ours").glob("*.safetensors"))
        n_shards = len(list((root / "ours").glob("*.safetensors")))
        bound = 1.5 * ours_shard + idle_rss
        mb = 1e6
        print(
            f"\nexport of {total / 1e9:.2f} GB fp32 in {n_shards} shards (largest {ours_shard / mb:.0f} MB), "
            f"bf16 base + LoRA r8; median of {args.repeat} alternating runs, 1-min load average "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)"
        )
        print(
            f"ours seconds {[round(t, 1) for _, t in ours_runs]}, transformers {[round(t, 1) for _, t in ref_runs]}"
        )
        print(f"| {'process':<13} | {'peak RSS MB':>11} | {'above idle MB':>13} | {'seconds':>7} |")
        print(f"|{'-' * 15}|{'-' * 13}|{'-' * 15}|{'-' * 9}|")
        print(f"| {'idle imports':<13} | {idle_rss / mb:>11.0f} | {0:>13.0f} | {'':>7} |")
        print(
            f"| {'ours (merge)':<13} | {ours_rss / mb:>11.0f} | {(ours_rss - idle_rss) / mb:>13.0f} | {ours_s:>7.1f} |"
        )
        print(
            f"| {'transformers':<13} | {ref_rss / mb:>11.0f} | {(ref_rss - idle_rss) / mb:>13.0f} | {ref_s:>7.1f} |"
        )
        print(
            f"\nours / transformers: peak RSS above idle {(ours_rss - idle_rss) / max(ref_rss - idle_rss, 1):.2f}x, "
            f"time {ours_s / ref_s:.2f}x (transformers' largest shard {ref_shard / mb:.0f} MB, no merge)"
        )
        verdict = "OK" if ours_rss <= bound else "OVER"
        print(
            f"bound 1.5 x largest shard + idle = {bound / mb:.0f} MB: ours {ours_rss / mb:.0f} MB -> {verdict}"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
