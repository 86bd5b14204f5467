"""LoRA SFT step: our pipeline vs transformers MixtralForCausalLM + PEFT, on CPU fp32 (make bench-sft).

    python bench/bench_sft.py [--steps 3] [--threads 2] [--seq 1024] [--batch 4]

Same model shape on both sides (hidden 512, 4 layers, 8 experts top-2, ffn 1792, 8 heads, 2 kv
heads, vocab 32000 = MixtralConfig.preset("bench-small")), LoRA r=16 / alpha 32 on q/k/v/o and on
the experts, the same packed SFT rows (the bundled chats prepared at --seq tokens, answer-only
labels), AdamW, router aux loss 0.02.

- ours: the real pipeline step: `pipeline.sft.build_model` from the tiny recipe with the bench
  overrides, `Trainer.train_step` (global-token CE + aux, clipping, AdamW, schedule), chunked
  LM loss on the labelled tokens only, grouped expert LoRA.
- peer: `MixtralForCausalLM` + PEFT `LoraConfig(target_modules=q/k/v/o,
  target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj])`, a plain
  forward(labels) / backward / AdamW step loop. It gets position_ids and no 2-D attention_mask,
  so transformers masks attention within each packed document, like ours (same attention work).

Each side runs in its own subprocess (so neither pollutes the other's peak memory); peak memory
is the process's ru_maxrss (weights, activations, optimizer and the Python/torch runtime alike).
The first step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/tiny/sft.yaml"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_rows(data_dir: str, count: int) -> list[dict]:
    import datasets

    train = datasets.load_from_disk(str(Path(data_dir) / "train"))
    if len(train) < count:
        raise SystemExit(f"{data_dir}/train has {len(train)} rows, the bench needs {count}")
    # The longest rows: the bench measures full-width batches.
    order = sorted(range(len(train)), key=lambda i: -len(train[i]["input_ids"]))[:count]
    return [train[i] for i in order]


def run_ours(args, rows: list[dict]) -> dict:
    import torch

    from pipeline.sft import SFTTask, build_model, load_recipe
    from pipeline.tracking import Tracker
    from pipeline.trainer import Trainer, make_accelerator

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(str(RECIPE), [
            "model.preset=bench-small", "lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0",
            f"model.logits_chunk_size={args.chunk}", f"train.micro_batch_size={args.batch}",
            "train.grad_accum_steps=1", f"train.max_steps={args.steps + 1}", "train.mixed_precision=fp32",
            "tracking.report_to=none", f"output_dir={tmp}/out", f"data.output_dir={args.data}",
        ])
        torch.manual_seed(0)
        model = build_model(recipe, Path(tmp), is_main=False)
        accelerator = make_accelerator(mixed_precision="no", backend="auto", log_with=None, project_dir=tmp)
        tracker = Tracker(accelerator, tmp, report_to="none", project="bench", run_name=None, tags=[], config={})
        task = SFTTask(aux_coef=recipe.model.router_aux_loss_coef, z_coef=0.0,
                       logits_chunk_size=recipe.model.logits_chunk_size)
        trainer = Trainer(accelerator=accelerator, model=model, task=task, train_data=rows, eval_data=None,
                          config=recipe.train, output_dir=tmp, tracker=tracker, progress_bar=False)
        times, cpu_times, tokens, losses = [], [], 0, []
        for step in range(args.steps + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics, step_tokens = trainer.train_step()
            trainer.step += 1
            if step > 0:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
                tokens += step_tokens
            losses.append(metrics["loss"])
    return {"seconds": sum(times), "tokens": tokens, "losses": losses,
            "cpu_seconds": sum(cpu_times),
            "impl": f"native fused expert LoRA, frozen-head CE in chunks of {args.chunk}, attention per document"}


def run_peer(args, rows: list[dict]) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM

    from model import MixtralConfig
    from pipeline.sft import SFTTask

    cfg = HFConfig(**MixtralConfig.preset("bench-small").to_hf())
    cfg.output_router_logits = True  # the aux loss is part of the objective, as on our side
    cfg.router_aux_loss_coef = 0.02
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, lora)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    collate = SFTTask(aux_coef=0.0, z_coef=0.0, logits_chunk_size=None).collate
    times, cpu_times, tokens, losses = [], [], 0, []
    for step in range(args.steps + 1):
        batch = collate(rows[step * args.batch:(step + 1) * args.batch])
        start, cpu_start = time.perf_counter(), time.process_time()
        # attention_mask=None: transformers then finds the packed documents from position_ids (restarts)
        # and masks attention within each one, as our document_ids mask does (with a 2-D mask it
        # would attend across documents). Padding restarts at position 0 each token: it sees itself.
        out = model(input_ids=batch["input_ids"], attention_mask=None,
                    position_ids=batch["position_ids"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            tokens += int(batch["attention_mask"].sum())
        losses.append(float(out.loss))
    impl = getattr(model.get_base_model().config, "_experts_implementation", None) or "default"
    return {"seconds": sum(times), "tokens": tokens, "losses": losses,
            "cpu_seconds": sum(cpu_times), "impl": f"transformers {impl} experts + PEFT target_parameters, "
            "packed causal mask (from position_ids)"}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rows = load_rows(args.data, (args.steps + 1) * args.batch)
    # Both sides get the same rows; our trainer groups them into batches in its seeded order
    # (the rows are the longest packed ones, all close to --seq tokens).
    result = run_ours(args, rows) if args.side == "ours" else run_peer(args, rows)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024, help="our logits_chunk_size (tokens)")
    parser.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        subprocess.run([sys.executable, "-m", "pipeline.prep", str(RECIPE), f"data.output_dir={data}",
                        f"data.max_seq_len={args.seq}"], cwd=ROOT, env=env, check=True, capture_output=True)
        results = {}
        for side in ("peer", "ours"):
            cmd = [sys.executable, __file__, "--side", side, "--data", data, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--seq", str(args.seq), "--batch", str(args.batch),
                   "--chunk", str(args.chunk)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{side} side failed:\n{proc.stderr[-4000:]}")
            results[side] = json.loads(line[0][len("RESULT "):])
            results[side]["load"] = os.getloadavg()[0]

    peer, ours = results["peer"], results["ours"]
    tps = {k: r["tokens"] / r["seconds"] for k, r in results.items()}
    # CPU seconds of the process: less sensitive than wall time to other jobs on a shared machine
    # (a busy machine stretches wall time, not the work done), reported beside it.
    cpu_tps = {k: r["tokens"] / r["cpu_seconds"] for k, r in results.items()}
    print(f"\nLoRA SFT step, CPU fp32, {args.threads} threads, batch {args.batch} x seq {args.seq}, "
          f"r=16 on attention + experts, {args.steps} timed steps (+1 warm-up); attention within "
          "packed documents on both sides\n")
    print("| side | implementation | tokens/s (wall) | s/step | tokens/CPU-s | peak RSS (MB) | load avg (1 min, after) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, key in (("transformers + PEFT", "peer"), ("ours (pipeline)", "ours")):
        r = results[key]
        print(f"| {name} | {r['impl']} | {tps[key]:.0f} | {r['seconds'] / args.steps:.2f} | {cpu_tps[key]:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['load']:.2f} |")
    print(f"| **ours / peer** | | **{tps['ours'] / tps['peer']:.2f}x** | | **{cpu_tps['ours'] / cpu_tps['peer']:.2f}x** | "
          f"**{ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x** | |")
    print("\ntargets: tokens/s >= 2x, peak memory <= 0.7x")
    print(f"first-step losses (CE on answers + aux): peer {peer['losses'][0]:.4f}, ours {ours['losses'][0]:.4f}")


if __name__ == "__main__":
    main()
