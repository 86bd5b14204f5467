"""What the plan adds up: a `Line` (one tensor or family of tensors and its arithmetic) and a
`Moment` (the lines alive together at one point of a phase), with the units they are counted in."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
# CUDA context, NCCL communicators and cuBLAS workspaces of one process: not measured here (no GPU);
# an H100 process with NCCL typically holds 0.5-1.5 GB outside PyTorch's allocator.
CUDA_RESERVE_GB = 1.5
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INDEX = 8  # int64 index tensors


@dataclass
class Line:
    """One tensor (or family of tensors) alive at a moment: what, how many bytes, and the arithmetic."""

    what: str
    bytes: float
    how: str = ""
    kind: str = "other"  # weights | grads | optimizer | activations | logits | comm | other
    # On the host: of each process (summed over the node), or of the main process only.
    host: bool = False
    main_only: bool = False
    # A torch tensor (seen by the CPU allocator probe); False for read buffers outside torch.
    tensor: bool = True


@dataclass
class Moment:
    phase: str  # load | prepare | train | final
    name: str
    lines: list[Line]

    def gpu(self) -> float:
        return sum(line.bytes for line in self.lines if not line.host)

    def host_per_node(self, processes_per_node: int) -> float:
        return sum(line.bytes * (1 if line.main_only else processes_per_node)
                   for line in self.lines if line.host)

    def one_process(self) -> float:
        """Every torch tensor of the main process, wherever it lives (a CPU launch: one memory)."""
        return sum(line.bytes for line in self.lines if line.tensor)


def fmt_gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def partition_of(n: int, dp: int) -> int:
    """Elements of one rank's share when n are split over dp ranks (rounded up, as ZeRO pads)."""
    return -(-n // dp)
