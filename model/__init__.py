"""Native Mixtral in plain PyTorch: config, attention, MoE, transformer, losses, checkpoints.

The names below are imported on first use, not with the package: model/labels.py is torch-free and
data prep imports it without paying for torch (~1.5 s).
"""

import importlib
import logging

# PEFT imports bitsandbytes (the QLoRA base, model/quant.py) wherever it is installed; on AVX512-BF16
# hosts its import warns that an optional CPU inference GEMM from the hub is absent, which nothing
# here uses. Only that logger, only below ERROR.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_HOMES = {"KVCache": "model.attention", "MixtralConfig": "model.config", "Mixtral": "model.transformer",
          "MixtralOutput": "model.transformer"}
__all__ = ["KVCache", "Mixtral", "MixtralConfig", "MixtralOutput"]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
