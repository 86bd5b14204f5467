"""Peak bytes of torch CPU tensors in one stage run, per phase, for checking `pipeline.plan` on CPU.

    [accelerate launch --config_file C] bench/plan_probe.py OUT_DIR pipeline.sft RECIPE [key=value ...]

What is measured. bench/alloc_peak.cpp is a CPU allocator for torch that counts the bytes of live
tensors and their peak; this script compiles it (g++, under a second, cached in the temp dir),
imports the stage, installs the allocator and runs the stage's `main`. Every tensor made after
that goes through it: the model, gradients, optimizer state, DeepSpeed's flat buffers and buckets,
activations, logits, gathered state dicts. This is the CPU analogue of CUDA's
`max_memory_allocated` (bytes asked for; no caching-allocator rounding). Not counted, on purpose or
because torch does not allocate them: tensors made before the stage started (imports), Python
objects, the bytes safetensors reads a tensor into (its own buffer, one tensor at a time), gloo's
internal buffers. RSS is no use at these sizes: the CPU allocator returns freed blocks to the OS
lazily, DeepSpeed's 5e8-element bucket is `torch.empty` (untouched pages are not resident), and
library code loaded after the baseline weighs as much as the tiny model.

Phases: `load` until the first `Accelerator.prepare` (data, model build and checkpoint load,
LoRA), `prepare` (DeepSpeed's engine and ZeRO optimizer), `train` (steps, optimizer, eval,
checkpoints), `final` (after `Trainer.train`: consolidation and saving). The peak of each phase is
counted from the bytes live when it began. Writes OUT_DIR/probe-rank<r>.json.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("alloc_peak.cpp")


def build_library() -> Path:
    """The allocator as a shared library for this torch, compiled once per source and torch version."""
    import torch

    torch_dir = Path(torch.__file__).parent
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"mixtral-tune-alloc-peak-{key}.so"
    if target.is_file():
        return target
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    abi = int(torch.compiled_with_cxx11_abi())
    subprocess.run(
        ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
         f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10",
         f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial)],
        check=True,
    )
    os.replace(partial, target)  # atomic: a concurrent rank sees the whole file or none
    return target


class AllocationCounter:
    """The installed counting allocator: bytes live now, peak since the last `reset`."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        for name in ("alloc_peak_live", "alloc_peak_peak"):
            getattr(self.lib, name).restype = ctypes.c_int64
        self.lib.alloc_peak_install()

    def live(self) -> int:
        return self.lib.alloc_peak_live()

    def peak(self) -> int:
        return self.lib.alloc_peak_peak()

    def reset(self) -> None:
        self.lib.alloc_peak_reset()


class Phases:
    """Peak bytes per phase: `enter(name)` closes the phase before it."""

    def __init__(self, counter: AllocationCounter):
        self.counter = counter
        self.current = "load"
        self.peaks: dict[str, int] = {}
        self.live_at_start: dict[str, int] = {"load": counter.live()}

    def enter(self, name: str) -> None:
        if name in self.peaks or name == self.current:
            return
        self.peaks[self.current] = self.counter.peak()
        self.current = name
        self.live_at_start[name] = self.counter.live()
        self.counter.reset()

    def close(self) -> dict[str, int]:
        self.peaks[self.current] = self.counter.peak()
        return self.peaks


def mark_phases(phases: Phases) -> None:
    """Enter `prepare` at the first Accelerator.prepare, `train` after it, `final` after Trainer.train."""
    import accelerate

    from pipeline.training import trainer

    def between(method, during: str, after: str):
        """`method` run in phase `during`, which closes into `after` when it returns (or raises)."""

        def marked(self, *args, **kwargs):
            phases.enter(during)
            try:
                return method(self, *args, **kwargs)
            finally:
                phases.enter(after)

        return marked

    accelerate.Accelerator.prepare = between(accelerate.Accelerator.prepare, "prepare", "train")
    trainer.Trainer.train = between(trainer.Trainer.train, "train", "final")


def main(argv: list[str]) -> int:
    out_dir, module_name, *stage_argv = argv
    library = build_library()
    stage = importlib.import_module(module_name)
    counter = AllocationCounter(library)
    phases = Phases(counter)
    mark_phases(phases)
    code = stage.main(stage_argv)
    peaks = phases.close()
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "exit_code": code,
        # The run's peak: a phase's peak above the bytes still live from earlier phases.
        "peak_bytes": max(peaks.values()),
        "phase_peak_bytes": peaks,
        "phase_start_bytes": phases.live_at_start,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"probe-rank{rank}.json").write_text(json.dumps(result, indent=1) + "\n")
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
