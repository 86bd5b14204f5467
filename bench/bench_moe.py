"""MoE block fwd+bwd: ours vs transformers 5's MixtralSparseMoeBlock, with a dense-matmul ceiling.

    make bench-moe                                   # fp32 at 2048 and 128 tokens, bf16 at 128
    .venv/bin/python bench/bench_moe.py --dtypes fp32 bf16 --tokens 2048 128 --repeats 3
    .venv/bin/python bench/bench_moe.py --threads 1 --tokens 128 --dtypes fp32   # quick comparison

Same weights and inputs for every implementation. GFLOP/s counts the expert GEMMs only:
6*H*F flops per routed row forward, x3 for forward+backward. The dense ceiling is one
[N, H] @ [H, 3F] matmul (same flops) forward+backward. Targets (issue): at 2048 tokens not slower
than the best transformers implementation and >= 90% of the dense rate; at 128 tokens >= 2x
transformers' grouped_mm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

from model.moe import MoEBlock  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds of each step, after one warm-up call each, run A B C .. A B C .. so that the
    load of a shared machine falls on every implementation alike."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_case(tokens: int, dtype: torch.dtype, H: int, F: int, E: int, K: int, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K
    )
    hf_block = MixtralSparseMoeBlock(config).to(dtype)
    ours = MoEBlock(H, F, E, K, dtype=dtype)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, 0.02)
        ours.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf_block.experts.down_proj)
    h = torch.randn(1, tokens, H, dtype=dtype)
    grad = torch.randn(1, tokens, H, dtype=dtype)

    def run(fn):
        def step():
            x = h.detach().requires_grad_()
            fn(x).backward(grad)
            # A training step: optimizer.zero_grad(set_to_none=True) follows, so no step pays for
            # accumulating into the previous step's expert gradients (352 MB here).
            for p in (*hf_block.parameters(), *ours.parameters()):
                p.grad = None

        return step

    def ours_with(use_grouped_mm):
        def fn(x):
            ours.experts.use_grouped_mm = use_grouped_mm
            return ours(x)[0]

        return fn

    def hf_with(impl):
        def fn(x):
            config._experts_implementation = impl
            return hf_block(x)

        return fn

    # The outputs must agree before their speed means anything.
    x = h.detach()
    with torch.no_grad():
        ref = hf_with("eager")(x).float()
        diff = (ours(x)[0].float() - ref).abs().max().item() / ref.abs().max().item()
    if diff > (1e-4 if dtype == torch.float32 else 5e-2):
        raise SystemExit(f"outputs differ: relative max diff {diff:.2e} at {tokens} tokens {dtype}")

    N = tokens * K
    dense_w = (torch.randn(3 * F, H, dtype=dtype) * 0.02).requires_grad_()
    dense_x = torch.randn(N, H, dtype=dtype)
    dense_g = torch.randn(N, 3 * F, dtype=dtype)

    def dense_step():
        x = dense_x.detach().requires_grad_()
        (x @ dense_w.T).backward(dense_g)
        dense_w.grad = None

    gflop = 18 * N * H * F / 1e9
    seconds = time_interleaved(
        {
            "ours": run(ours_with(None)),
            "ours via torch._grouped_mm": run(ours_with(True)),
            "transformers eager": run(hf_with("eager")),
            "transformers grouped_mm": run(hf_with("grouped_mm")),
            "dense matmul (ceiling)": dense_step,
        },
        repeats,
    )
    return [(tokens, dtype, name, sec, gflop / sec) for name, sec in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 128])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--bf16-max-tokens",
        type=int,
        default=128,
        help="skip bf16 above this many tokens (bf16 matmuls are slow on CPUs without AMX)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"H={args.hidden} F={args.ffn} E={args.experts} K={args.top_k}; fwd+bwd, median of {args.repeats} "
        f"interleaved repeats; load average at start {os.getloadavg()[0]:.1f}\n"
    )
    print("| tokens | dtype | implementation | ms | GFLOP/s | ours / this (speed-up) | % of dense |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for dtype_name in args.dtypes:
        for tokens in args.tokens:
            if dtype_name == "bf16" and tokens > args.bf16_max_tokens:
                continue
            rows = bench_case(
                tokens, DTYPES[dtype_name], args.hidden, args.ffn, args.experts, args.top_k, args.repeats
            )
            ours_sec = rows[0][3]
            dense_rate = rows[-1][4]
            for _, _, name, sec, rate in rows:
                print(
                    f"| {tokens} | {dtype_name} | {name} | {sec * 1e3:.1f} | {rate:.1f} | "
                    f"{sec / ours_sec:.2f}x | {100 * rate / dense_rate:.0f}% |",
                    flush=True,
                )
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
