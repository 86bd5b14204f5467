"""The export recipe: source, export, verify and tokenizer sections."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from model.checkpoint import parse_size


@dataclass
class SourceSection:
    # A stage output dir with manifest.json (SFT or DPO result), or an HF Mixtral checkpoint dir.
    run_dir: str | None = None
    # HF checkpoint dir to merge onto; overrides the base that the manifest names.
    checkpoint: str | None = None
    # Extra PEFT adapter dirs, merged in this order after those the manifests name.
    adapters: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.run_dir is None and self.checkpoint is None:
            raise ValueError(
                "set source.run_dir (a stage output dir) or source.checkpoint (an HF checkpoint dir)"
            )


@dataclass
class ExportSection:
    format: Literal["hf", "consolidated", "adapter", "gguf"] = "hf"
    # Weights are merged in float32, then cast to this dtype. format=adapter keeps the LoRA factors
    # in float32 (they are small, and PEFT casts the delta to the base weights' dtype itself).
    dtype: Literal["bfloat16", "float32", "float16"] = "bfloat16"
    max_shard_size: str = "5GB"
    # format=gguf: the file type llama.cpp loads (one model-<gguf_type>.gguf; export.dtype is not used).
    # f32 / f16 / bf16 are written directly (norms and router float32, as llama.cpp's converter does);
    # q8_0 / q4_k_m are quantized from an f16 file by llama.cpp's own quantizer (llama-cpp-python).
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"] = "f16"
    # A non-empty output_dir is refused unless this is true (it is then replaced atomically). A
    # directory holding anything the export does not write is refused either way.
    overwrite: bool = False
    progress_bar: bool = True
    # How the base model is named in shipped files (adapter_config.json's base_model_name_or_path,
    # the model card), e.g. "mistralai/Mixtral-8x7B-v0.1"; null: the base checkpoint dir's name
    # (never a path of this machine).
    base_model_name: str | None = None
    # Where the fp32 merge runs (and, for an adapter trained on a 4-bit base, the NF4 round trip of
    # every base weight it was trained on): "cpu" (the same bytes on every machine), "cuda" /
    # "cuda:N", or "auto" (the GPU when one is visible). On a GPU a Mixtral-8x7B QLoRA merge takes
    # no host quantizer time (tens of seconds per layer on 2 cores: docs/benchmarks.md), and its NF4
    # round trip is bitsandbytes' CUDA one, which a QLoRA run trained on a GPU used; the fp32 sums can
    # differ from the CPU's in the last bit, so a bf16 weight can rarely sit one step away.
    merge_device: str = "cpu"

    def __post_init__(self):
        parse_size(self.max_shard_size)
        if self.merge_device not in ("cpu", "auto") and not re.fullmatch(r"cuda(:\d+)?", self.merge_device):
            raise ValueError(f"export.merge_device must be cpu, auto, cuda or cuda:N, got {self.merge_device!r}")

    def merge_on(self):
        """The torch device of ``merge_device``; a CUDA one that this machine lacks is refused."""
        import torch

        if self.merge_device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.merge_device != "cpu" and not torch.cuda.is_available():
            raise ValueError(f"export.merge_device={self.merge_device}, but no CUDA device is visible here: "
                             "set export.merge_device=cpu (or auto)")
        return torch.device(self.merge_device)


@dataclass
class VerifySection:
    enabled: bool = True
    # Reload with transformers and compare logits only for models up to this many parameters.
    max_params: int = 2_000_000_000
    # Largest allowed max |logit difference| against our model (both computed in fp32 from the
    # exported weights, so the dtype cast does not count).
    atol: float = 1e-4
    prompts: list[str] = field(
        default_factory=lambda: [
            "Explain Machine Learning to me in a nutshell.",
            "Write a haiku about experts that route tokens.",
            "  Leading spaces,   runs of spaces, and unicode: 日本語 🎉",
        ]
    )


@dataclass
class TokenizerSection:
    # SentencePiece tokenizer.model; null: mistral_common's tokenizer.model.v1 (Mixtral's).
    spm_path: str | None = None


@dataclass
class ExportRecipe:
    source: SourceSection
    output_dir: str
    export: ExportSection = field(default_factory=ExportSection)
    verify: VerifySection = field(default_factory=VerifySection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    # Model card fields.
    model_name: str = "Mixtral-8x7B-Instruct (fine-tuned)"
