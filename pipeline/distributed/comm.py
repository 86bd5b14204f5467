"""Which device a process group communicates on: every collective in pipeline/ puts its tensors there.

An NCCL group has no CPU backend (`dist.Backend.backend_capability["nccl"] == ["cuda"]`): a
collective on a CPU tensor fails with "No backend type associated with device type cpu". gloo
takes CPU tensors (and CUDA ones, through host copies), so a CPU test on gloo passes where every
GPU run crashes. Hence one rule, decided here from the group's backend and nowhere else:

- a group with no CPU backend (nccl, or any backend registered for accelerators only) -> the
  accelerator, this process's current device;
- a group with its own backend for CUDA next to a CPU one (``"cpu:gloo,cuda:nccl"``) -> CUDA, the
  fast path;
- one backend for both (gloo, mpi, ucc) -> the CPU, where it communicates natively.

    counts = torch.zeros(P, El, dtype=torch.long, device=group_device(ep_group))
    dist.all_to_all_single(recv, counts, group=ep_group)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_devices(backend: str) -> dict[str, str]:
    """``dist.get_backend(group)``'s string -> {device type: backend name} for every device it serves.

    "nccl" -> {"cuda": "nccl"}; "gloo" -> {"cpu": "gloo", "cuda": "gloo"};
    "cpu:gloo,cuda:nccl" -> {"cpu": "gloo", "cuda": "nccl"}. Raises on a backend torch does not know.
    """
    if ":" in backend:
        pairs = [item.split(":", 1) for item in backend.split(",")]
        return {device.strip(): name.strip().lower() for device, name in pairs}
    name = backend.lower()
    devices = dist.Backend.backend_capability.get(name)
    if devices is None:
        raise ValueError(
            f"process-group backend {backend!r} is not registered with torch.distributed "
            f"(known: {', '.join(sorted(dist.Backend.backend_capability))})"
        )
    return dict.fromkeys(devices, name)


def backend_device_type(backend: str) -> str:
    """The device type a group with this backend communicates on ("cuda", "cpu", ...); see module doc."""
    served = backend_devices(backend)
    accelerators = [d for d in served if d != "cpu"]
    if "cpu" not in served:
        if not accelerators:
            raise ValueError(f"process-group backend {backend!r} serves no device")
        return accelerators[0]
    own = [d for d in accelerators if served[d] != served["cpu"]]
    return own[0] if own else "cpu"


def group_device(group=None) -> torch.device:
    """The device ``group``'s collectives take tensors on (the default group when None).

    For an accelerator this is the process's current device (accelerate and DeepSpeed set it to the
    local rank's GPU before any collective), never a bare "cuda" that means GPU 0 on every rank.
    """
    kind = backend_device_type(dist.get_backend(group))
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind, None)
    if module is None or not module.is_available():
        raise RuntimeError(
            f"the process group (backend {dist.get_backend(group)!r}) communicates on {kind}, "
            f"but this process has no {kind} device: launch on {kind} machines, or set "
            "parallel.backend: gloo on CPU hosts"
        )
    return torch.device(kind, module.current_device())
