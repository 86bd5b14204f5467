"""QLoRA (4-bit NF4 base) SFT step and base memory: ours vs transformers + PEFT + bitsandbytes (make bench-qlora).

    python bench/bench_qlora.py [--steps 3] [--threads 2] [--seq 512] [--batch 2]

Two parts, every number measured in its own subprocess.

1. The frozen base, loaded from a bf16 checkpoint of a preset with Mixtral-8x7B's proportions
   ("bench-small" layers, hidden 512, ffn 1792, 8 experts, 4 layers, with a 1024-id vocabulary so
   that the embeddings are ~2% of the weights as in 8x7B, not ~30%): its stored tensor bytes and
   the process's resident memory after the load minus before it (RSS, /proc/self/statm), and the
   load's peak RSS; for ours in bf16 (no quantization), ours 4-bit (`load_pretrained(...,
   quantization="nf4")`, quantized tensor by tensor as read) and transformers'
   `MixtralForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))`.
2. The LoRA SFT step (bench/bench_sft.py's harness, same rows, r=16 on q/k/v/o + experts, AdamW,
   fp32 compute on the CPU) with the 4-bit base on both sides: ours is the pipeline's step with
   `model.quantization=nf4`; the peer is transformers + bitsandbytes 4-bit + PEFT
   (`prepare_model_for_kbit_training`, no gradient checkpointing, as ours). tokens/s and the
   process's peak RSS.

transformers 5 keeps Mixtral's experts as fused 3-D parameters, and its bitsandbytes integration
quantizes nn.Linear modules only: its "4-bit" Mixtral holds the attention 4-bit and every expert
(96% of 8x7B's weights) in full precision. Part 1 shows what that costs.

CPU numbers (bitsandbytes' CPU dequantize and quantize, 2 threads by default); a GPU run is not
part of this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_sft  # noqa: E402  (the step harness: rows, our trainer step, peaks)

RANK = bench_sft.RANK


def memory_config():
    from model import MixtralConfig

    return dataclasses.replace(MixtralConfig.preset("bench-small"), vocab_size=1024)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_side(side: str, checkpoint: str) -> dict:
    """Load the base one way; its tensor bytes, RSS growth and the peak RSS of the process.

    Run with MALLOC_MMAP_THRESHOLD_ fixed (main() sets it): glibc otherwise raises its mmap
    threshold after the first frees and keeps the freed tensors of this small model in its heap,
    so RSS would not show what the loader releases (8x7B's tensors, 0.1-1.9 GB, are mmapped anyway)."""
    import torch

    import model.quant  # noqa: F401  (bitsandbytes imported before the baseline is read)
    from model.checkpoint import load_pretrained

    if side == "peer":
        from transformers import BitsAndBytesConfig, MixtralForCausalLM
    # bitsandbytes' first quantization loads its CPU library and kernels (~85 MB resident, once per
    # process): done before the baseline on every side, so that the growth is the model's.
    model.quant.quantize_nf4(torch.zeros(64, 64, dtype=torch.bfloat16))
    before = rss_bytes()
    start = time.perf_counter()
    if side == "ours_bf16":
        base = load_pretrained(checkpoint, dtype=torch.bfloat16).requires_grad_(False)
        stored = model.quant.base_nbytes(base)
    elif side == "ours_nf4":
        base = load_pretrained(checkpoint, dtype=torch.bfloat16, quantization="nf4")
        stored = model.quant.base_nbytes(base)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        base = MixtralForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu",
                                                  dtype=torch.bfloat16)
        stored = base.get_memory_footprint()
    seconds = time.perf_counter() - start
    return {"stored_bytes": stored, "rss_growth": rss_bytes() - before, "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_peer_qlora(args, rows: list[dict]) -> dict:
    """bench_sft's peer step loop on transformers + bitsandbytes 4-bit + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, MixtralForCausalLM
    from transformers import MixtralConfig as HFConfig

    from model import MixtralConfig
    from pipeline.training.tasks import SFTTask

    cfg = HFConfig(**MixtralConfig.preset(args.preset).to_hf())
    cfg.output_router_logits = True
    cfg.router_aux_loss_coef = 0.02
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        MixtralForCausalLM(cfg).save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = MixtralForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map="cpu",
                                                   dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=bench_sft.TARGETS,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    task = SFTTask(aux_coef=0.0, z_coef=0.0, logits_chunk_size=None)
    times, tokens, losses = [], 0, []
    for step in range(args.steps + args.warmup):
        batch = task.collate(rows[step * args.batch:(step + 1) * args.batch])
        start = time.perf_counter()
        out = model(input_ids=batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"],
                    labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += int((batch["document_ids"] >= 0).sum())
        losses.append(float(out.loss))
    return {"seconds": sum(times), "tokens": tokens, "losses": losses, **bench_sft.peaks("cpu")}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.side.startswith("load:"):
        result = load_side(args.side[5:], args.checkpoint)
    else:
        rows, _ = bench_sft.load_rows(args.data, (args.steps + args.warmup) * args.batch)
        if args.side == "ours":
            args.dtype, args.device = "fp32", "cpu"
            result = bench_sft.run_ours(args, rows, extra=("model.quantization=nf4",))
        else:
            result = run_peer_qlora(args, rows)
    print("RESULT " + json.dumps(result))


def run_child(args, side: str, env: dict, **extra) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch),
           "--chunk", str(args.chunk), "--preset", args.preset]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512, help="packed row length")
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--chunk", type=int, default=1024, help="our logits_chunk_size (tokens)")
    parser.add_argument("--preset", default="bench-small", help="model of the step part")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.side:
        child(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "ACCELERATE_USE_CPU": "true"}
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        from model import Mixtral
        from model.checkpoint import save_pretrained

        torch.manual_seed(0)
        save_pretrained(Mixtral(memory_config(), dtype=torch.bfloat16), f"{tmp}/ckpt", max_shard_size="50MB")
        load_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}
        loads = {side: run_child(args, f"load:{side}", load_env, checkpoint=f"{tmp}/ckpt")
                 for side in ("ours_bf16", "ours_nf4", "peer")}
        data = f"{tmp}/data"
        subprocess.run([sys.executable, "-m", "pipeline.prep", str(bench_sft.RECIPE), f"data.output_dir={data}",
                        f"data.max_seq_len={args.seq}"], cwd=ROOT, env=env, check=True, capture_output=True)
        steps = {side: run_child(args, side, env, data=data) for side in ("peer", "ours")}

    bf16 = loads["ours_bf16"]
    print(f"\n1. frozen base, {memory_config().num_hidden_layers} layers of bench-small with a 1024-id vocabulary, "
          f"loaded from a bf16 checkpoint (CPU, {args.threads} threads; MB = 2^20 B)\n")
    print(f"{'':34} {'stored MB':>10} {'x bf16':>7} {'RSS growth MB':>14} {'x bf16':>7} {'load peak RSS MB':>17} {'load s':>7}")
    names = {"ours_bf16": "ours, bf16 (no quantization)", "ours_nf4": "ours, model.quantization: nf4",
             "peer": "transformers + bnb 4-bit (nf4, dq)"}
    for side, r in loads.items():
        print(f"{names[side]:34} {r['stored_bytes'] / 2**20:10.1f} {r['stored_bytes'] / bf16['stored_bytes']:7.3f} "
              f"{r['rss_growth'] / 2**20:14.1f} {r['rss_growth'] / bf16['rss_growth']:7.3f} "
              f"{r['peak_rss_mb']:17.0f} {r['seconds']:7.2f}")
    print(f"\n2. QLoRA SFT step, model {args.preset}, CPU fp32 compute, {args.threads} threads, batch {args.batch} x seq "
          f"{args.seq}, r={RANK} on attention + experts, {args.steps} timed steps (+{args.warmup} warm-up)\n")
    print(f"{'':38} {'tokens/s':>9} {'peak RSS MB':>12} {'first loss':>11}")
    for side, name in (("peer", "transformers + bnb 4-bit + PEFT"), ("ours", "ours (model.quantization: nf4)")):
        r = steps[side]
        print(f"{name:38} {r['tokens'] / r['seconds']:9.0f} {r['peak_rss_mb']:12.0f} {r['losses'][0]:11.4f}")
    ratio = (steps["ours"]["tokens"] / steps["ours"]["seconds"]) / (steps["peer"]["tokens"] / steps["peer"]["seconds"])
    print(f"\nours / peer: tokens/s {ratio:.2f}x, peak RSS {steps['ours']['peak_rss_mb'] / steps['peer']['peak_rss_mb']:.2f}x"
          f"; load avg {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
