"""Sparse mixture-of-experts block of Mixtral: router, fused SwiGLU experts, dropless dispatch.

Shape legend: B batch, S sequence, T = B*S tokens, H hidden, F expert ffn, E experts, K top-k,
N routed rows = T*K (token slots, sorted by expert before the expert GEMMs).

Dispatch is dropless: every (token, expert) slot is computed, no capacity factor. The slots are
sorted by expert so that each expert sees one contiguous block of rows, the expert GEMMs run
grouped, and the results are added back to their tokens weighted by the router's renormalised
top-k probabilities. Routing, sorting and counting stay on the device: a layer reads no tensor
value on the host (tests/model/test_host_syncs.py counts), so an accelerator never waits for it.

Expert products go through `grouped_mm(x, w, tokens_per_expert)`, switched by `use_grouped_mm`:
None = the device's kernels (`torch._grouped_mm` on accelerators, model/cpu_kernels.py on the
CPU), True = the accelerator path on any device, False = a per-expert loop (the test reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import cpu_kernels

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Zero rows appended to every expert's group before torch._grouped_mm, so that no group is empty:
# an empty group hangs its backward (pytorch#152668, "padding any empty offset with at least 8
# avoids the hang") and gets non-zero weight gradients on B200 (pytorch#172439).
GROUP_PAD_ROWS = 8


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` accepts these operands.

    Its kernels want float32/bf16/fp16 and row strides that are multiples of 16 bytes (checked on
    the CPU build: an in or out dim of 7 fp32 raises "strides should be multiple of 16 bytes").
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch.compile traces it with a meta kernel that takes bf16 only (torch 2.13)
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    itemsize = x.element_size()
    out_dim, in_dim = w.shape[1], w.shape[2]
    aligned = (in_dim * itemsize) % 16 == 0 and (out_dim * itemsize) % 16 == 0
    # Inside a compiled region the tensors are fresh allocations (aligned) and have no data pointer;
    # a 4-bit stack (model/quant.py) answers for the dequantized blocks it hands out.
    if aligned and not torch.compiler.is_compiling() and isinstance(w, torch.Tensor):
        aligned = x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    return aligned


def uses_grouped_kernel(x: torch.Tensor, w: torch.Tensor, use_grouped_mm: bool | None) -> bool:
    """Whether `grouped_mm(x, w, ..., use_grouped_mm=...)` runs the accelerator's `torch._grouped_mm`
    (the path whose empty-group bugs `pad_expert_groups` avoids)."""
    if use_grouped_mm is False or (use_grouped_mm is None and x.device.type == "cpu"):
        return False
    return _grouped_mm_supported(x, w)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    `torch._grouped_mm`'s backward rejects expanded (zero-stride) gradients, which is what
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


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    *,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e].T, with the rows of x sorted by expert.

    x [N, in], w [E, out, in], tokens_per_expert [E] (integer, sums to N) -> [N, out].
    `use_grouped_mm`: None = the device's kernels (CPU: model/cpu_kernels.py); True =
    `torch._grouped_mm` (ValueError where it cannot take the operands); False = the per-expert
    loop. On an accelerator, callers hand it groups that are never empty (`pad_expert_groups`).
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(
            f"grouped_mm: want x [N, in] and w [E, out, in], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if tokens_per_expert.shape != (w.shape[0],):
        raise ValueError(
            f"grouped_mm: tokens_per_expert must be [E={w.shape[0]}], got {tuple(tokens_per_expert.shape)}"
        )
    if not isinstance(w, torch.Tensor):
        # A 4-bit frozen stack (model/quant.py NF4Experts): one expert block dequantized at a time,
        # on every path (torch._grouped_mm takes no 4-bit operand).
        return w.grouped_mm(x, tokens_per_expert)
    cpu_default = use_grouped_mm is None and x.device.type == "cpu"
    if not cpu_default and torch.float32 in (x.dtype, w.dtype) and torch.is_autocast_enabled(x.device.type):
        # As autocast does for mm: torch._grouped_mm is not on its list, and in fp32 (or with fp32
        # weights of an fp32 model beside bf16 rows) the CUDA kernel falls back to a loop with a
        # host sync per call.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if use_grouped_mm is False:
        return _grouped_mm_loop(x, w, tokens_per_expert)
    supported = _grouped_mm_supported(x, w)
    if cpu_default and not (supported and cpu_kernels.prefers_grouped_kernel(x, w)):
        return cpu_kernels.expert_mm(x, w, tokens_per_expert)
    if not supported:
        if use_grouped_mm:
            raise ValueError(
                f"grouped_mm: torch._grouped_mm cannot take {x.dtype} x [{tuple(x.shape)}] with w {tuple(w.shape)} "
                "(needs float32/bf16/fp16 and dims whose byte size is a multiple of 16); use use_grouped_mm=None"
            )
        return _grouped_mm_loop(x, w, tokens_per_expert)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [E] end row of each expert
    y = torch._grouped_mm(x.contiguous(), w.transpose(-2, -1), offs=offsets)  # [N, out]
    return _ContiguousGrad.apply(y) if torch.is_grad_enabled() and y.requires_grad else y


def pad_expert_groups(
    x: torch.Tensor, tokens_per_expert: torch.Tensor, pad: int = GROUP_PAD_ROWS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append `pad` zero rows to every expert's group, on the device (no host sync).

    x [N, in] sorted by expert, tokens_per_expert [E] -> (x_padded [N + E*pad, in], padded
    tokens_per_expert [E], rows [N]: where each row of x sits in x_padded). Results of the padded
    rows are never read, so their gradients are zero and they add nothing to any weight gradient.
    """
    n = x.shape[0]
    ends = torch.cumsum(tokens_per_expert.long(), dim=0)  # [E]
    position = torch.arange(n, device=x.device)  # [N]
    expert_of_row = torch.searchsorted(ends, position, right=True)  # [N]
    rows = position + pad * expert_of_row  # [N]: expert e's rows move down by the e groups' padding above
    padded = x.new_zeros(n + pad * tokens_per_expert.shape[0], x.shape[1]).index_copy(0, rows, x)
    return padded, tokens_per_expert + pad, rows


class _SwiGLU(torch.autograd.Function):
    """gate_up [N, 2F] -> silu(gate) * up [N, F], saving only gate_up (autograd's chunk + silu + mul
    would also keep silu(gate), another [N, F]); backward recomputes silu(gate)."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)  # [N, F] each
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)  # [N, F] each
        d_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat((d_gate, grad * F.silu(gate)), dim=-1)  # [N, 2F]


def swiglu(gate_up: torch.Tensor, *, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:]: [N, 2F] -> [N, F] (Mixtral's w1 / w3 halves).

    `use_grouped_mm` as in `grouped_mm`: None on the CPU runs model/cpu_kernels.py's blocked kernel.
    """
    if use_grouped_mm is None and gate_up.device.type == "cpu":
        return cpu_kernels.swiglu(gate_up)
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
        # None: the device's kernels; True: torch._grouped_mm on any device; False: per-expert loop.
        self.use_grouped_mm: bool | None = None
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device, dtype=dtype)
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)
        )

    @property
    def qweight(self) -> torch.Tensor:
        """The 4-bit data of a quantized stack (model/quant.py): PEFT puts a quantized layer's
        adapters on the device of its `qweight`. Absent (AttributeError) when not quantized."""
        if isinstance(self.gate_up_proj, torch.Tensor):
            raise AttributeError("qweight: the experts are not quantized")
        return self.gate_up_proj.packed

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, H] (rows grouped by expert), tokens_per_expert [E] -> [N, H]."""
        if uses_grouped_kernel(x_sorted, self.gate_up_proj, self.use_grouped_mm):
            x_padded, padded_counts, rows = pad_expert_groups(x_sorted, tokens_per_expert)
            return self.expert_products(x_padded, padded_counts).index_select(0, rows)
        return self.expert_products(x_sorted, tokens_per_expert)

    def expert_products(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """The SwiGLU of every expert on its rows: [N, H] -> [N, H]."""
        use = self.use_grouped_mm
        gate_up = grouped_mm(x_sorted, self.gate_up_proj, tokens_per_expert, use_grouped_mm=use)  # [N, 2F]
        return grouped_mm(swiglu(gate_up, use_grouped_mm=use), self.down_proj, tokens_per_expert, use_grouped_mm=use)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"


def route_tokens(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax in fp32 over all experts, top-k, renormalise over the k.

    router_logits [T, E] -> (weights [T, K] float32, expert_ids [T, K] long).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids


def count_per_expert(expert_ids: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Slots per expert: expert_ids [...] long -> [E] long (each slot counted `weight` times, 1 by
    default). A scatter-add on the device: bincount would read the ids' range on the host."""
    flat = expert_ids.reshape(-1)
    ones = torch.ones_like(flat) if weight is None else weight.reshape(-1).to(flat.dtype)
    return torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the token slots by expert.

    expert_ids [T, K] -> (slot_order [N] indices into the flattened slots, tokens_per_expert [E]).
    Stable, so slots of one expert keep token order (deterministic results).
    """
    slot_order = torch.argsort(expert_ids.reshape(-1), stable=True)  # [N]
    return slot_order, count_per_expert(expert_ids, num_experts)


class MoEBlock(nn.Module):
    """Router + experts. forward(h [B, S, H], real_tokens [T_real] long) -> (out [B, S, H], router_logits [T, E]).

    Built with all E experts. Expert parallelism keeps only some of them from outside the model
    (pipeline/distributed/expert_parallel.py); the router still scores all E, and dispatch to other ranks is
    applied from outside too (hooks on `experts`, which set `expert_parallel = True`); without them
    a block holding only some experts refuses to run.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
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
        self.experts = MixtralExperts(num_experts, hidden_size, intermediate_size, device=device, dtype=dtype)

    def forward(
        self, h: torch.Tensor, real_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`real_tokens` [T_real] long: flat indices of the tokens that are not padding (None: all
        are), computed once per batch; padding is neither routed nor computed. A [T] bool mask is
        taken too, at the cost of a host sync here (the model passes indices)."""
        if self.experts.num_experts != self.num_experts and not self.expert_parallel:
            raise RuntimeError(
                f"MoEBlock holds {self.experts.num_experts} of {self.num_experts} experts: "
                "run it under the expert-parallel dispatch (pipeline/distributed/parallel.py)"
            )
        B, S, H = h.shape
        x = h.reshape(B * S, H)  # [T, H]
        router_logits = self.gate(x)  # [T, E]
        if real_tokens is not None and real_tokens.dtype == torch.bool:
            real_tokens = real_tokens.reshape(-1).nonzero().squeeze(1)
        if real_tokens is None:
            out = self._dispatch(x, router_logits)
        else:
            routed = self._dispatch(x.index_select(0, real_tokens), router_logits.index_select(0, real_tokens))
            out = torch.zeros_like(x).index_copy(0, real_tokens, routed)  # [T, H]
        return out.view(B, S, H), router_logits

    def _dispatch(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H]."""
        weights, expert_ids = route_tokens(router_logits, self.top_k)  # [T, K]
        slot_order, tokens_per_expert = sort_by_expert(expert_ids, self.num_experts)  # [N], [E]
        token_of_slot = slot_order // self.top_k  # [N] which token each sorted slot belongs to
        y = self.experts(x.index_select(0, token_of_slot), tokens_per_expert)  # [N, H]
        slot_weights = weights.reshape(-1).index_select(0, slot_order).to(y.dtype)  # [N]
        return torch.zeros_like(x).index_add_(0, token_of_slot, (y * slot_weights[:, None]).to(x.dtype))


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
