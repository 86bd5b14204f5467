"""4-bit NF4 storage of a frozen base (QLoRA), through bitsandbytes.

What is quantized: the attention projections (`bitsandbytes.nn.Linear4bit`, which PEFT's LoRA wraps
as it does for any 4-bit model) and the fused expert stacks (`NF4Experts`, one quant state per
expert so that an expert's [out, in] block dequantizes on its own). Embeddings, norms, router and
LM head stay in the base dtype. NF4 with double quantization: 64-value blocks, their absmax
quantized again to 8 bits in blocks of 256 (the QLoRA paper's choices, bitsandbytes' defaults).

The expert products (`NF4Experts.grouped_mm`, called by model/moe.py's `grouped_mm` when its weight
is an `NF4Experts`) dequantize one expert's block, multiply its rows and drop it, in forward and
again in backward: the whole [E, 2F, H] stack never exists in the base dtype, and nothing of
weight size is kept for backward. The base is frozen: no weight gradient.

bitsandbytes is imported on first use (its import takes ~1 s and prints a note about an optional
CPU kernel); a model without quantization never imports it.
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_TYPES = ("nf4",)
BLOCK_SIZE = 64  # values per NF4 absmax
NESTED_BLOCK_SIZE = 256  # absmax values per 8-bit nested absmax (double quantization)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_STACKS = ("gate_up_proj", "down_proj")


def _bnb():
    import bitsandbytes  # its optional-kernel warning is silenced in model/__init__.py

    return bitsandbytes


def nf4_round_trip(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w [..., out, in] as a 4-bit base holds it: each [out, in] matrix cast to `dtype`, quantized
    (its own quant state, as `NF4Experts` and `Linear4bit` hold them) and dequantized; fp32."""
    functional = _bnb().functional
    mats = w.reshape(-1, *w.shape[-2:])
    out = torch.empty(mats.shape, dtype=torch.float32, device=w.device)
    for i, m in enumerate(mats):
        packed, state = functional.quantize_4bit(m.to(dtype).contiguous(), blocksize=BLOCK_SIZE,
                                                 compress_statistics=True, quant_type="nf4",
                                                 quant_storage=torch.uint8)
        out[i] = functional.dequantize_4bit(packed, state).float()
    return out.view(w.shape)


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """w [out, in] -> (packed [out*in/2] uint8, absmax [out*in/64] uint8, nested absmax fp32,
    offset 0-d fp32, (nf4 code, nested code)): bitsandbytes' NF4 with double quantization."""
    packed, state = _bnb().functional.quantize_4bit(
        w.contiguous(), blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4",
        quant_storage=torch.uint8)
    return packed.view(-1), state.absmax, state.state2.absmax, state.offset, (state.code, state.state2.code)


@torch.no_grad()
def hold_as_4bit_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """In place: each weight QLoRA quantizes replaced by `nf4_round_trip(weight, dtype)`, so that an
    unquantized `model` holds the numbers a 4-bit base held (an adapter trained on it merges here)."""
    for name, param in model.named_parameters():
        if is_quantized_name(name):
            param.copy_(nf4_round_trip(param, dtype))
    return model


class NF4Experts(nn.Module):
    """E matrices [out, in] stored NF4 (double quantization), each with its own quant state.

    Stands where `MixtralExperts.gate_up_proj` / `down_proj` stood: `shape`, `dtype` (the dtype it
    dequantizes to) and `device` answer as the tensor's would; `stack[e]` is expert e dequantized.
    Casts (`module.bfloat16()`, DeepSpeed's engine) leave it alone; moves (`.to(device)`) move it.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        numel = out_features * in_features
        if numel % BLOCK_SIZE:
            raise ValueError(f"NF4Experts: {out_features}x{in_features} is not a multiple of {BLOCK_SIZE} values")
        blocks = numel // BLOCK_SIZE
        nested = -(-blocks // NESTED_BLOCK_SIZE)
        self.shape = torch.Size((num_experts, out_features, in_features))
        self.dtype = dtype
        self.register_buffer("packed", torch.zeros(num_experts, numel // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(num_experts, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.zeros(num_experts, nested, dtype=torch.float32, device=device))
        self.register_buffer("offset", torch.zeros(num_experts, dtype=torch.float32, device=device))
        self.register_buffer("code", torch.zeros(16, dtype=torch.float32, device=device))
        self.register_buffer("nested_code", torch.zeros(256, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, w: torch.Tensor, device: torch.device | str | None = None) -> NF4Experts:
        """Quantize a stack w [E, out, in], one expert at a time (on `device`, default w's)."""
        device = torch.device(device) if device is not None else w.device
        stack = cls(*w.shape, dtype=w.dtype, device=device)
        for e in range(w.shape[0]):
            stack.set_expert(e, w[e].to(device))
        return stack

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @torch.no_grad()
    def set_expert(self, e: int, w: torch.Tensor) -> None:
        """Quantize w [out, in] (in `self.dtype`) into expert e's slot."""
        if tuple(w.shape) != tuple(self.shape[1:]):
            raise ValueError(f"NF4Experts.set_expert: want [{self.shape[1]}, {self.shape[2]}], got {list(w.shape)}")
        packed, absmax, nested, offset, (code, nested_code) = quantize_nf4(w.to(self.device, self.dtype))
        self.packed[e].copy_(packed)
        self.absmax[e].copy_(absmax)
        self.nested_absmax[e].copy_(nested)
        self.offset[e].copy_(offset)
        self.code.copy_(code)
        self.nested_code.copy_(nested_code)

    def dequantize(self, e: int) -> torch.Tensor:
        """Expert e's [out, in] block in `self.dtype`."""
        functional = _bnb().functional
        state2 = functional.QuantState(absmax=self.nested_absmax[e], code=self.nested_code,
                                       blocksize=NESTED_BLOCK_SIZE, dtype=torch.float32)
        state = functional.QuantState(absmax=self.absmax[e], shape=self.shape[1:], code=self.code,
                                      blocksize=BLOCK_SIZE, quant_type="nf4", dtype=self.dtype,
                                      offset=self.offset[e], state2=state2)
        return functional.dequantize_4bit(self.packed[e].view(-1, 1), state)

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.dequantize(e)

    def dequantize_all(self) -> torch.Tensor:
        """[E, out, in] in `self.dtype` (tests and small models only)."""
        return torch.stack([self.dequantize(e) for e in range(self.num_experts)])

    def grouped_mm(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """model/moe.py's `grouped_mm` with this stack as w: x [N, in] sorted by expert -> [N, out].
        Reads the counts on the host (one read per call)."""
        return _NF4ExpertMM.apply(x, self, tokens_per_expert.tolist())

    def _apply(self, fn, recurse=True):
        # Device moves only: a cast (module.bfloat16(), DeepSpeed's engine) must not touch the codes
        # and absmax, which are part of the quantized format. fn on a uint8 tensor changes at most its device.
        device = fn(self.packed).device
        for name, buffer in self._buffers.items():
            self._buffers[name] = buffer.to(device)
        return self

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, dtype={self.dtype}, nf4 double-quant"


def _mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if out.device.type == "cpu":
        from model.cpu_kernels import mm_into

        mm_into(out, a, b)
    else:
        torch.mm(a, b, out=out)


class _NF4ExpertMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ dequant(w[e]).T, one expert block dequantized at a time; backward
    dequantizes again (input gradient only: the base is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stack: NF4Experts, counts: list[int]) -> torch.Tensor:
        y = x.new_empty(x.shape[0], stack.shape[1])  # [N, out]
        start = 0
        for e, n in enumerate(counts):
            if n:
                _mm(y[start : start + n], x[start : start + n], stack.dequantize(e).to(x.dtype).t())
            start += n
        if start < x.shape[0]:
            y[start:].zero_()
        ctx.stack, ctx.counts = stack, counts
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stack, counts = ctx.stack, ctx.counts
        grad = grad.contiguous()
        dx = grad.new_empty(grad.shape[0], stack.shape[2])  # [N, in]
        start = 0
        for e, n in enumerate(counts):
            if n:
                _mm(dx[start : start + n], grad[start : start + n], stack.dequantize(e).to(grad.dtype))
            start += n
        if start < dx.shape[0]:
            dx[start:].zero_()
        return dx, None, None


# ----------------------------------------------------------------------------------------------
# Attention projections: bitsandbytes' Linear4bit
# ----------------------------------------------------------------------------------------------


def nf4_linear(weight: torch.Tensor, device: torch.device | str | None = None) -> nn.Module:
    """A `bitsandbytes.nn.Linear4bit` (no bias) holding `weight` [out, in] as NF4 (double quant),
    computing in weight's dtype; quantized on `device` (default weight's)."""
    bnb = _bnb()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=weight.dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    # Its CPU inference path repacks the weight in place into another layout on AVX512-BF16 hosts
    # (the first eval forward): keep the one layout that dequantize_4bit, export and merges read.
    layer.support_avx512bf16_for_cpu = False
    layer.weight = bnb.nn.Params4bit(weight.detach().to(device or weight.device).contiguous(), requires_grad=False,
                                     blocksize=BLOCK_SIZE, compress_statistics=True, quant_type="nf4",
                                     quant_storage=torch.uint8)
    layer.weight = layer.weight.to(layer.weight.device)  # a Params4bit quantizes on its first move
    return layer


def is_nf4_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(getattr(module, "weight", None), "quant_state")


def dequantize_linear(layer: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a `Linear4bit`, dequantized to its compute dtype."""
    state = layer.weight.quant_state
    return _bnb().functional.dequantize_4bit(layer.weight.data, state).to(state.dtype)


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------


def is_quantized_name(name: str) -> bool:
    """Whether the Mixtral parameter `name` (native naming) is one QLoRA stores 4-bit."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ATTENTION_PROJECTIONS and parts[-3] == "self_attn":
        return True
    return len(parts) >= 2 and parts[-1] in EXPERT_STACKS and parts[-2] == "experts"


def quantized_parameter_names(model: nn.Module) -> list[str]:
    """Names (as `model.named_parameters()` gives them) of the weights `quantize_model` stores 4-bit."""
    return [name for name, _ in model.named_parameters() if is_quantized_name(name)]


def quantize_parameter(model: nn.Module, name: str, device: torch.device | str | None = None) -> bool:
    """Replace the weight `name` of `model` by its NF4 form (attention projection -> Linear4bit,
    expert stack -> NF4Experts); False when `name` is not one that QLoRA quantizes. The full-precision
    tensor is released when the caller drops its own references."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf == "weight" and module_name.rpartition(".")[2] in ATTENTION_PROJECTIONS and isinstance(module, nn.Linear):
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nf4_linear(module.weight, device))
        return True
    if leaf in EXPERT_STACKS and isinstance(module._parameters.get(leaf), torch.Tensor):
        stack = NF4Experts.from_weight(module._parameters.pop(leaf).detach(), device)
        setattr(module, leaf, stack)
        return True
    return False


def quantize_model(model: nn.Module, quantization: str = "nf4", device: torch.device | str | None = None) -> nn.Module:
    """Store `model`'s attention projections and expert stacks 4-bit, in place, one tensor at a time;
    freezes every base parameter (a 4-bit base is frozen: train LoRA on it)."""
    check_quantization(quantization)
    for name in quantized_parameter_names(model):
        quantize_parameter(model, name, device)
    mark_quantized(model, quantization)
    return model


def mark_quantized(model: nn.Module, quantization: str) -> None:
    """Freeze the base and tell PEFT it is a 4-bit model (so LoRA wraps Linear4bit with its 4-bit layer)."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.quantization = quantization
    model.is_loaded_in_4bit = True


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in QUANT_TYPES:
        raise ValueError(f"quantization must be one of {list(QUANT_TYPES)} or null, got {quantization!r}")


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under the unquantized names, the 4-bit ones dequantized (tests, small
    models: builds every tensor)."""
    state = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if is_nf4_linear(module):
            state[f"{prefix}weight"] = dequantize_linear(module)
            continue
        for leaf, param in module.named_parameters(recurse=False):
            state[f"{prefix}{leaf}"] = param.detach()
        for leaf, child in module.named_children():
            if isinstance(child, NF4Experts):
                state[f"{prefix}{leaf}"] = child.dequantize_all()
    return state


def base_nbytes(model: nn.Module) -> int:
    """Bytes the frozen base weights occupy as stored (4-bit data, quant states and full-precision
    tensors; trainable adapters not counted)."""
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                continue
            total += param.numel() * param.element_size()
            state = getattr(param, "quant_state", None)
            if state is not None:
                total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        if isinstance(module, NF4Experts):
            total += module.nbytes()
    return total


def _state_tensors(state) -> list[torch.Tensor]:
    tensors = [state.absmax, state.code, state.offset]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]
