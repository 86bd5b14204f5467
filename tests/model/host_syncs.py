"""Count the calls that make an accelerator wait for the host (device -> host reads), on any device.

On CUDA, `.item()`, `int()`/`bool()`/`float()` of a tensor, `.tolist()`, `.cpu()` / `.to("cpu")`,
`nonzero`, `unique`, boolean-mask indexing (which runs nonzero) and `masked_select` each block the
host until the device has caught up; `bincount` without a known range does twice. On the CPU none
of them costs anything visible, so tests count them with the accelerator code path forced on the
CPU: a TorchDispatchMode sees the aten ops (including those autograd runs in backward) and a
TorchFunctionMode the Python-level reads that a CPU tensor answers without an op (`.tolist()`,
`.cpu()`, `.numpy()`, `.to("cpu")`).
"""

from __future__ import annotations

import collections

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {
    "aten._local_scalar_dense": "item/int/bool/float",
    "aten.nonzero": "nonzero",
    "aten._unique2": "unique",
    "aten.unique_dim": "unique",
    "aten.unique_consecutive": "unique",
    "aten.bincount": "bincount",
    "aten.masked_select": "masked_select",
    "aten.repeat_interleave": "repeat_interleave",
}
READS = {"tolist", "cpu", "numpy"}


def _names_the_host(device) -> bool:
    """`.to("cpu")` written out. On a CPU run every tensor's device is the CPU, so `.to(t.device)`
    (a no-op on any device) must not count: a device object is taken for a tensor's own device."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class _Ops(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in SYNC_OPS and not (name == "aten.repeat_interleave" and kwargs.get("output_size") is not None):
            self.counts[SYNC_OPS[name]] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_"):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or [] if i is not None):
                self.counts["boolean index"] += 1
        return func(*args, **kwargs)


class _Reads(TorchFunctionMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.counts[name] += 1
        elif name == "to" and any(_names_the_host(a) for a in (*args[1:], kwargs.get("device"))):
            self.counts["to(cpu)"] += 1
        return func(*args, **kwargs)


class HostSyncs:
    """`with HostSyncs() as syncs: ...` then `syncs.total`, `syncs.counts` (what, how often)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def __enter__(self) -> HostSyncs:
        self._modes = (_Ops(self.counts), _Reads(self.counts))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
