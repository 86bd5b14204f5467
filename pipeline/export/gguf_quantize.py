"""Quantized GGUF types through llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize):
the export streams an f16 GGUF (as llama.cpp's README converts before quantizing), then llama.cpp
quantizes it with its rules (which tensors keep more bits, fallbacks for rows that do not fit a
block) into the final file, and the f16 file is deleted. Disk: the f16 file plus the quantized one."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# export.gguf_type -> llama.cpp's file type (llama_ftype) name.
QUANTIZED_TYPES: dict[str, str] = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
QUANTIZE_FROM = "f16"  # the streamed file a quantized type is made from


def require_llama_cpp(gguf_type: str) -> None:
    """A clear error before any work when llama.cpp's quantizer is needed and missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ValueError(
            f"export.gguf_type={gguf_type} is quantized by llama.cpp's own quantizer: pip install "
            "llama-cpp-python (or export gguf_type f16 / bf16 / f32, which need only the gguf library)"
        ) from None


def quantize(source: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's quantization of the GGUF file ``source`` into ``target`` as ``gguf_type``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[gguf_type])
    params.nthread = max(1, (os.cpu_count() or 2) - 1)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {gguf_type} (status {status})")
