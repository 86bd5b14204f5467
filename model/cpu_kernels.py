"""CPU kernels behind model/moe.py's `grouped_mm` and `swiglu` and model/lora.py's expert LoRA.

The math is in moe.py and lora.py; this module only decides how a CPU runs it fast, and the model
files call it where the device is the CPU and the caller asked for the default path. Why each
choice, with the measurements: docs/design.md, "CPU kernels live in one module".

- `expert_mm`: one BLAS mm per non-empty expert, forward and backward (the CPU's grouped GEMM).
  Half precision is multiplied natively where the CPU has instructions for it
  (`cpu_has_native_mm`), otherwise in fp32 one expert at a time, rounded once. Natively, each
  expert's rows are padded to one of a few bucket sizes (`bucket_rows`), because oneDNN builds a
  kernel per product shape and routing changes the rows per expert every step.
- `prefers_grouped_kernel`: where `torch._grouped_mm` beats `expert_mm` on a CPU (fp32, many
  rows per expert).
- `swiglu`: SwiGLU over cache-sized blocks of rows.
- `expert_lora_mm`: base and LoRA expert products in one pass over each expert's rows (fp32).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

# fp32 operands with at least this many rows per expert (on average) go to torch._grouped_mm.
GROUPED_KERNEL_MIN_ROWS_PER_EXPERT = 256
# Half-precision dW products read a row-major copy of g.T when the weight's input dim is at least this.
_COPY_G_T_MIN_IN = 256
# Rows per block of the SwiGLU: about this many bytes of gate_up at a time stay in cache.
_SWIGLU_BLOCK_BYTES = 4 << 20


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

    bf16: AVX512-BF16 or AMX tiles; fp16: AMX-FP16 or AVX512-FP16. Without them a bf16 mm runs at
    a few GFLOP/s and `expert_mm` computes in fp32 instead.
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


def bucket_rows(n: int) -> int:
    """n rounded up to a multiple of 16 up to 128, above that to one of 8 sizes per octave (1024,
    1152, 1280, ..., 1920, 2048, ...): at most 12.5% more rows, 64 sizes up to 16k."""
    if n <= 128:
        return -(-n // 16) * 16
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def cpu_pads_rows(dtype: torch.dtype) -> bool:
    """Whether products in `dtype` with a varying row count pad it to `bucket_rows`: native half
    precision, where oneDNN builds a kernel per shape."""
    return dtype != torch.float32 and cpu_has_native_mm(dtype)


def prefers_grouped_kernel(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` is the faster CPU kernel for x [N, in] and w [E, out, in]: fp32
    with many rows per expert (its internal threading wins there; ties at few rows)."""
    return x.dtype == torch.float32 and x.shape[0] >= GROUPED_KERNEL_MIN_ROWS_PER_EXPERT * w.shape[0]


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


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b; half precision is multiplied in fp32 on CPUs without instructions for it."""
    if out.dtype != torch.float32 and not cpu_has_native_mm(out.dtype):
        out.copy_(a.float() @ b.float())
    else:
        torch.mm(a, b, out=out)


class _ExpertMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e].T with one BLAS mm per expert, forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        layout = _RowBuckets(counts, x.device) if cpu_pads_rows(x.dtype) else None
        x_run = x if layout is None else layout.spread(x)  # [N or padded N, in]
        run_counts = counts if layout is None else layout.sizes
        y = x.new_empty(x_run.shape[0], w.shape[1])  # [N, out]
        start = 0
        for e, n in enumerate(run_counts):
            if n:
                mm_into(y[start : start + n], x_run[start : start + n], w[e].t())
            start += n
        # x only where dW needs it (a trained w), and as given: the padded copy is made again in
        # backward, so it is not kept alive between the passes (LoRA's A and the frozen base
        # product read the same x and would each keep their own).
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        ctx.counts, ctx.layout = run_counts, layout
        return y if layout is None else layout.gather(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        layout = ctx.layout
        grad = grad.contiguous() if layout is None else layout.spread(grad)  # an expanded grad is legal
        if x is not None and layout is not None:
            x = layout.spread(x)  # [padded N, in]
        # empty, not zeros: a zero fill of dW is a full extra pass over the expert weights' size.
        dx = grad.new_empty(grad.shape[0], w.shape[2]) if ctx.needs_input_grad[0] else None  # [N, in]
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None  # [E, out, in]
        # oneDNN's native half-precision dW runs faster from a row-major g.T of weight size; for
        # rank-sized inputs (LoRA's B) the copy costs more than the product.
        copy_g_t = layout is not None and w.shape[2] >= _COPY_G_T_MIN_IN
        start = 0
        for e, n in enumerate(ctx.counts):
            g_e = grad[start : start + n]  # [n, out]
            if dx is not None and n:
                mm_into(dx[start : start + n], g_e, w[e])
            if dw is not None:
                if n:
                    mm_into(dw[e], g_e.t().contiguous() if copy_g_t else g_e.t(), x[start : start + n])
                else:
                    dw[e].zero_()
            start += n
        if dx is not None and layout is not None:
            dx = layout.gather(dx)
        return dx, dw, None


def expert_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` on the CPU with one BLAS mm per expert: x [N, in], w [E, out, in] -> [N, out]."""
    return _ExpertMM.apply(x, w, tokens_per_expert.tolist())


def _row_blocks(gate_up: torch.Tensor):
    """Row slices of gate_up [N, 2F] of about _SWIGLU_BLOCK_BYTES each."""
    n = gate_up.shape[0]
    rows = max(1, _SWIGLU_BLOCK_BYTES // max(1, gate_up.shape[1] * gate_up.element_size()))
    for start in range(0, n, rows):
        yield slice(start, start + rows)


class _BlockedSwiGLU(torch.autograd.Function):
    """moe.swiglu over cache-sized blocks of rows, so each block's temporaries stay in cache; saves
    gate_up only and writes the [N, 2F] gradient in place."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)  # [N, F]
        for rows in _row_blocks(gate_up):
            gate, up = gate_up[rows].chunk(2, dim=-1)  # [n, F] each
            torch.mul(F.silu(gate), up, out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        d_gate_up = torch.empty_like(gate_up)  # [N, 2F]
        for rows in _row_blocks(gate_up):
            gate, up = gate_up[rows].chunk(2, dim=-1)  # [n, F] each
            d_gate, d_up = d_gate_up[rows].chunk(2, dim=-1)
            torch.ops.aten.silu_backward.grad_input(grad[rows] * up, gate, grad_input=d_gate)
            torch.mul(grad[rows], F.silu(gate), out=d_up)
        return d_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:] on the CPU: [N, 2F] -> [N, F]."""
    return _BlockedSwiGLU.apply(gate_up)


def expert_lora_applies(x: torch.Tensor, tensors: tuple[torch.Tensor, ...], use_grouped_mm: bool | None) -> bool:
    """Whether `expert_lora_mm` runs the expert LoRA: the CPU default path, everything in fp32."""
    return use_grouped_mm is None and x.device.type == "cpu" and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tensors)  # not a 4-bit base (model/quant.py)


class _ExpertLoraMM(torch.autograd.Function):
    """y[rows of e] = x_e @ w[e].T + scaling * (xl_e @ a[e].T) @ b[e].T, one BLAS call per product.

    x [N, in] are the expert-sorted rows, xl [N, in] the LoRA input (x after dropout, often x
    itself), w [E, out, in], a [E, blocks*R, in], b [E, out, R]. With blocks = 2 (gate_up), b is
    block-diagonal: rows [:out/2] of b[e] read low-rank columns [:R], rows [out/2:] columns [R:].
    The low-rank products accumulate (addmm_) into the base product's output rows in place and only
    the [N, blocks*R] low-rank activations are scaled and saved: no [N, out] LoRA temporaries.
    """

    @staticmethod
    def forward(ctx, x, xl, w, a, b, counts: list[int], scaling: float, blocks: int):
        rank = a.shape[1] // blocks
        out_block = w.shape[1] // blocks
        y = x.new_empty(x.shape[0], w.shape[1])  # [N, out]
        low = x.new_empty(x.shape[0], a.shape[1])  # [N, blocks*R], already scaled
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(x[rows], w[e].t(), out=y[rows])
                torch.mm(xl[rows], a[e].t(), out=low[rows])
                low[rows].mul_(scaling)
                for j in range(blocks):
                    cols, ranks = slice(j * out_block, (j + 1) * out_block), slice(j * rank, (j + 1) * rank)
                    y[rows, cols].addmm_(low[rows, ranks], b[e, cols].t())
            start += n
        ctx.lora_reads_x = xl is x  # no dropout: one input gradient, accumulated in place
        ctx.save_for_backward(x, None if ctx.lora_reads_x else xl, w, a, b, low)
        ctx.counts, ctx.scaling, ctx.blocks = counts, scaling, blocks
        return y

    @staticmethod
    def backward(ctx, grad):
        x, xl, w, a, b, low = ctx.saved_tensors
        if ctx.lora_reads_x:
            xl = x
        scaling, blocks = ctx.scaling, ctx.blocks
        rank, out_block = a.shape[1] // blocks, w.shape[1] // blocks
        grad = grad.contiguous()  # an expanded (zero-stride) grad, e.g. from y.sum(), is legal here
        need_x, need_xl, need_w, need_a, need_b = ctx.needs_input_grad[:5]
        dx = torch.empty_like(x) if need_x else None  # [N, in]
        dxl = torch.empty_like(xl) if need_xl and not ctx.lora_reads_x else None  # [N, in]
        # zeros: an expert without rows gets no gradient, and only those stay untouched below.
        dw = torch.zeros_like(w) if need_w else None  # [E, out, in]
        da = torch.zeros_like(a)  # [E, blocks*R, in]
        db = torch.zeros_like(b) if need_b else None  # [E, out, R]
        dlow = low.new_empty(low.shape)  # [N, blocks*R], gradient w.r.t. the unscaled x A^T
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            g_e = grad[rows]  # [n, out]
            for j in range(blocks):
                cols, ranks = slice(j * out_block, (j + 1) * out_block), slice(j * rank, (j + 1) * rank)
                torch.mm(g_e[:, cols], b[e, cols], out=dlow[rows, ranks])
                if db is not None:
                    torch.mm(g_e[:, cols].t(), low[rows, ranks], out=db[e, cols])
            dlow[rows].mul_(scaling)
            if need_a:
                torch.mm(dlow[rows].t(), xl[rows], out=da[e])
            if dx is not None:
                torch.mm(g_e, w[e], out=dx[rows])
                if ctx.lora_reads_x:
                    dx[rows].addmm_(dlow[rows], a[e])
            if dxl is not None:
                torch.mm(dlow[rows], a[e], out=dxl[rows])
            if dw is not None:
                torch.mm(g_e.t(), x[rows], out=dw[e])
            start += n
        return dx, dxl, dw, da if need_a else None, db, None, None, None


def expert_lora_mm(
    x: torch.Tensor,
    x_lora: torch.Tensor,
    w: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    scaling: float,
    blocks: int,
) -> torch.Tensor:
    """x @ w[e].T + scaling * x_lora @ A[e].T @ B[e].T per expert's rows (B block-diagonal when
    blocks = 2): [N, in] -> [N, out]."""
    return _ExpertLoraMM.apply(x, x_lora, w, lora_a, lora_b, tokens_per_expert.tolist(), scaling, blocks)


def keep_out_of_compiled_graphs() -> None:
    """Make torch.compile run this module's kernels as they are, between graphs
    (`Mixtral.compile_blocks` calls it): they loop over the experts in Python on counts read from
    the tensors, so traced they would split into many graphs and compile again for every routing.
    Done on request, not at import: `torch.compiler.disable` imports torch._dynamo (~1 s)."""
    module = globals()
    for name in ("expert_mm", "swiglu", "expert_lora_mm"):
        if not hasattr(module[name], "__wrapped__"):
            module[name] = torch.compiler.disable(module[name])
