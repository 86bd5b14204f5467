"""One LoRA SFT step of the whole Mixtral-8x7B (random weights) on one GPU that holds it (make bench-gpu).

    python bench/bench_8x7b.py [--data DIR] [--seq 4096] [--steps 5] [--warmup 2] [--compile]
    python bench/bench_8x7b.py --device cpu --preset tiny --seq 256 --steps 1    # the script itself, on a CPU

The model of recipes/mixtral-8x7b/sft_lora.yaml without its checkpoint: 46.7B parameters in bf16
(93 GB) built on the GPU with random weights, LoRA r=16 / alpha 32 / dropout 0.05 on q/k/v/o and
every expert's w1/w2/w3 (fp32 adapters), activation checkpointing, bf16 autocast, LM loss in chunks
of 2048 labelled tokens, AdamW (fused) on the adapters, clipping at 1.0: the recipe's step on one
row of --seq tokens (a packed row of the bundled chats prepared at that length when --data is
given, else random tokens in documents of 64-512). Needs a GPU with at least 120 GB (H200, B200):
the weights alone are 93 GB; on a smaller one it says so and exits 0.

Prints s/step, tokens/s, MFU (bench_sft.lora_step_flops over the device's peak dense bf16 rate),
peak memory (torch.cuda.max_memory_allocated), and the host syncs of one step, counted with
torch.cuda.set_sync_debug_mode("warn") (where each happened).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MIN_GPU_GB = 120
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
RANK, ALPHA, DROPOUT, CHUNK = 16, 32.0, 0.05, 2048


def one_row(data: str | None, seq: int, vocab: int) -> dict:
    """A packed SFT row of `seq` tokens: the longest prepared row, else random documents."""
    import random

    if data:
        from bench_sft import check_data_dir, read_rows

        check_data_dir(data, seq)
        return max(read_rows(Path(data) / "train"), key=lambda row: len(row["input_ids"]))
    rng = random.Random(0)
    ids, labels, positions, docs = [], [], [], []
    while len(ids) < seq:
        n = min(rng.randint(64, 512), seq - len(ids))
        prompt = n // 3
        doc = [rng.randrange(3, vocab) for _ in range(n)]
        ids += doc
        labels += [-100] * prompt + doc[prompt:]
        positions += list(range(n))
        docs += [len(set(docs))] * n
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": docs}


def build(device, preset: str):
    import torch

    from model import Mixtral, MixtralConfig
    from model.lora import apply_lora

    config = MixtralConfig.preset(preset)
    torch.manual_seed(0)
    model = Mixtral(config, device=device, dtype=torch.bfloat16)  # initialised on the GPU
    model.requires_grad_(False)
    model.gradient_checkpointing = True
    model = apply_lora(model, RANK, ALPHA, DROPOUT, TARGETS)
    for param in model.parameters():
        if param.requires_grad:  # fp32 adapters over the bf16 base, as pipeline.training.model_setup.build_model
            param.data = param.data.float()
    return model, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="pipeline.prep output of recipes/tiny/sft.yaml at --seq tokens")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="model.compile: each decoder layer compiled")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: check the script only")
    parser.add_argument("--preset", default="mixtral-8x7b", help="another shape, to check the script (tiny)")
    args = parser.parse_args()

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        raise SystemExit(2)
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else 0.0
    name = torch.cuda.get_device_name() if cuda else "cpu"
    if cuda and args.preset == "mixtral-8x7b" and total_gb < MIN_GPU_GB:
        print(f"bench_8x7b: skipped, {name} has {total_gb:.0f} GB; the whole Mixtral-8x7B step needs >= {MIN_GPU_GB} GB")
        return

    from bench_sft import lora_step_flops, peak_tflops

    from pipeline.training.tasks import SFTTask

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    model, config = build(device, args.preset)
    sync()
    built_s = time.perf_counter() - start
    weights_gb = torch.cuda.memory_allocated() / 1e9 if cuda else 0.0
    if args.compile:
        model.get_base_model().compile_blocks()
    task = SFTTask(aux_coef=config.router_aux_loss_coef, z_coef=0.0, logits_chunk_size=CHUNK)
    batch = {k: v.to(device) for k, v in task.collate([one_row(args.data, args.seq, config.vocab_size)]).items()}
    tokens, labelled = int((batch["document_ids"] >= 0).sum()), task.count_units(batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=cuda)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16):
            out = task.forward(model, batch)
        (out.loss_sum / labelled + out.extra).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        began = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - began)
        if i == 0 and cuda:
            torch.cuda.reset_peak_memory_stats()  # the first step's allocator growth aside
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0

    caught = []
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
                torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))

    seconds = sorted(times)[len(times) // 2]
    flops = lora_step_flops(config, RANK, tokens, labelled) / seconds
    peak = peak_tflops(name, args.peak_tflops)
    mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "n/a (pass --peak-tflops)"
    print(f"\n{args.preset} LoRA SFT step (random weights) on {name} ({total_gb:.0f} GB), torch {torch.__version__}; "
          f"1 row of {tokens} tokens ({labelled} labelled), r={RANK} attention + experts, activation checkpointing, "
          f"bf16 autocast{', compiled layers' if args.compile else ''}; built in {built_s:.0f} s, "
          f"weights + adapters {weights_gb:.1f} GB\n")
    print("| s/step (median) | tokens/s | TFLOP/s (needed) | MFU | peak GPU memory (GB) | host syncs per step |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {seconds:.3f} | {tokens / seconds:.0f} | {flops / 1e12:.1f} | {mfu} | {peak_gb:.1f} | {sum(syncs.values())} |")
    print("\nhost syncs (set_sync_debug_mode warn): " + (", ".join(f"{k} x{v}" for k, v in syncs.items()) or "none"))


if __name__ == "__main__":
    main()
