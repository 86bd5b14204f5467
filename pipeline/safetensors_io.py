"""safetensors files read by byte range: the tensors' places from the JSON header, their bytes with
``os.preadv`` into caller-owned buffers (no mmap), converted chunk by chunk.

A stored tensor is one contiguous byte range, so any contiguous run of its elements (in row-major
order) is one too: ``StoredTensor.elements`` is that run, which is how a ZeRO-3 rank reads only its
own partition of a parameter (pipeline/distributed/sharded_load.py). Export reads whole tensors the same way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import SAFETENSORS_DTYPES

# safetensors dtype codes read: those checkpoints and exports are written in (model/config.py's
# WEIGHT_DTYPES), and float64.
ST_READ_DTYPES = {**{code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}, "F64": torch.float64}
# Conversion chunk when a stored dtype differs from fp32: small enough to stay cheap, large enough that
# each chunk is one read syscall of many MB.
READ_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file (absolute offsets)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    def elements(self, start: int, stop: int) -> StoredTensor:
        """Elements [start, stop) of the flattened tensor, as a 1-D stored tensor of their bytes."""
        if not 0 <= start <= stop <= math.prod(self.shape):
            raise ValueError(f"elements [{start}, {stop}) outside a tensor of shape {list(self.shape)}")
        itemsize = self.dtype.itemsize
        return StoredTensor(self.dtype, (stop - start,), self.begin + start * itemsize, self.begin + stop * itemsize)


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file and their byte ranges, from its JSON header.

    The export reads tensor bytes itself (``read_into``) instead of copying out of safe_open's mmap
    views: every 4 KiB page of a fresh mapping faults on first touch, and so does every freshly
    allocated destination. Measured (2-core dev VM): 29 MB of bf16 pieces copied out of a fresh
    mapping 189 ms, preadv into a reused buffer 7 ms; a 58 MB bf16 -> fp32 copy into a new tensor
    71 ms, into a reused one 8 ms.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({err})") from None
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = ST_READ_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(
                f"{path}: {name} has dtype {info['dtype']}; readable dtypes are {sorted(ST_READ_DTYPES)}"
            )
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size or begin > end:
            raise ValueError(f"{path}: {name} byte range {[begin, end]} does not fit its shape or the file")
        tensors[name] = StoredTensor(dtype, shape, 8 + n + begin, 8 + n + end)
    return tensors


def pread_exact(fd: int, offset: int, dest: torch.Tensor, where: str) -> None:
    """Fill the uint8 tensor ``dest`` with the file's bytes from ``offset``."""
    view = memoryview(dest.numpy())
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise ValueError(f"{where}: file ends early (truncated safetensors file?)")
        view, offset = view[n:], offset + n


def read_into(fd: int, stored: StoredTensor, dest: torch.Tensor, staging: torch.Tensor, where: str) -> None:
    """dest (contiguous) <- the stored tensor, converted to dest's dtype chunk by chunk through ``staging``
    (uint8): no allocation, no mmap, and only a chunk of the stored dtype in memory at a time."""
    if not dest.is_contiguous():
        raise RuntimeError(f"read_into: {where} destination is not contiguous")
    flat = dest.view(-1)  # [N]
    if stored.dtype == dest.dtype:
        pread_exact(fd, stored.begin, flat.view(torch.uint8), where)
        return
    itemsize = stored.dtype.itemsize
    per_chunk = staging.numel() // itemsize
    for start in range(0, flat.numel(), per_chunk):
        count = min(per_chunk, flat.numel() - start)
        chunk = staging[: count * itemsize]
        pread_exact(fd, stored.begin + start * itemsize, chunk, where)
        flat[start : start + count].copy_(chunk.view(stored.dtype))
