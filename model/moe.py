"""Sparse mixture-of-experts block of Mixtral: router, fused SwiGLU experts, dropless dispatch.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, F expert ffn, E experts, K top-k,
N routed rows = T*K (token slots, sorted by expert before the expert GEMMs).

Dispatch is dropless: every (token, expert) slot is computed, no capacity factor. The slots are
sorted by expert so that each expert sees one contiguous block of rows, the expert GEMMs run
grouped, and the results are added back to their tokens weighted by the router's renormalised
top-k probabilities.

Which grouped GEMM runs (`grouped_mm`, default `use_grouped_mm=None`), and why:

- CUDA: `torch._grouped_mm` (one kernel launch for all experts, no host sync).
- CPU: `_ExpertMM`, one BLAS `mm` per non-empty expert forward and backward (dX = g @ w[e],
  dW[e] = g.T @ x). bf16/fp16 operands are multiplied natively where the CPU has instructions for
  them (`cpu_has_native_mm`: AVX512-BF16 or AMX for bf16, AVX512-FP16 or AMX-FP16 for fp16) and
  otherwise upcast to fp32 one expert at a time, the result cast back once. Natively, each
  expert's rows are padded with zero rows to one of a few bucket sizes (`bucket_rows`): oneDNN
  builds a kernel for every new product shape, and the rows per expert change every step. A bf16
  LoRA model step (bench-small, 4 x ~1020 tokens, a new batch each step) took 3.3 s with the
  buckets and 4.9-5.2 s without.
  On a 2-core Xeon with AMX (torch 2.13, 2 threads, H=1024 F=3584, 8 experts top-2) bf16 fwd+bwd
  took 96-117 ms at 128 tokens and 530-590 ms at 2048 natively, against 335 and 1497 ms upcast;
  `torch._grouped_mm` took 108-122 and 555-664 ms there (same products, fixed shapes).
  On an AVX2 CPU (no native bf16; 1 thread) the bf16 mm kernels ran at 9 GFLOP/s for x @ w.T and
  0.5 GFLOP/s for g @ w (the dX product of backward), while upcasting cost ~5 ms per expert
  weight and the fp32 mm ran at 30-60 GFLOP/s: block fwd+bwd at 128 tokens 0.72 s upcast vs
  12.6 s through `torch._grouped_mm`. Upcast results are the fp32 result rounded once (closer to
  the true value than a bf16 mm, and within bf16 tolerance of it).
  fp32: `torch._grouped_mm` on CPU is itself a loop of `aten::mm` over experts (the profiler shows
  6 mm per expert per fwd+bwd and no weight copy: the transposed weight view is handed to BLAS as
  is), so it gains nothing at few rows per expert (fp32 at 128 tokens, 1 thread: 0.77 s this way
  vs 0.79 s). At 128 tokens (~32 rows per expert) ~89% of the block's time is in `aten::mm`, with
  the same 102 mm calls per two steps as transformers' grouped_mm experts: the fp32 rate there is
  MKL's rate for [32, H] x [H, 2F] products (the weight panel is packed for 32 rows only), a half
  to a third of one dense [256, H] x [H, 3F] product; no layout of the per-expert mm measured
  (x @ w.T, (w @ x.T).T, g @ w, (w.T @ g.T).T) moved it by more than the noise. bench/bench_moe.py.
- CPU, fp32, >= 256 rows per expert on average (and 16-byte aligned dims): `torch._grouped_mm`.
  On the quiet machine with 2 threads, 2048 tokens (512 rows per expert) fwd+bwd took 2.65 s
  through it vs 2.89 s through `_ExpertMM` (2 threads use its internal parallelism better); at
  128 tokens the two tie (0.55 s vs 0.54 s).
- `use_grouped_mm=False`: the plain per-expert loop through autograd (the reference in tests);
  `True`: `torch._grouped_mm` or an error.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# On CPU, fp32 operands with at least this many rows per expert (on average) go to torch._grouped_mm.
_CPU_GROUPED_MIN_ROWS_PER_EXPERT = 256
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Half-precision dW products read a row-major copy of g.T when the weight's input dim is at least this.
_COPY_G_T_MIN_IN = 256


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` accepts these operands.

    Its kernels want float32/bf16/fp16 and row strides that are multiples of 16 bytes (checked on
    the CPU build: an in or out dim of 7 fp32 raises "strides should be multiple of 16 bytes").
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    itemsize = x.element_size()
    out_dim, in_dim = w.shape[1], w.shape[2]
    return (
        (in_dim * itemsize) % 16 == 0
        and (out_dim * itemsize) % 16 == 0
        and x.data_ptr() % 16 == 0
        and w.data_ptr() % 16 == 0
    )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    `torch._grouped_mm`'s backward on CPU rejects expanded (zero-stride) gradients, which is what
    `y.sum().backward()` produces ("Invalid strides/sizes, got [0, 0]").
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """The per-expert loop behind `grouped_mm`: same math, one matmul per non-empty expert."""
    counts = tokens_per_expert.tolist()
    outs = [x_e @ w[e].transpose(0, 1) for e, x_e in enumerate(x.split(counts, dim=0)) if counts[e] > 0]
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[1])
    if sum(counts) < x.shape[0]:
        outs.append(x.new_zeros(x.shape[0] - sum(counts), w.shape[1]))
    return torch.cat(outs, dim=0)


class _ExpertMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T with one BLAS mm per expert, forward and backward.

    Half-precision operands are multiplied natively where the CPU has instructions for them and in
    fp32 one expert at a time where it has not (`cpu_has_native_mm`; measured reasons in the
    module docstring). Natively, each expert's rows are laid out in a block of `bucket_rows(n)`
    rows (zeros after the n real ones): oneDNN, which runs half-precision mm on such CPUs, builds a
    kernel for every new shape (15-45 ms for a [~1250, 3584] x [3584, 512] bf16 product against
    4-7 ms once built, AMX Xeon), and the rows per expert change every training step. With a few
    bucket sizes the kernels are built once; the zero rows add at most an eighth more rows to a
    product and nothing to a weight gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        layout = _RowBuckets(counts, x.device) if cpu_pads_rows(x.dtype) else None
        x_run = x if layout is None else layout.spread(x)  # [N or padded N, in]
        run_counts = counts if layout is None else layout.sizes
        y = x.new_empty(x_run.shape[0], w.shape[1])  # [N, out]
        start = 0
        for e, n in enumerate(run_counts):
            if n:
                _mm_into(y[start : start + n], x_run[start : start + n], w[e].t())
            start += n
        ctx.save_for_backward(x_run, w)
        ctx.counts, ctx.layout = run_counts, layout
        return y if layout is None else layout.gather(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        layout = ctx.layout
        grad = grad.contiguous() if layout is None else layout.spread(grad)  # an expanded grad is legal
        # empty, not zeros: a zero fill of dW is a full extra pass over the expert weights' size.
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # [N, in]
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None  # [E, out, in]
        # A row-major copy of g.T for half-precision dW products of weight size: native bf16 mm
        # (oneDNN) ran the whole block 10% (128 tokens) to 24% (2048) faster for it; fp32 (MKL)
        # measured the same either way. Not for rank-sized inputs (LoRA's B, in = R): there the
        # copy of g took ten times as long as the product. Only natively (layout): the fp32 upcast
        # path copies its operands anyway.
        copy_g_t = layout is not None and w.shape[2] >= _COPY_G_T_MIN_IN
        start = 0
        for e, n in enumerate(ctx.counts):
            g_e = grad[start : start + n]  # [n, out]
            if dx is not None and n:
                _mm_into(dx[start : start + n], g_e, w[e])
            if dw is not None:
                if n:
                    _mm_into(dw[e], g_e.t().contiguous() if copy_g_t else g_e.t(), x[start : start + n])
                else:
                    dw[e].zero_()
            start += n
        if dx is not None and layout is not None:
            dx = layout.gather(dx)
        return dx, dw, None


def bucket_rows(n: int) -> int:
    """n rounded up to a multiple of 16 up to 128, above that to one of 8 sizes per octave (1024,
    1152, 1280, ..., 1920, 2048, ...): at most 12.5% more rows, 64 sizes up to 16k."""
    if n <= 128:
        return -(-n // 16) * 16
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def cpu_pads_rows(dtype: torch.dtype) -> bool:
    """Whether CPU products in `dtype` with a varying row count should pad it to `bucket_rows`:
    native half precision, where oneDNN builds a kernel per shape (see `_ExpertMM`)."""
    return dtype != torch.float32 and cpu_has_native_mm(dtype)


class _RowBuckets:
    """Where each expert's rows go in a layout of bucket-sized blocks (`bucket_rows`)."""

    def __init__(self, counts: list[int], device: torch.device):
        self.sizes = [bucket_rows(n) if n else 0 for n in counts]
        starts = [0]
        for size in self.sizes[:-1]:
            starts.append(starts[-1] + size)
        self.rows = sum(self.sizes)
        self.index = torch.cat(
            [torch.arange(start, start + n, device=device) for start, n in zip(starts, counts, strict=True)]
        )  # [N] position of each real row in the padded layout

    def spread(self, t: torch.Tensor) -> torch.Tensor:
        """[N, d] -> [padded N, d], zeros in the padding rows."""
        return t.new_zeros(self.rows, t.shape[1]).index_copy_(0, self.index, t)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[padded N, d] -> [N, d]."""
        return t.index_select(0, self.index)


def cpuinfo(key: str) -> str:
    """The value of the first `key` line of Linux's /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_has_native_mm(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for `dtype` (so torch's mm in it is fast).

    bf16: AVX512-BF16 or AMX tiles; fp16: AMX-FP16 or AVX512-FP16. Without them a bf16 mm runs
    at a few GFLOP/s (see the module docstring) and `_ExpertMM` computes in fp32 instead.
    """
    if dtype == torch.float32:
        return True

    def has(name: str) -> bool:
        probe = getattr(torch.cpu, name, None)  # private probes of torch.cpu; absent ones mean no
        return bool(probe is not None and probe())

    if dtype == torch.bfloat16:
        return has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported")
    if dtype == torch.float16:
        return has("_is_amx_fp16_supported") or "avx512_fp16" in cpuinfo("flags").split()
    return False


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b; half precision is multiplied in fp32 on CPUs without instructions for it."""
    if out.dtype != torch.float32 and not cpu_has_native_mm(out.dtype):
        out.copy_(a.float() @ b.float())
    else:
        torch.mm(a, b, out=out)


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    *,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e].T, with the rows of x sorted by expert.

    x [N, in], w [E, out, in], tokens_per_expert [E] (integer, sums to N) -> [N, out]. `use_grouped_mm`: None picks the fastest path for the device (module
    docstring); False forces the per-expert autograd loop (the reference); True requires
    `torch._grouped_mm`.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(
            f"grouped_mm: want x [N, in] and w [E, out, in], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if tokens_per_expert.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_mm: tokens_per_expert must be [E={w.shape[0]}], got {tuple(tokens_per_expert.shape)}"
        )
    supported = _grouped_mm_supported(x, w)
    if use_grouped_mm is None and x.device.type == "cpu":
        # Measured on 2 cores (bench_moe, quiet machine): fp32 at 512 rows per expert the grouped
        # kernel is 8% faster than our per-expert BLAS; at 32 rows they tie. bf16: ours is ~17x
        # faster on an AVX2 CPU (it computes in fp32 there); with AMX both run the same native
        # products (within 5-15% of each other on fixed shapes, either way), and only ours keeps
        # each expert's rows in buckets, which steps with new routings need (_ExpertMM).
        many_rows = x.shape[0] >= _CPU_GROUPED_MIN_ROWS_PER_EXPERT * w.shape[0]
        if not (supported and x.dtype == torch.float32 and many_rows):
            return _ExpertMM.apply(x, w, tokens_per_expert.tolist())
    if use_grouped_mm and not supported:
        raise ValueError(
            f"grouped_mm: torch._grouped_mm cannot take {x.dtype} x [{tuple(x.shape)}] with w {tuple(w.shape)} "
            "(needs float32/bf16/fp16 and dims whose byte size is a multiple of 16); use use_grouped_mm=None"
        )
    if use_grouped_mm is False or not supported:
        return _grouped_mm_loop(x, w, tokens_per_expert)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [E] end row of each expert
    y = torch._grouped_mm(x.contiguous(), w.transpose(-2, -1), offs=offsets)  # [N, out]
    return _ContiguousGrad.apply(y) if torch.is_grad_enabled() and y.requires_grad else y


# Rows per block of the CPU SwiGLU: about this many bytes of gate_up at a time stay in cache.
_SWIGLU_BLOCK_BYTES = 4 << 20


def _swiglu_row_blocks(gate_up: torch.Tensor):
    """Row slices of gate_up [N, 2F]: one slice on accelerators, cache-sized blocks on CPU."""
    n = gate_up.shape[0]
    if gate_up.device.type != "cpu":
        yield slice(0, n)
        return
    rows = max(1, _SWIGLU_BLOCK_BYTES // max(1, gate_up.shape[1] * gate_up.element_size()))
    for start in range(0, n, rows):
        yield slice(start, start + rows)


class _SwiGLU(torch.autograd.Function):
    """gate_up [N, 2F] -> silu(gate) * up [N, F], saving only gate_up; backward writes one [N, 2F] grad.

    Autograd's chunk + silu + mul keeps an extra [N, F] tensor (silu(gate)) and assembles the
    [N, 2F] gradient with a copy; this keeps the input only, recomputes silu(gate) and writes both
    halves in place. On CPU it runs over cache-sized blocks of rows, so each block's temporaries
    never go to memory: measured at N = 8192, F = 1792 on 2 threads, forward 60 -> 37 ms and
    backward 129 -> 79 ms, the same numbers bit for bit.
    """

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)  # [N, F]
        for rows in _swiglu_row_blocks(gate_up):
            gate, up = gate_up[rows].chunk(2, dim=-1)  # [n, F] each
            torch.mul(F.silu(gate), up, out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        d_gate_up = torch.empty_like(gate_up)  # [N, 2F]
        for rows in _swiglu_row_blocks(gate_up):
            gate, up = gate_up[rows].chunk(2, dim=-1)  # [n, F] each
            d_gate, d_up = d_gate_up[rows].chunk(2, dim=-1)
            torch.ops.aten.silu_backward.grad_input(grad[rows] * up, gate, grad_input=d_gate)
            torch.mul(grad[rows], F.silu(gate), out=d_up)
        return d_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:]: [N, 2F] -> [N, F] (Mixtral's w1 / w3 halves)."""
    return _SwiGLU.apply(gate_up)


class MixtralExperts(nn.Module):
    """E SwiGLU experts stored fused: gate_up_proj [E, 2F, H] (rows [:F] = w1, [F:] = w3), down_proj [E, H, F] (w2)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, *, device=None, dtype=None
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        # None: torch._grouped_mm when possible; False: per-expert loop (tests compare the two).
        self.use_grouped_mm: bool | None = None
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device, dtype=dtype)
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        )

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, H] (rows grouped by expert), tokens_per_expert [E] -> [N, H]."""
        gate_up = grouped_mm(
            x_sorted, self.gate_up_proj, tokens_per_expert, use_grouped_mm=self.use_grouped_mm
        )  # [N, 2F]
        return grouped_mm(
            swiglu(gate_up), self.down_proj, tokens_per_expert, use_grouped_mm=self.use_grouped_mm
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


def route_tokens(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax in fp32 over all experts, top-k, renormalise over the k.

    router_logits [T, E] -> (weights [T, K] float32, expert_ids [T, K] long).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the token slots by expert.

    expert_ids [T, K] -> (slot_order [N] indices into the flattened slots, tokens_per_expert [E]).
    Stable, so slots of one expert keep token order (deterministic results).
    """
    flat = expert_ids.reshape(-1)  # [N]
    slot_order = torch.argsort(flat, stable=True)  # [N]
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)  # [E]
    return slot_order, tokens_per_expert


class MoEBlock(nn.Module):
    """Router + experts. forward(h [B, S, H], token_mask [T] bool) -> (out [B, S, H], router_logits [T, E]).

    `num_local_experts` < `num_experts` builds a block that holds only some experts (expert
    parallelism); the router still scores all E, and dispatch to other ranks is applied from
    outside the model (hooks on `experts`, which set `expert_parallel = True`); without them such a
    block refuses to run.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        num_local_experts: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEBlock: top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_parallel = False
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = MixtralExperts(
            num_experts if num_local_experts is None else num_local_experts,
            hidden_size,
            intermediate_size,
            device=device,
            dtype=dtype,
        )

    def forward(
        self, h: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.experts.num_experts != self.num_experts and not self.expert_parallel:
            raise RuntimeError(
                f"MoEBlock holds {self.experts.num_experts} of {self.num_experts} experts: "
                "run it under the expert-parallel dispatch (pipeline/parallel.py)"
            )
        B, S, H = h.shape
        x = h.reshape(B * S, H)  # [T, H]
        router_logits = self.gate(x)  # [T, E]
        if token_mask is None:
            out = self._dispatch(x, router_logits)
        else:
            # Padding is neither routed nor computed: only real tokens go through the experts.
            real = token_mask.reshape(-1).nonzero().squeeze(1)  # [T_real]
            out = torch.zeros_like(x).index_copy(0, real, self._dispatch(x[real], router_logits[real]))
        return out.view(B, S, H), router_logits

    def _dispatch(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H]."""
        weights, expert_ids = route_tokens(router_logits, self.top_k)  # [T, K]
        slot_order, tokens_per_expert = sort_by_expert(expert_ids, self.num_experts)  # [N], [E]
        token_of_slot = slot_order // self.top_k  # [N] which token each sorted slot belongs to
        y = self.experts(x[token_of_slot], tokens_per_expert)  # [N, H]
        slot_weights = weights.reshape(-1)[slot_order].to(y.dtype)  # [N]
        return torch.zeros_like(x).index_add_(0, token_of_slot, y * slot_weights[:, None])


def moe_reference(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Plain per-expert Mixtral MoE, for tests: x [T, H] -> [T, H]."""
    probs = torch.softmax((x @ gate_weight.T).float(), dim=-1)  # [T, E]
    top_w, top_e = torch.topk(probs, top_k, dim=-1)  # [T, K]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        tok, slot = torch.where(top_e == e)
        if tok.numel() == 0:
            continue
        w1, w3 = gate_up_proj[e].chunk(2, dim=0)  # [F, H] each
        y = (F.silu(x[tok] @ w1.T) * (x[tok] @ w3.T)) @ down_proj[e].T  # [n_e, H]
        out = out.index_add(0, tok, y * top_w[tok, slot, None].to(y.dtype))
    return out
