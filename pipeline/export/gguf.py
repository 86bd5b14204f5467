"""format=gguf: one llama.cpp GGUF file (architecture "llama", which llama.cpp runs Mixtral as),
written with the `gguf` library tensor by tensor.

Names come from model/checkpoint.py's NAME_TABLE (its ``gguf`` column). The experts are stored as
llama.cpp stores them, one [experts, ...] tensor per projection: our fused gate_up_proj [E, 2F, H] is
split into ffn_gate_exps (rows [:F], w1) and ffn_up_exps (rows [F:], w3), down_proj [E, H, F] is
ffn_down_exps as it is. llama.cpp's "llama" RoPE rotates interleaved pairs (2j, 2j + 1), so q/k rows
go back from HF's rotate_half order (as in the consolidated export). Norms and the router stay float32
in every file type (llama.cpp's kernels take 1-D tensors in f32, and its quantizer keeps the router
f32 too); every other matrix is written in the chosen type.

Memory: one native parameter in fp32 (the merge) plus its converted copy; the file is written with
the tensor infos planned from shapes alone (header first), then tensor data in plan order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import export_rules
from model.config import DTYPES, MixtralConfig
from pipeline.export.formats import hf_to_interleaved_rope

# export.gguf_type -> (its weight dtype's name in model/config.py's table, GGML tensor type, llama.cpp
# file type); norms and the router are float32 whatever the type.
GGUF_TYPES: dict[str, tuple[str, str, str]] = {
    "f32": ("float32", "F32", "ALL_F32"),
    "f16": ("float16", "F16", "MOSTLY_F16"),
    "bf16": ("bfloat16", "BF16", "MOSTLY_BF16"),
}
_GGML_TYPE = {DTYPES[name]: ggml for name, ggml, _ in GGUF_TYPES.values()}  # torch.float16 -> "F16"
# The numpy dtype a tensor's bytes are handed to the gguf library as (bf16 as raw 16-bit words).
_NUMPY_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}

ARCH = "llama"  # llama.cpp runs Mixtral as "llama" with expert_count > 0
GGUF_FILE = "model-{gguf_type}.gguf"


def gguf_file_name(gguf_type: str) -> str:
    return GGUF_FILE.format(gguf_type=gguf_type)


def gguf_tensors(
    state: dict[str, torch.Tensor], config: MixtralConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for each native parameter of ``state``, in its order: views, except q/k,
    whose rows are permuted to interleaved RoPE pairs (a copy; on meta tensors, no memory)."""
    for native, tensor in state.items():
        for rule, layer in export_rules(native, "gguf_tensors"):
            name = rule.gguf.format(i=layer)
            if rule.piece == "all":
                if native.endswith("self_attn.q_proj.weight"):
                    tensor = hf_to_interleaved_rope(tensor, config.num_attention_heads)
                elif native.endswith("self_attn.k_proj.weight"):
                    tensor = hf_to_interleaved_rope(tensor, config.num_key_value_heads)
                yield name, tensor
                continue
            ffn = tensor.shape[1] // 2
            yield name, {"w1": tensor[:, :ffn], "w3": tensor[:, ffn:], "w2": tensor}[rule.piece]


def stored_dtype(name: str, tensor: torch.Tensor, gguf_type: str) -> torch.dtype:
    """The dtype ``name`` is stored in: f32 for 1-D tensors, norms and the router, else the file type's."""
    if tensor.dim() <= 1 or name.endswith("_norm.weight") or name.endswith("ffn_gate_inp.weight"):
        return torch.float32
    return DTYPES[GGUF_TYPES[gguf_type][0]]


class GGUFStream:
    """One .gguf file written tensor by tensor: every tensor's name, shape and type is planned first
    (the header holds them), then ``write`` takes the tensors in that order. Context manager: the
    file is closed on error (the caller removes the temporary dir it is in)."""

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]]):
        import gguf

        self.path, self.plan, self.position = path, plan, 0
        self.writer = gguf.GGUFWriter(path, ARCH)

    def __enter__(self) -> GGUFStream:
        return self

    def __exit__(self, *exc) -> None:
        self.writer.close()

    def start(self) -> None:
        """Header, metadata and tensor infos (call after the metadata is added)."""
        import gguf

        for name, shape, dtype in self.plan:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.writer.add_tensor_info(
                name, shape, np.dtype(_NUMPY_VIEW[dtype]), nbytes, raw_dtype=gguf.GGMLQuantizationType[_GGML_TYPE[dtype]]
            )
        self.writer.write_header_to_file(self.path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append ``tensor`` (any float dtype) as planned; returns the bytes written."""
        if self.position >= len(self.plan):
            raise RuntimeError(f"GGUFStream: {name} arrives after every planned tensor was written")
        planned, shape, dtype = self.plan[self.position]
        if planned != name or tuple(tensor.shape) != shape:
            raise RuntimeError(f"GGUFStream: expected {planned} {list(shape)}, got {name} {list(tensor.shape)}")
        data = tensor.detach().to(dtype).contiguous()
        if dtype == torch.bfloat16:
            data = data.view(torch.int16)
        self.writer.write_tensor_data(data.numpy().view(_NUMPY_VIEW[dtype]))
        self.position += 1
        return data.numel() * dtype.itemsize

    def finish(self) -> None:
        if self.position != len(self.plan):
            raise RuntimeError(f"GGUFStream: {len(self.plan) - self.position} planned tensors were never written")
        for handle in self.writer.fout or []:
            handle.flush()
            os.fsync(handle.fileno())
        self.writer.close()


def write_gguf(recipe, source, config: MixtralConfig, adapters, tmp: Path, log) -> list[str]:
    """format=gguf: merge and stream every tensor into tmp/model-<gguf_type>.gguf (quantized types:
    into an f16 file that llama.cpp then quantizes); copy tokenizer.model; verify with llama.cpp."""
    import shutil

    from tqdm import tqdm

    from pipeline.adapter_merge import BaseReader, merged_native_params, meta_state
    from pipeline.export.gguf_metadata import add_metadata
    from pipeline.export.gguf_quantize import QUANTIZE_FROM, QUANTIZED_TYPES, quantize, require_llama_cpp
    from pipeline.hf_tokenizer import DEFAULT_SPM_PATH

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ValueError(
            "export.format=gguf needs the gguf library (llama.cpp's GGUF writer): pip install gguf"
        ) from None
    gguf_type = recipe.export.gguf_type
    merge_device = recipe.export.merge_on()
    quantized = gguf_type in QUANTIZED_TYPES
    if quantized:
        require_llama_cpp(gguf_type)
    streamed_type = QUANTIZE_FROM if quantized else gguf_type
    spm_path = Path(recipe.tokenizer.spm_path) if recipe.tokenizer.spm_path else DEFAULT_SPM_PATH
    shapes = meta_state(config)
    plan = [
        (name, tuple(t.shape), stored_dtype(name, t, streamed_type)) for name, t in gguf_tensors(shapes, config)
    ]
    total = sum(int(np.prod(shape)) * dtype.itemsize for _, shape, dtype in plan)
    path = tmp / gguf_file_name(gguf_type)
    streamed = tmp / f".{gguf_file_name(streamed_type)}.unquantized" if quantized else path
    log(f"export: {len(plan)} tensors, {total / 1e9:.3f} GB of tensor data ({streamed_type}) into {streamed.name}")
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not recipe.export.progress_bar)
    with BaseReader(source.checkpoint, config) as reader, GGUFStream(streamed, plan) as stream, torch.no_grad():
        add_metadata(stream.writer, config, streamed_type, recipe.model_name, spm_path)
        stream.start()
        for native, weight in merged_native_params(reader, adapters, shapes, device=merge_device):
            weight = weight.cpu()  # merged on export.merge_device, written from the host
            for name, tensor in gguf_tensors({native: weight}, config):
                bar.update(stream.write(name, tensor))
            del weight
        stream.finish()
    bar.close()
    report = []
    if quantized:
        log(f"export: llama.cpp quantizes {streamed.name} ({streamed.stat().st_size} bytes) to {gguf_type}")
        quantize(streamed, path, gguf_type)
        report.append(f"quantized by llama.cpp from {streamed_type} ({streamed.stat().st_size} bytes)")
        streamed.unlink()
    shutil.copyfile(spm_path, tmp / "tokenizer.model")
    report.insert(0, f"{path.name}: {len(plan)} tensors, {path.stat().st_size} bytes ({gguf_type})")
    if recipe.verify.enabled:
        from pipeline.export.gguf_verify import verify_gguf

        stored = {native: stored_dtype(name, t, streamed_type)
                  for native, meta in shapes.items() for name, t in gguf_tensors({native: meta}, config)}
        report += verify_gguf(path, source, config, stored, gguf_type, recipe.verify, spm_path)
        for line in report[1:]:
            log(f"export: {line}")
    return report
