"""MixtralConfig: the model's hyper-parameters, with Hugging Face field names.

Deliberately has no `model_type` attribute: PEFT reads `config.model_type == "mixtral"` and then
rewrites expert LoRA targets to transformers' own fused names (see shared/PARALLEL_FACTS.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The weight dtypes configs, checkpoints and exports are written in, one row each: the name
# (config.json's torch_dtype, the recipes), the torch dtype, the safetensors header code. The three
# lookups below are views of this one table.
WEIGHT_DTYPES: tuple[tuple[str, torch.dtype, str], ...] = (
    ("float32", torch.float32, "F32"),
    ("bfloat16", torch.bfloat16, "BF16"),
    ("float16", torch.float16, "F16"),
)
DTYPES = {name: dtype for name, dtype, _ in WEIGHT_DTYPES}  # "bfloat16" -> torch.bfloat16
DTYPE_NAMES = {dtype: name for name, dtype, _ in WEIGHT_DTYPES}  # torch.bfloat16 -> "bfloat16"
SAFETENSORS_DTYPES = {dtype: code for _, dtype, code in WEIGHT_DTYPES}  # torch.bfloat16 -> "BF16"


@dataclass
class MixtralConfig:
    # Sizes
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # F: ffn width of each expert
    num_hidden_layers: int = 32

    # Attention: grouped-query, RoPE
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    sliding_window: int | None = None  # None: full causal attention
    attention_dropout: float = 0.0

    # Mixture of experts
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.02
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0

    # Norms, init, embeddings
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    # Special tokens
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    # Weight dtype written to config.json ("bfloat16" for the released checkpoints)
    torch_dtype: str = "bfloat16"

    # Other config.json fields (no effect here), kept so that to_hf() writes them back
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"MixtralConfig: hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "num_key_value_heads head_dim max_position_embeddings num_local_experts num_experts_per_tok"
        ).split()
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"MixtralConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"MixtralConfig.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"MixtralConfig.head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"MixtralConfig.num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, num_local_experts={self.num_local_experts}]"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"MixtralConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"MixtralConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"MixtralConfig.sliding_window must be None or > 0, got {self.sliding_window}")
        if self.hidden_act != "silu":
            raise ValueError(
                f"MixtralConfig.hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is implemented"
            )
        if self.tie_word_embeddings:
            raise ValueError(
                "MixtralConfig.tie_word_embeddings=True is not supported (Mixtral's lm_head is not tied)"
            )
        if self.attention_dropout != 0.0:
            raise ValueError("MixtralConfig.attention_dropout must be 0.0 (fine-tuning here uses no dropout)")
        if self.torch_dtype not in DTYPES:
            raise ValueError(
                f"MixtralConfig.torch_dtype={self.torch_dtype!r}: want one of {sorted(DTYPES)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    # ---- presets ---------------------------------------------------------------------------

    @classmethod
    def preset(cls, name: str) -> MixtralConfig:
        presets = {
            "mixtral-8x7b": {},
            # Works with the real 32000-id tokenizer; tests and the CPU demo use it.
            "tiny": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                torch_dtype="float32",
            ),
            # Everything uneven: 6 experts, 3 layers, hidden 48 (not a power of two), kv heads < heads.
            "tiny-odd": dict(
                hidden_size=48,
                intermediate_size=80,
                num_hidden_layers=3,
                num_attention_heads=6,
                num_key_value_heads=2,
                num_local_experts=6,
                max_position_embeddings=4096,
                rope_theta=10000.0,
                torch_dtype="float32",
            ),
            # Mixtral-8x7B's layer shapes with 2 layers (3.2B parameters): make bench-gpu.
            "bench-8x7b-2layers": dict(num_hidden_layers=2),
            "bench-small": dict(
                hidden_size=512,
                intermediate_size=1792,
                num_hidden_layers=4,
                num_attention_heads=8,
                num_key_value_heads=2,
                torch_dtype="float32",
            ),
        }
        if name not in presets:
            raise ValueError(
                f"MixtralConfig.preset: unknown preset {name!r}; choose one of {sorted(presets)}"
            )
        return cls(**presets[name])

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> MixtralConfig:
        """From a HF Mixtral config.json (a file, its directory, or the parsed dict); transformers 4.x or 5."""
        where = "dict"
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(f"MixtralConfig.from_hf: no config file at {path}") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"MixtralConfig.from_hf: {path} is not valid JSON ({err})") from None
        hf = dict(source)
        arch = hf.get("model_type")
        if arch not in (None, "mixtral"):
            raise ValueError(f"MixtralConfig.from_hf: {where} has model_type={arch!r}, expected 'mixtral'")
        # transformers 5 writes rope_parameters / dtype where 4.x wrote rope_theta / torch_dtype.
        rope = hf.pop("rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"MixtralConfig.from_hf: {where} rope_parameters.rope_type={rope['rope_type']!r}: "
                "only 'default' RoPE is implemented"
            )
        if "rope_theta" in rope:
            hf.setdefault("rope_theta", rope["rope_theta"])
        if "dtype" in hf:
            hf.setdefault("torch_dtype", hf.pop("dtype"))
        if hf.get("rope_scaling"):
            raise ValueError(f"MixtralConfig.from_hf: {where} sets rope_scaling, which is not implemented")
        if hf.get("torch_dtype") is None:
            hf.pop("torch_dtype", None)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in hf.items() if k in names}
        written_by_to_hf = {"architectures", "model_type", "output_router_logits", "use_cache"}
        extra = {k: v for k, v in hf.items() if k not in names and k not in written_by_to_hf}
        if isinstance(kwargs.get("eos_token_id"), list):
            raise ValueError(f"MixtralConfig.from_hf: {where} eos_token_id is a list; one id is supported")
        try:
            return cls(**kwargs, extra=extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"MixtralConfig.from_hf: {where}: {err}") from None

    def to_hf(self) -> dict:
        """A config.json dict with every field of Mixtral-8x7B-Instruct-v0.1's (transformers 4.x style)."""
        hf = {
            "architectures": ["MixtralForCausalLM"],
            "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "mixtral",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            hf["head_dim"] = self.head_dim
        if self.router_z_loss_coef:
            hf["router_z_loss_coef"] = self.router_z_loss_coef
        if self.router_jitter_noise:
            hf["router_jitter_noise"] = self.router_jitter_noise
        if self.pad_token_id is not None:
            hf["pad_token_id"] = self.pad_token_id
        for key, value in self.extra.items():
            hf.setdefault(key, value)
        return hf
