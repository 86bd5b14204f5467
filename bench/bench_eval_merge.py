"""Host time and memory of eval's adapter merge at Mixtral-8x7B's layer shapes, vs the merge eval ran before.

    .venv/bin/python bench/bench_eval_merge.py [--layers 1] [--experts 8] [--repeat 1] [--keep DIR]

`make eval` on a LoRA run builds the model to evaluate with `adapter_merge.load_merged` (export's
merge): the base read one native parameter at a time, every adapter's delta added in fp32 on the
host, rounded once to bf16 and copied into a model built on the meta device. Before, eval loaded the
base into memory and merged with `sharded_load.merge_adapter_fp32` (a PEFT wrapper around the same
fp32 delta) where the model was. This measures both on the host, each in a fresh process (median
seconds, peak RSS), for an adapter trained on a bf16 base (LoRA) and on a 4-bit one (QLoRA: the base
first goes through the NF4 round trip, `model.quant.nf4_round_trip`).

Inputs: a random Mixtral-8x7B-shaped checkpoint (hidden 4096, 8 experts of 14336, GQA 32/8, vocab
32000) with --layers layers in bf16 (1 layer: 3.4 GB on disk) and a random adapter of
recipes/mixtral-8x7b/sft_lora.yaml's shape (r 16, alpha 32, q/k/v/o and every expert's w1/w2/w3).
--experts N merges only the first N experts of each layer: what one rank of an expert-parallel eval
merges (8 GPUs, EP 8: --experts 1). Per-layer seconds times 32 is an estimate of the whole model's
merge on this host, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import REPO, run  # noqa: E402

PREAMBLE = (
    "import torch\nfrom pathlib import Path\ntorch.manual_seed(0)\n"
    "root = Path({root!r}); experts = {experts}\n"
    "quantized = {{str(root / 'adapter'): {{'type': 'nf4', 'dtype': 'bfloat16'}}}} if {qlora} else {{}}\n"
    "def keep(model):\n"
    "    if experts < model.config.num_local_experts:\n"
    "        from pipeline.distributed.expert_parallel import ExpertPlacement, shard_experts\n"
    "        shard_experts(model, ExpertPlacement(ep_rank=0, ep_size=model.config.num_local_experts // experts,\n"
    "                                             num_experts=model.config.num_local_experts))\n"
)
# Eval now: export's streaming merge onto a meta-built model.
OURS = PREAMBLE + (
    "from pipeline.adapter_merge import load_merged\nfrom pipeline.run_record import Source\n"
    "src = Source(checkpoint=root / 'base', adapters=[root / 'adapter'], manifests=[], quantized=quantized)\n"
    "model = load_merged(src, dtype=torch.bfloat16, device='cpu', on_meta=keep)\n"
)
# Eval before: the base loaded whole (this rank's experts), 4-bit round trip in place, PEFT-wrapped fp32 merge.
BEFORE = PREAMBLE + (
    "from model.checkpoint import load_pretrained\nfrom model.quant import hold_as_4bit_base\n"
    "from pipeline.distributed.expert_parallel import ExpertPlacement, load_local_experts\n"
    "from pipeline.distributed.sharded_load import merge_adapter_fp32\n"
    "if experts < 8:\n"
    "    model = load_local_experts(root / 'base', ExpertPlacement(ep_rank=0, ep_size=8 // experts, num_experts=8),\n"
    "                               dtype=torch.bfloat16, device='cpu')\n"
    "else:\n"
    "    model = load_pretrained(root / 'base', dtype=torch.bfloat16)\n"
    "if quantized:\n"
    "    with torch.no_grad():\n"
    "        hold_as_4bit_base(model, torch.bfloat16)\n"
    "model = merge_adapter_fp32(model, str(root / 'adapter'))\n"
)


def build_inputs(root: Path, layers: int) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from model import Mixtral, MixtralConfig
    from model.checkpoint import save_pretrained
    from model.lora import apply_lora

    torch.manual_seed(0)
    config = dataclasses.replace(MixtralConfig.preset("mixtral-8x7b"), num_hidden_layers=layers)
    with torch.device("meta"):
        model = Mixtral(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_pretrained(model, root / "base", max_shard_size="2GB", dtype=torch.bfloat16)
    peft_model = apply_lora(model, r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "experts"])
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)  # B starts at zero: make the adapter matter
    peft_model.save_pretrained(root / "adapter")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=8, choices=[1, 2, 4, 8], help="experts per layer merged (EP rank)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", default=None, help="work in this dir and keep it")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_eval_merge_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / "adapter" / "adapter_model.safetensors").is_file():
            started = time.perf_counter()
            build_inputs(root, args.layers)
            print(f"inputs built in {time.perf_counter() - started:.0f}s under {root}")
        load_before = os.getloadavg()[0]
        rows = []
        for qlora in (False, True):
            results = {"ours": [], "before": []}
            for _ in range(args.repeat):
                for name, body in (("ours", OURS), ("before", BEFORE)):
                    results[name].append(run(body.format(root=str(root), experts=args.experts, qlora=qlora)))
            seconds = {k: statistics.median(t for _, t in v) for k, v in results.items()}
            rss = {k: max(r for r, _ in v) for k, v in results.items()}
            rows.append(("QLoRA (NF4 base)" if qlora else "LoRA (bf16 base)", seconds, rss))
        print(f"\neval's adapter merge on the host, Mixtral-8x7B shapes, {args.layers} layer(s), {args.experts} of 8 "
              f"experts per layer; median of {args.repeat}; load {load_before:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs, torch threads default)")
        print("| adapter | now: load_merged s | before: load + merge_adapter_fp32 s | ratio | "
              "now peak RSS GB | before peak RSS GB | now, x32 layers (estimate) |")
        print("|---|---|---|---|---|---|---|")
        for label, seconds, rss in rows:
            print(f"| {label} | {seconds['ours']:.1f} | {seconds['before']:.1f} | "
                  f"{seconds['ours'] / seconds['before']:.2f} | {rss['ours'] / 1e9:.2f} | {rss['before'] / 1e9:.2f} | "
                  f"{seconds['ours'] * 32 / args.layers / 60:.1f} min |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
