"""Native Mixtral in plain PyTorch: config, attention, MoE, transformer, losses, checkpoints."""

from model.config import MixtralConfig
from model.transformer import Mixtral, MixtralOutput

__all__ = ["Mixtral", "MixtralConfig", "MixtralOutput"]
