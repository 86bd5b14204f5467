"""The streaming safetensors shard writer: shards planned by model/checkpoint.py (`hf_plan`,
`plan_shards`) written tensor by tensor, with their index (`shard_index`)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from model.checkpoint import TensorPlan, shard_file_names, shard_index
from model.config import SAFETENSORS_DTYPES


class _Slot:
    """A reused output buffer and the background write that is still reading it (None when free)."""

    def __init__(self):
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.pending: Future | None = None

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises the write's error here


class ShardWriter:
    """Writes planned safetensors files tensor by tensor: the header comes from the plan, so no
    shard is ever held in memory. Tensors must arrive in plan order.

    ``write`` converts the tensor into one of two reused buffers and returns; a background thread
    appends it to the file, so reading and merging the next parameter overlaps the write of this one,
    and a finished file is fsynced (once) by a second thread while the next one is written. Memory:
    two buffers of the largest output tensor. Use as a context manager, so that an error stops the
    threads and closes the files before the caller removes the directory.
    """

    def __init__(
        self, out_dir: Path, shards: list[list[TensorPlan]], dtype: torch.dtype, prefix: str = "model"
    ):
        self.out_dir, self.shards, self.dtype = out_dir, shards, dtype
        self.files = shard_file_names(len(shards), prefix)
        self.order = [(k, entry) for k, shard in enumerate(shards) for entry in shard]
        self.position = 0
        self._slots = (_Slot(), _Slot())
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="export-write")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="export-fsync")
        self._syncs: list[tuple[Future, object]] = []  # (fsync job, its file)
        # Touched by the write thread only (and by finish/close once it is idle).
        self.handle = None
        self.open_shard = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _header(self, shard: list[TensorPlan]) -> bytes:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for entry in shard:
            header[entry.name] = {
                "dtype": SAFETENSORS_DTYPES[self.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        return len(raw).to_bytes(8, "little") + raw

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.position >= len(self.order):
            raise RuntimeError(f"ShardWriter: {name} arrives after every planned tensor was written")
        k, entry = self.order[self.position]
        if entry.name != name or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(
                f"ShardWriter: expected {entry.name} {list(entry.shape)}, got {name} {list(tensor.shape)}"
            )
        if entry.nbytes != tensor.numel() * self.dtype.itemsize:
            raise RuntimeError(
                f"ShardWriter: {name} plans {entry.nbytes} bytes, not {self.dtype} {list(entry.shape)}"
            )
        slot = self._slots[self.position % 2]
        slot.wait()
        if slot.buffer.numel() < entry.nbytes:
            slot.buffer = torch.empty(0, dtype=torch.uint8)  # free the old one first
            slot.buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        data = slot.buffer[: entry.nbytes]  # [nbytes] uint8
        data.view(self.dtype).view(tensor.shape).copy_(tensor.detach())  # same rounding as .to(dtype)
        slot.pending = self._writer.submit(self._append, k, memoryview(data.numpy()))
        self.position += 1

    def _append(self, k: int, data: memoryview) -> None:
        """Write thread: open shard k (handing the previous file to the fsync thread), append data."""
        if k != self.open_shard:
            self._hand_off()
            self.handle = open(self.out_dir / self.files[k], "wb")  # noqa: SIM115 (closed in _sync_close)
            self.handle.write(self._header(self.shards[k]))
            self.open_shard = k
        self.handle.write(data)

    def _hand_off(self) -> None:
        if self.handle is not None:
            self._syncs.append((self._syncer.submit(_sync_close, self.handle), self.handle))
            self.handle = None

    def finish(self) -> dict:
        """Wait for every write, fsync and close every file; returns the index
        ({"metadata": {"total_size"}, "weight_map"})."""
        for slot in self._slots:
            slot.wait()
        self._writer.submit(self._hand_off).result()
        for sync, _ in self._syncs:
            sync.result()
        self.close()
        if self.position != len(self.order):
            raise RuntimeError(
                f"ShardWriter: {len(self.order) - self.position} planned tensors were never written"
            )
        return shard_index(self.shards, self.files)

    def close(self) -> None:
        """Stop the threads (queued writes and fsyncs are dropped) and close every file. Idempotent."""
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._syncer.shutdown(wait=True, cancel_futures=True)
        for _, handle in self._syncs:
            handle.close()
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _sync_close(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


@contextlib.contextmanager
def streaming_threads() -> Iterator[int]:
    """torch's intra-op threads for the streaming loop: one core fewer than usual, left to the write
    thread. Every op there is a memory-bound copy, conversion or rank-r update; an intra-op pool that
    counts the core the write thread (or another process) is using waits on its slowest thread.
    Measured (bench inputs, 2 cores, load 5-7): reading + merging + converting the 1.2 GB model took
    1.4 s on 1 thread, 10-16 s on 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before - 1))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
