"""LoRA for the native Mixtral, living inside PEFT.

Attention projections are plain `nn.Linear`, so PEFT's own LoRA layer handles them. The experts are
one module holding fused 3-D weights (`gate_up_proj` [E, 2F, H], `down_proj` [E, H, F]), which PEFT
cannot target; `ExpertLoraLayer` is the custom LoRA layer PEFT swaps in for `MixtralExperts`. It
keeps per-expert A/B as stacked tensors and applies them with `grouped_mm` to the routed rows only,
so no full-size delta weight is ever built in the forward pass. The adapter weights stay fp32 over
a bf16 base (PEFT's autocast_adapter_dtype); under autocast the LoRA products run in autocast's
dtype (the small adapter weights are cast, not the [N, 2F] activations, as PEFT's LoRA layers on
the attention do), outside it in fp32. On the CPU's default path the base and LoRA products of an
expert run in one pass (model/cpu_kernels.py `expert_lora_mm`).

Registration: importing this module makes every `LoraConfig` (also the ones PEFT builds itself
from an adapter_config.json) map `MixtralExperts` to `ExpertLoraLayer`. So
`PeftModel.from_pretrained(Mixtral(cfg), adapter_dir)` works as soon as `model.lora` has been
imported anywhere in the process (`import model.lora`, or `from model.lora import apply_lora`).

w1 and w3 get separate low-rank deltas. That is what "LoRA on w1, w2, w3" means for per-expert
`nn.Linear` experts (the HF/PEFT convention for Mixtral), keeps the same capacity and parameter count,
and lets an adapter be converted to per-expert w1/w3 LoRA weights one to one. In the fused layout the
gate_up delta is `B_gu @ A_gu` with B block-diagonal:

    lora_gate_up_A [E, 2R, H]   rows [:R] = A of w1, rows [R:] = A of w3
    lora_gate_up_B [E, 2F, R]   rows [:F] = B of w1, rows [F:] = B of w3
    lora_down_A    [E, R, F]    A of w2
    lora_down_B    [E, H, R]    B of w2

so delta gate_up_proj[e] = scaling * cat(B_w1 @ A_w1, B_w3 @ A_w3) and delta down_proj[e] =
scaling * B_w2 @ A_w2, which is exactly what `merge` adds.

The router (`gate`, [E, H]) is not a LoRA target: its rank is at most E (8), so a LoRA of the usual
rank is no low-rank reparametrisation at all, just more parameters than the router has. To train it,
pass `train_router=True` to `apply_lora`: PEFT then trains a full copy of it (`modules_to_save`),
saved with the adapter and bypassed by `disable_adapter()` like the LoRA weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from model import cpu_kernels
from model.moe import MixtralExperts, grouped_mm, pad_expert_groups, swiglu, uses_grouped_kernel

EXPERTS_TARGET = "experts"
ROUTER_NAME = "gate"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", EXPERTS_TARGET)


class ExpertLoraLayer(nn.Module, LoraLayer):
    """PEFT LoRA layer for `MixtralExperts`: grouped per-expert A/B on gate_up (w1, w3) and down (w2)."""

    adapter_layer_names = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.lora_gate_up_A = nn.ParameterDict()
        self.lora_gate_up_B = nn.ParameterDict()
        self.lora_down_A = nn.ParameterDict()
        self.lora_down_B = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def __getattr__(self, name: str):
        # MoEBlock and the parallel code read the experts' attributes (num_experts, hidden_size, ...)
        # through whatever module sits at `.experts`; answer for the wrapped MixtralExperts.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def use_grouped_mm(self) -> bool | None:
        return self.get_base_layer().use_grouped_mm

    @use_grouped_mm.setter
    def use_grouped_mm(self, value: bool | None) -> None:
        # One switch for both the base GEMMs and the LoRA GEMMs, wherever it is set.
        self.get_base_layer().use_grouped_mm = value

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.hidden_size, module.hidden_size

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        return base_layer.gate_up_proj.device, base_layer.gate_up_proj.dtype

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={r}")
        unsupported = {
            "use_dora": config.use_dora,
            "lora_bias": config.lora_bias,
            "fan_in_fan_out": config.fan_in_fan_out,
        }
        enabled = [name for name, value in unsupported.items() if value]
        if enabled:
            raise ValueError(
                f"LoRA on the experts does not support {', '.join(enabled)}; set it to False in the LoRA config"
            )
        init = config.init_lora_weights
        if not (isinstance(init, bool) or init == "gaussian"):
            raise ValueError(
                f"LoRA on the experts supports init_lora_weights True, False or 'gaussian', got {init!r}"
            )

        base = self.get_base_layer()
        # From the module, not its weights: a ZeRO-3 partitioned weight's own shape is [0].
        num_experts, hidden, ffn = base.num_experts, base.hidden_size, base.intermediate_size
        two_ffn = 2 * ffn
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout.update(nn.ModuleDict({adapter_name: dropout}))

        device = base.gate_up_proj.device
        shapes = {
            "lora_gate_up_A": (num_experts, 2 * r, hidden),
            "lora_gate_up_B": (num_experts, two_ffn, r),
            "lora_down_A": (num_experts, r, ffn),
            "lora_down_B": (num_experts, hidden, r),
        }
        for name, shape in shapes.items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape, device=device))
        self.reset_lora_parameters(adapter_name, init)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str) -> None:
        if adapter_name not in self.lora_gate_up_A:
            return
        with torch.no_grad():
            for a_name, b_name in (("lora_gate_up_A", "lora_gate_up_B"), ("lora_down_A", "lora_down_B")):
                lora_a, lora_b = getattr(self, a_name)[adapter_name], getattr(self, b_name)[adapter_name]
                if init_lora_weights == "gaussian":
                    lora_a.normal_(std=1.0 / self.r[adapter_name])
                else:
                    _kaiming_uniform_per_expert(lora_a)
                if init_lora_weights is False:
                    # PEFT's meaning (its A and B keep nn.Linear's init): B random too, so the
                    # adapter changes the model from the start (tests, debugging).
                    _kaiming_uniform_per_expert(lora_b)
                else:
                    lora_b.zero_()

    def _grouped_mm(self, x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # Follow the base module's kernel choice, so that forcing its per-expert loop forces ours too.
        return grouped_mm(x, w, tokens_per_expert, use_grouped_mm=self.use_grouped_mm)

    def _lora_dtype(self, adapter: str, x: torch.Tensor) -> torch.dtype:
        """The dtype the LoRA products run in: autocast's where it is on (as PEFT's own LoRA layers
        on the attention projections do: the fp32 adapter weights are cast, not the activations),
        else the adapter weights' (activations cast to them, the fp32 master weights used as is)."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.lora_gate_up_A[adapter].dtype

    def _lora_gate_up(self, adapter: str, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """scaling * [x A_w1^T B_w1^T | x A_w3^T B_w3^T] on expert-sorted rows: [N, H] -> [N, 2F].

        As in the fused path, the scaling multiplies the [N, 2R] low-rank activations, not the
        [N, 2F] result, and one grouped product with the block-diagonal [E, 2F, 2R] B writes the
        result whole (two products and a concatenation would cost two more passes over [N, 2F];
        the zero blocks add 2*N*2F*R flops, a few percent of the base product's N*2F*H).
        """
        dtype = self._lora_dtype(adapter, x)
        lora_a, lora_b = self.lora_gate_up_A[adapter].to(dtype), self.lora_gate_up_B[adapter].to(dtype)
        r, ffn = self.r[adapter], lora_b.shape[1] // 2
        low = self._grouped_mm(self.lora_dropout[adapter](x.to(dtype)), lora_a, tokens_per_expert)
        zeros = lora_b.new_zeros(lora_b.shape[0], ffn, r)
        b_diag = torch.cat(
            (torch.cat((lora_b[:, :ffn], zeros), dim=2), torch.cat((zeros, lora_b[:, ffn:]), dim=2)), dim=1
        )  # [E, 2F, 2R]
        return self._grouped_mm(low * self.scaling[adapter], b_diag, tokens_per_expert)  # [N, 2F]

    def _lora_down(self, adapter: str, h: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """scaling * h A_w2^T B_w2^T on expert-sorted rows: [N, F] -> [N, H] (scaled at rank R)."""
        dtype = self._lora_dtype(adapter, h)
        lora_a, lora_b = self.lora_down_A[adapter].to(dtype), self.lora_down_B[adapter].to(dtype)
        low = self._grouped_mm(self.lora_dropout[adapter](h.to(dtype)), lora_a, tokens_per_expert)  # [N, R]
        return self._grouped_mm(low * self.scaling[adapter], lora_b, tokens_per_expert)  # [N, H]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, tokens_per_expert)
        active = [a for a in self.active_adapters if a in self.lora_gate_up_A]
        if self.merged or not active:
            return self.base_layer(x, tokens_per_expert)
        base = self.get_base_layer()
        if len(active) == 1 and cpu_kernels.expert_lora_applies(x, self._weights(active[0]), self.use_grouped_mm):
            return self._cpu_forward(active[0], x, tokens_per_expert)
        if uses_grouped_kernel(x, base.gate_up_proj, self.use_grouped_mm):
            x_padded, padded_counts, rows = pad_expert_groups(x, tokens_per_expert)
            return self._products(active, x_padded, padded_counts).index_select(0, rows)
        return self._products(active, x, tokens_per_expert)

    def _products(self, active: list[str], x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Base SwiGLU experts plus every active adapter's deltas on expert-sorted rows: [N, H] -> [N, H]."""
        base = self.get_base_layer()
        gate_up = self._grouped_mm(x, base.gate_up_proj, tokens_per_expert)  # [N, 2F]
        for adapter in active:
            gate_up = gate_up + self._lora_gate_up(adapter, x, tokens_per_expert).to(gate_up.dtype)
        h = swiglu(gate_up, use_grouped_mm=self.use_grouped_mm)  # [N, F]
        out = self._grouped_mm(h, base.down_proj, tokens_per_expert)  # [N, H]
        for adapter in active:
            out = out + self._lora_down(adapter, h, tokens_per_expert).to(out.dtype)
        return out

    def _weights(self, adapter: str) -> tuple[torch.Tensor, ...]:
        base = self.get_base_layer()
        return (
            base.gate_up_proj,
            base.down_proj,
            self.lora_gate_up_A[adapter],
            self.lora_gate_up_B[adapter],
            self.lora_down_A[adapter],
            self.lora_down_B[adapter],
        )

    def _cpu_forward(self, adapter: str, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """`_products` for one adapter through the CPU's one-pass kernel (same math: tests compare
        both with a dense reference)."""
        gate_up_w, down_w, gate_up_a, gate_up_b, down_a, down_b = self._weights(adapter)
        scaling, dropout = self.scaling[adapter], self.lora_dropout[adapter]
        gate_up = cpu_kernels.expert_lora_mm(x, dropout(x), gate_up_w, gate_up_a, gate_up_b, tokens_per_expert, scaling, 2)
        h = swiglu(gate_up)  # [N, F]
        return cpu_kernels.expert_lora_mm(h, dropout(h), down_w, down_a, down_b, tokens_per_expert, scaling, 1)  # [N, H]

    def get_delta_weight(self, adapter: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (delta gate_up_proj[expert] [2F, H], delta down_proj[expert] [H, F]) of one adapter."""
        base, device = self.get_base_layer(), self.lora_gate_up_A[adapter].device
        deltas = [torch.zeros(w.shape[1:], device=device) for w in (base.gate_up_proj, base.down_proj)]
        self._add_expert_deltas(adapter, deltas, self.scaling[adapter], expert)
        return deltas[0], deltas[1]

    def _add_expert_deltas(self, adapter: str, weights: list[torch.Tensor], scale: float, expert: int) -> None:
        """In place on fp32 (gate_up_proj[expert], down_proj[expert]): + scale * B @ A (`add_lora_delta`)."""
        for weight, which in zip(weights, ("gate_up", "down"), strict=True):
            a = getattr(self, f"lora_{which}_A")[adapter][expert : expert + 1].float().to(weight.device)  # [1, r, in]
            b = getattr(self, f"lora_{which}_B")[adapter][expert : expert + 1].float().to(weight.device)  # [1, out, r]
            add_lora_delta(weight[None], {f"{which}_A": a, f"{which}_B": b}, scale)

    def _updated_expert_weights(self, adapter: str, sign: float, expert: int):
        """(parameter, its new value for `expert`) for gate_up_proj and down_proj, summed in fp32 by
        `add_lora_delta` (export's and eval's merge: the same inputs give the same bits)."""
        base = self.get_base_layer()
        weights = (base.gate_up_proj, base.down_proj)
        merged = [weight[expert].to(torch.float32, copy=True) for weight in weights]  # [2F, H], [H, F]
        self._add_expert_deltas(adapter, merged, sign * self.scaling[adapter], expert)
        for weight, value in zip(weights, merged, strict=True):
            yield weight, value.to(weight.dtype)

    def _add_delta(self, adapter: str, sign: float) -> None:
        # One expert at a time: the fp32 delta of a whole 8x7B expert stack would be ~3.7 GB per layer.
        with torch.no_grad():
            for expert in range(self.get_base_layer().gate_up_proj.shape[0]):
                for weight, updated in self._updated_expert_weights(adapter, sign, expert):
                    if isinstance(weight, torch.Tensor):
                        weight[expert].copy_(updated)
                    else:  # a 4-bit stack (model/quant.py): the merged expert quantized again
                        weight.set_expert(expert, updated)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_gate_up_A:
                continue
            if safe_merge:
                self._check_merge_is_finite(adapter)
            self._add_delta(adapter, 1.0)
            self.merged_adapters.append(adapter)

    def _check_merge_is_finite(self, adapter: str) -> None:
        # A pass of its own, before any write: a failed safe merge must leave the base weights untouched.
        with torch.no_grad():
            for expert in range(self.get_base_layer().gate_up_proj.shape[0]):
                for _, updated in self._updated_expert_weights(adapter, 1.0, expert):
                    if not torch.isfinite(updated).all():
                        raise ValueError(
                            f"merging LoRA adapter {adapter!r} would give non-finite weights in expert {expert}; "
                            "the base weights are unchanged"
                        )

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_gate_up_A:
                self._add_delta(adapter, -1.0)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def add_lora_delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], scale: float) -> None:
    """In place: weight += scale * B @ A, per expert for the stacked expert adapters (this module's
    layout). The one LoRA merge of the project: export's stream, eval's load, DPO's SFT merge and
    `ExpertLoraLayer.merge` all call it on fp32 tensors, so the same weights and adapter give the
    same bits everywhere (on one kind of device: the BLAS decides the last bit).

    ``parts`` (fp32, on ``weight``'s device): {"A" [R, in], "B" [out, R]} for a linear weight
    [out, in]; {"gate_up_A" [E, 2R, H], "gate_up_B" [E, 2F, R]} for gate_up_proj [E, 2F, H];
    {"down_A" [E, R, F], "down_B" [E, H, R]} for down_proj [E, H, F].
    """
    if "A" in parts:
        weight.addmm_(parts["B"], parts["A"], alpha=scale)  # [out, R] @ [R, in]
    elif "gate_up_A" in parts:
        a, b = parts["gate_up_A"], parts["gate_up_B"]  # [E, 2R, H], [E, 2F, R]
        r, f = a.shape[1] // 2, b.shape[1] // 2
        for e in range(weight.shape[0]):  # one expert at a time: no [E, 2F, H] temporary
            weight[e, :f].addmm_(b[e, :f], a[e, :r], alpha=scale)  # w1
            weight[e, f:].addmm_(b[e, f:], a[e, r:], alpha=scale)  # w3
    else:
        a, b = parts["down_A"], parts["down_B"]  # [E, R, F], [E, H, R]
        for e in range(weight.shape[0]):
            weight[e].addmm_(b[e], a[e], alpha=scale)  # w2


def _kaiming_uniform_per_expert(weight: torch.Tensor) -> None:
    """nn.Linear's init, kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(in)), of each expert's [out, in] matrix.

    On the stacked [E, out, in] tensor torch would take out * in as the fan-in, so the bound is set by hand.
    """
    bound = 1.0 / math.sqrt(weight.shape[-1])
    weight.uniform_(-bound, bound)


def _register_experts(config: LoraConfig) -> None:
    config._register_custom_module({MixtralExperts: ExpertLoraLayer})


def _install_registration() -> None:
    """Make every LoraConfig map MixtralExperts to ExpertLoraLayer, including the ones PEFT builds on load."""
    original = LoraConfig.__post_init__
    if getattr(original, "registers_mixtral_experts", False):
        return

    def __post_init__(self: LoraConfig) -> None:
        original(self)
        _register_experts(self)

    __post_init__.registers_mixtral_experts = True
    LoraConfig.__post_init__ = __post_init__


_install_registration()


def valid_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """Module names LoRA may target in `model`: the attention projections and the experts."""
    names = set()
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, MixtralExperts):
            names.add(leaf)
        elif isinstance(module, nn.Linear) and ".self_attn." in f".{name}":
            names.add(leaf)
    return tuple(sorted(names))


def check_lora_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Return `target_modules` as a list, or raise naming the unknown targets and the valid ones."""
    if isinstance(target_modules, str):
        raise ValueError(
            f"lora target_modules must be a list of module names, got the string {target_modules!r}"
        )
    targets = list(target_modules)
    if not targets:
        raise ValueError("lora target_modules is empty; name at least one of the valid targets")
    valid = valid_lora_targets(model)
    unknown = [t for t in targets if t not in valid]
    if unknown:
        hints = []
        if any(t in ("w1", "w2", "w3", "gate_up_proj", "down_proj") for t in unknown):
            hints.append(f"the expert weights w1/w2/w3 are fused: target {EXPERTS_TARGET!r} for all of them")
        if ROUTER_NAME in unknown:
            hints.append("the router is not a LoRA target; use train_router=True to train it fully")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(f"unknown lora target(s) {unknown}: valid targets are {', '.join(valid)}{hint}")
    return targets


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    *,
    adapter_name: str = "default",
    use_rslora: bool = False,
    init_lora_weights: bool | str = True,
    train_router: bool = False,
) -> PeftModel:
    """Wrap `model` in a PeftModel with LoRA on `target_modules`; only adapter weights stay trainable.

    Full fine-tuning needs none of this: train the bare model.
    """
    if getattr(getattr(model, "config", None), "model_type", None) == "mixtral":
        raise ValueError(
            "the model config has model_type 'mixtral': PEFT would rewrite the LoRA targets to "
            "transformers' names and double r and alpha; the native MixtralConfig must not set it"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=check_lora_targets(model, target_modules),
        use_rslora=use_rslora,
        init_lora_weights=init_lora_weights,
        modules_to_save=[ROUTER_NAME] if train_router else None,
        bias="none",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)
