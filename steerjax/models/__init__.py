"""Model definitions (Flax NNX), configs and checkpoint loading."""

from steerjax.models.config import ModelConfig, config_from_hf

__all__ = ["ModelConfig", "config_from_hf"]
