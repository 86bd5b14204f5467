"""Native Mixtral in plain PyTorch: config, attention, MoE, transformer, losses, checkpoints."""

import logging

# PEFT imports bitsandbytes (the QLoRA base, model/quant.py) wherever it is installed; on AVX512-BF16
# hosts its import warns that an optional CPU inference GEMM from the hub is absent, which nothing
# here uses. Only that logger, only below ERROR.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from model.attention import KVCache  # noqa: E402
from model.config import MixtralConfig  # noqa: E402
from model.transformer import Mixtral, MixtralOutput  # noqa: E402

__all__ = ["KVCache", "Mixtral", "MixtralConfig", "MixtralOutput"]
