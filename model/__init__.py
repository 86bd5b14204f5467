"""Native Mixtral in plain PyTorch: config, attention, MoE, transformer, losses, checkpoints."""

from model.attention import KVCache
from model.config import MixtralConfig
from model.transformer import Mixtral, MixtralOutput

__all__ = ["KVCache", "Mixtral", "MixtralConfig", "MixtralOutput"]
