"""MoE block fwd+bwd: ours vs transformers 5's MixtralSparseMoeBlock, with a dense-matmul ceiling.

    make bench-moe                                   # fp32 and bf16 at 2048 and 128 tokens (bf16 at 128
                                                     # only, on CPUs without native bf16 instructions)
    .venv/bin/python bench/bench_moe.py --dtypes fp32 bf16 --tokens 2048 128 --repeats 5
    .venv/bin/python bench/bench_moe.py --threads 1 --tokens 128 --dtypes fp32   # quick comparison
    .venv/bin/python bench/bench_moe.py --device cuda     # make bench-gpu: 8x7B shapes, bf16, 16384/4096 tokens

Same weights and inputs for every implementation. GFLOP/s counts the expert GEMMs only:
6*H*F flops per routed row forward, x3 for forward+backward. The dense ceiling is one
[N, H] @ [H, 3F] matmul (same flops) forward+backward. Targets (issue): at 2048 tokens not slower
than the best transformers implementation and >= 90% of the dense rate; at 128 tokens >= 2x
transformers' grouped_mm.

--device cuda: modules and tensors on the GPU, torch.cuda.synchronize() before and after each timed
call (kernels run asynchronously), 20 repeats after 3 warm-ups by default, Mixtral-8x7B's shapes
(H 4096, F 14336) in bf16 at 16384 and 4096 tokens by default, and a column with each implementation's peak memory over one call above what was already
allocated (torch.cuda.max_memory_allocated after reset_peak_memory_stats): activations, saved
tensors and gradients, not the resident weights and inputs every implementation shares.
An implementation that raises on the device (e.g. a grouped kernel without fp32 support) gets a
row with its error instead of a time; the others still run.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# As in our entry points (pipeline/__init__.py), for every implementation alike: large CPU
# tensors on huge pages (each step allocates 352 MB of expert gradients afresh).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402

from model.cpu_kernels import cpu_has_native_mm, cpuinfo  # noqa: E402
from model.moe import MoEBlock  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def require_cuda() -> None:
    """Stop before any work when --device cuda has no GPU to run on (make bench-gpu relies on it)."""
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        raise SystemExit(2)


def warm_up(steps: dict, calls: int) -> dict:
    """Runs each step `calls` times; returns {name: error line} for the ones that raised (those
    are left out of the timing, so one unsupported kernel does not lose the other rows)."""
    failed = {}
    for name, step in steps.items():
        try:
            for _ in range(calls):
                step()
        except (RuntimeError, NotImplementedError, ValueError) as err:
            first_line = (str(err).splitlines() or [""])[0][:160].replace("|", "/")  # a table cell
            failed[name] = f"{type(err).__name__}: {first_line}"
    return failed


def time_interleaved(steps: dict, repeats: int, cuda: bool = False) -> tuple[dict, dict]:
    """Median seconds of each step, run interleaved so that the load of a shared machine falls on
    every implementation alike, in a new (seeded) random order each round: with one fixed cyclic
    order (rotated or not, each call has the same predecessor) "ours" and "ours via
    torch._grouped_mm", the same computation at 2048 tokens, measured 2343 vs 2147 ms on this CPU;
    shuffled, 1813 vs 1847 ms. On CUDA also the largest memory a call allocated above what was
    allocated before it (bytes). The caller warms up first (warm_up)."""
    times = {name: [] for name in steps}
    peaks = {name: 0 for name in steps} if cuda else {}
    names, order = list(steps), random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            step = steps[name]
            if cuda:
                torch.cuda.synchronize()  # nothing queued before the call is timed with it
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()  # the call's kernels have finished
            times[name].append(time.perf_counter() - start)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - resident)
    return {name: statistics.median(t) for name, t in times.items()}, peaks


def bench_case(
    tokens: int, dtype: torch.dtype, H: int, F: int, E: int, K: int, repeats: int,
    device: str = "cpu", warmup: int = 1,
) -> list[tuple]:
    """Rows (tokens, dtype, name, seconds | error, GFLOP/s | None, peak bytes | None); the first
    is ours, the last the dense ceiling."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K
    )
    hf_block = MixtralSparseMoeBlock(config).to(device=device, dtype=dtype)
    ours = MoEBlock(H, F, E, K, dtype=dtype).to(device)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, 0.02)
        ours.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf_block.experts.down_proj)
    h = torch.randn(1, tokens, H, dtype=dtype, device=device)
    grad = torch.randn(1, tokens, H, dtype=dtype, device=device)

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
    dense_w = (torch.randn(3 * F, H, dtype=dtype, device=device) * 0.02).requires_grad_()
    dense_x = torch.randn(N, H, dtype=dtype, device=device)
    dense_g = torch.randn(N, 3 * F, dtype=dtype, device=device)

    def dense_step():
        x = dense_x.detach().requires_grad_()
        (x @ dense_w.T).backward(dense_g)
        dense_w.grad = None

    gflop = 18 * N * H * F / 1e9
    steps = {
        "ours": run(ours_with(None)),
        "ours via torch._grouped_mm": run(ours_with(True)),
        "transformers eager": run(hf_with("eager")),
        "transformers grouped_mm": run(hf_with("grouped_mm")),
        "dense matmul (ceiling)": dense_step,
    }
    failed = warm_up(steps, warmup)
    for name in ("ours", "dense matmul (ceiling)"):
        if name in failed:  # the rows every ratio is taken against
            raise SystemExit(f"{name} failed at {tokens} tokens {dtype} on {device}: {failed[name]}")
    seconds, peaks = time_interleaved(
        {name: step for name, step in steps.items() if name not in failed}, repeats, cuda=device == "cuda"
    )
    return [
        (tokens, dtype, name, failed[name], None, None) if name in failed
        else (tokens, dtype, name, seconds[name], gflop / seconds[name], peaks.get(name))
        for name in steps
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="default: 2048 128 on cpu, 16384 4096 on cuda")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES),
                        help="default: fp32 bf16 on cpu, bf16 on cuda")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 on cpu, 20 on cuda")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per implementation "
                        "(default: 1 on cpu, 3 on cuda)")
    parser.add_argument("--hidden", type=int, default=None, help="default: 1024 on cpu, 4096 (8x7B) on cuda")
    parser.add_argument("--ffn", type=int, default=None, help="default: 3584 on cpu, 14336 (8x7B) on cuda")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument(
        "--bf16-max-tokens",
        type=int,
        default=None,
        help="cpu only: skip bf16 above this many tokens (default: no limit on CPUs with native bf16 "
        "matrix instructions, AVX512-BF16 or AMX; 128 on others, where transformers' bf16 at 2048 "
        "tokens took 40 minutes)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        require_cuda()
    tokens_list = args.tokens or ([16384, 4096] if cuda else [2048, 128])
    dtype_names = args.dtypes or (["bf16"] if cuda else ["fp32", "bf16"])
    args.hidden = args.hidden or (4096 if cuda else 1024)
    args.ffn = args.ffn or (14336 if cuda else 3584)
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    native_bf16 = cpu_has_native_mm(torch.bfloat16)
    bf16_max_tokens = args.bf16_max_tokens or (max(tokens_list) if native_bf16 else 128)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"H={args.hidden} F={args.ffn} E={args.experts} K={args.top_k}; fwd+bwd, median of {repeats} "
        f"interleaved repeats (order shuffled each round); THP_MEM_ALLOC_ENABLE="
        f"{os.environ['THP_MEM_ALLOC_ENABLE']}; load average at start {os.getloadavg()[0]:.1f}"
    )
    if not cuda:
        isa = [name for name, probe in (("AVX512", "_is_avx512_supported"), ("AMX", "_is_amx_tile_supported"),
               ("AVX512-BF16", "_is_avx512_bf16_supported")) if getattr(torch.cpu, probe, lambda: False)()]
        name = cpuinfo("model name") or platform.processor() or "unknown"
        print(f"CPU: {name} ({', '.join(isa) or 'no AVX512'}); bf16 multiplied natively by ours: "
              f"{'yes' if native_bf16 else 'no, in fp32'}")
    print()
    if cuda:
        print(
            f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), {warmup} warm-up calls each, "
            f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}; peak MB = largest "
            "allocation of one call above the resident weights and inputs\n"
        )
        print("| tokens | dtype | implementation | ms | GFLOP/s | ours / this (speed-up) | % of dense | peak MB |")
        print("|---:|---|---|---:|---:|---:|---:|---:|")
    else:
        print("| tokens | dtype | implementation | ms | GFLOP/s | ours / this (speed-up) | % of dense |")
        print("|---:|---|---|---:|---:|---:|---:|")
    for dtype_name in dtype_names:
        for tokens in tokens_list:
            if not cuda and dtype_name == "bf16" and tokens > bf16_max_tokens:
                continue
            rows = bench_case(
                tokens, DTYPES[dtype_name], args.hidden, args.ffn, args.experts, args.top_k, repeats,
                device=args.device, warmup=warmup,
            )
            ours_sec = rows[0][3]
            dense_rate = rows[-1][4]
            for _, _, name, sec, rate, peak in rows:
                if rate is None:  # it raised on this device: sec holds the error
                    cells = f"| {tokens} | {dtype_name} | {name} | {sec} | | | |"
                    print(cells + (" |" if cuda else ""), flush=True)
                    continue
                line = (
                    f"| {tokens} | {dtype_name} | {name} | {sec * 1e3:.{3 if cuda else 1}f} | {rate:.1f} | "
                    f"{sec / ours_sec:.2f}x | {100 * rate / dense_rate:.0f}% |"
                )
                print(line + (f" {peak / 2**20:.0f} |" if cuda else ""), flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")


if __name__ == "__main__":
    main()
