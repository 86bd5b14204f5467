"""LoRA DPO step: our pipeline vs TRL's DPOTrainer on transformers Mixtral + PEFT, CPU fp32 (make bench-dpo).

    python bench/bench_dpo.py [--steps 2] [--threads 2] [--prompt 256] [--completion 256] [--pairs 4]
    python bench/bench_dpo.py --precompute     # both sides with precomputed reference log-probs
    python bench/bench_dpo.py --ragged         # completions of 1/4 to all of --completion tokens

Same model shape on both sides (hidden 512, 4 layers, 8 experts top-2, ffn 1792, 8 heads, 2 kv
heads, vocab 32000 = MixtralConfig.preset("bench-small")) and the same weights (ours saved with
save_pretrained, loaded by transformers), LoRA r=16 / alpha 32 on q/k/v/o and on the experts, the
same pairs (random token ids; prompt 256 + completion 256 tokens, the completion ending in EOS;
--ragged: each completion 64-256 tokens, so most rows of a batch end in padding),
beta 0.1, sigmoid loss, router aux loss 0.02, AdamW, clipping at 1.0.

- ours: `pipeline.training.tasks.DPOTask` in the shared `Trainer.train_step`: [chosen; rejected] in one
  forward, grouped expert LoRA, reference = the same model with the adapter disabled (one no-grad
  forward per step) or precomputed.
- ours, dense mask: the same with `attention_backend = "mask"`: every row attends through a
  [2B, 1, S, S] boolean mask, as the DPO collation did before document ids (issue 17); the row
  "ours" attends per sequence (`batch_layout`; on the CPU the bucketed SDPA, on CUDA varlen).
- peer: `trl.DPOTrainer` with `peft_config` (`target_modules` q/k/v/o, `target_parameters` on
  `mlp.experts.gate_up_proj` / `down_proj`), transformers' grouped_mm experts, TRL's reference
  (adapter disabled, or `precompute_ref_log_probs`), gradient checkpointing off and bf16 off (TRL
  turns bf16 autocast on by default, also on CPU) as on our side.
  Step times come from a TrainerCallback (on_step_begin -> on_step_end).

Each side runs in its own subprocess. The first step is a warm-up and is not timed. The
``logps/chosen`` of the first step (before any update) must agree: same weights, same tokens.
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
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EOS = 2
BETA = 0.1
AUX = 0.02
LR = 5e-6
SIDES = ("peer", "ours-mask", "ours")
NAMES = {"peer": "TRL + transformers + PEFT", "ours-mask": "ours, dense mask (before)", "ours": "ours (pipeline)"}


def make_pairs(args) -> list[dict]:
    """One batch of token-id pairs, trained on at every step by both sides (one epoch = one step).

    The same ids become TRL's text through a word-level tokenizer ("w<id>" -> id).
    """
    import torch

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(args.pairs):
        lengths = [args.completion] * 2
        if args.ragged:  # from a quarter of --completion to all of it
            lengths = torch.randint(args.completion // 4, args.completion + 1, (2,), generator=g).tolist()
        prompt, chosen, rejected = (
            torch.randint(3, 32000, (k,), generator=g).tolist()
            for k in (args.prompt, lengths[0] - 1, lengths[1] - 1)
        )
        rows.append({"prompt": prompt, "chosen": chosen + [EOS], "rejected": rejected + [EOS]})
    return rows


def save_weights(path: str) -> None:
    import torch

    from model import Mixtral, MixtralConfig
    from model.checkpoint import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Mixtral(MixtralConfig.preset("bench-small")), path)


def run_ours(args, pairs: list[dict], weights: str) -> dict:
    import torch

    from model.checkpoint import load_pretrained
    from model.lora import apply_lora
    from pipeline.distributed.parallel import ParallelSection, make_accelerator
    from pipeline.recipe import DPOSection, TrainSection
    from pipeline.training.reference_cache import compute_reference_log_probs
    from pipeline.training.tasks import DPOTask, Reference
    from pipeline.training.tracking import Tracker
    from pipeline.training.trainer import Trainer

    rows = []
    for p in pairs:
        prompt = p["prompt"]
        rows.append(
            {
                "prompt_input_ids": prompt,
                "chosen_input_ids": prompt + p["chosen"],
                "chosen_labels": [-100] * len(prompt) + p["chosen"],
                "rejected_input_ids": prompt + p["rejected"],
                "rejected_labels": [-100] * len(prompt) + p["rejected"],
            }
        )
    torch.manual_seed(0)
    model = load_pretrained(weights, dtype=torch.float32)
    if args.side == "ours-mask":
        model.attention_backend = "mask"
    model.requires_grad_(False)
    model = apply_lora(model, 16, 32.0, 0.0, TARGETS + ["experts"])
    reference = Reference(None)
    if args.precompute:
        from datasets import Dataset

        data = Dataset.from_list(rows)
        chosen, rejected = compute_reference_log_probs(model, reference, data, args.pairs)
        rows = [
            {**r, "ref_chosen_logps": float(c), "ref_rejected_logps": float(j)}
            for r, c, j in zip(rows, chosen, rejected, strict=True)
        ]
        reference = None
    cfg = TrainSection(
        lr=LR,
        micro_batch_size=args.pairs,
        grad_accum_steps=1,
        max_steps=args.steps + 1,
        mixed_precision="no",
        max_grad_norm=1.0,
        schedule="constant",
    )
    with tempfile.TemporaryDirectory() as tmp:
        accelerator = make_accelerator(ParallelSection(), micro_batch_size=args.pairs, grad_accum_steps=1,
                                       project_dir=tmp)
        tracker = Tracker(
            accelerator, tmp, report_to="none", project="bench", run_name=None, tags=[], config={}
        )
        task = DPOTask(DPOSection(beta=BETA), aux_coef=AUX, z_coef=0.0, reference=reference)
        trainer = Trainer(
            accelerator=accelerator,
            model=model,
            task=task,
            train_data=rows,
            eval_data=None,
            config=cfg,
            output_dir=tmp,
            tracker=tracker,
            progress_bar=False,
        )
        times, first = [], None
        for step in range(args.steps + 1):
            start = time.perf_counter()
            metrics, _ = trainer.train_step()
            trainer.step += 1
            if step > 0:
                times.append(time.perf_counter() - start)
            first = metrics if first is None else first
    return {
        "times": times,
        "logps_chosen": first["logps/chosen"],
        "loss": first["loss"],
        "impl": "native grouped expert LoRA, one [chosen; rejected] forward, "
        + ("dense [2B, 1, S, S] mask" if args.side == "ours-mask" else "attention per sequence"),
    }


def run_peer(args, pairs: list[dict], weights: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MixtralForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 32000)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<unk>", eos_token="</s>", bos_token="<s>"
    )

    def text(ids):
        return " ".join(f"w{i}" for i in ids)

    # TRL appends the EOS to each completion itself.
    data = Dataset.from_dict(
        {
            "prompt": [text(p["prompt"]) for p in pairs],
            "chosen": [" " + text(p["chosen"][:-1]) for p in pairs],
            "rejected": [" " + text(p["rejected"][:-1]) for p in pairs],
        }
    )
    model = MixtralForCausalLM.from_pretrained(
        weights, dtype=torch.float32, experts_implementation="grouped_mm"
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=TARGETS,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.logs, self._start = [], [], 0.0

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(
            output_dir=tmp,
            beta=BETA,
            loss_type=["sigmoid"],
            learning_rate=LR,
            lr_scheduler_type="constant",
            per_device_train_batch_size=args.pairs,
            max_steps=args.steps + 1,
            max_length=None,
            precompute_ref_log_probs=args.precompute,
            router_aux_loss_coef=AUX,
            gradient_checkpointing=False,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        trainer.train()
    first = next(log for log in timer.logs if "logps/chosen" in log)
    impl = getattr(model.config, "_experts_implementation", None) or "default"
    return {
        "times": timer.times[1:],
        "logps_chosen": first["logps/chosen"],
        "loss": first["loss"],
        "impl": f"TRL DPOTrainer, transformers {impl} experts + PEFT target_parameters",
    }


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    pairs = make_pairs(args)
    run = run_peer if args.side == "peer" else run_ours
    result = run(args, pairs, args.weights)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
    parser.add_argument(
        "--precompute", action="store_true", help="precomputed reference log-probs on both sides"
    )
    parser.add_argument("--ragged", action="store_true", help="completions of 1/4 to all of --completion tokens")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="which to run (default: all; the ratios need peer and ours)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
        # Both sides with our entry points' allocator setting (pipeline/__init__.py).
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
        # This bench is CPU fp32: on a GPU host accelerate (ours, and TRL's Trainer) would move to it.
        "ACCELERATE_USE_CPU": "true",
    }
    shared = [
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--prompt",
        str(args.prompt),
        "--completion",
        str(args.completion),
        "--pairs",
        str(args.pairs),
    ]
    shared += ["--precompute"] if args.precompute else []
    shared += ["--ragged"] if args.ragged else []
    results = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(f"{tmp}/weights")
        for side in args.sides:
            cmd = [sys.executable, __file__, "--side", side, "--weights", f"{tmp}/weights", *shared]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{side} side failed:\n{proc.stderr[-4000:]}")
            results[side] = json.loads(line[0][len("RESULT ") :])

    pps = {k: args.pairs * len(r["times"]) / sum(r["times"]) for k, r in results.items()}
    ref = "precomputed" if args.precompute else "adapter disabled, on the fly"
    print(
        f"\nLoRA DPO step, CPU fp32, {args.threads} threads, {args.pairs} pairs x (prompt {args.prompt} + "
        f"completion {f'{args.completion // 4}-' if args.ragged else ''}{args.completion}), r=16 on attention + experts, reference {ref}, "
        f"{args.steps} timed steps (+1 warm-up); 1-min load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after (the machine is shared: compare runs at similar load)\n"
    )
    print("| side | implementation | pairs/s | s/step | peak RSS (MB) | logps/chosen, step 1 |")
    print("|---|---|---:|---:|---:|---:|")
    for key, r in results.items():
        print(
            f"| {NAMES[key]} | {r['impl']} | {pps[key]:.3f} | {sum(r['times']) / len(r['times']):.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['logps_chosen']:.2f} |"
        )
    for key, peer in (("peer", "TRL"), ("ours-mask", "dense mask")):
        if "ours" in results and key in results:
            print(
                f"| **ours / {peer}** | | **{pps['ours'] / pps[key]:.2f}x** | | "
                f"**{results['ours']['peak_rss_mb'] / results[key]['peak_rss_mb']:.2f}x** | |"
            )
    print("\ntarget: pairs/s >= 2x")


if __name__ == "__main__":
    main()
