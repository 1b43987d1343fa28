"""Steering interventions: h_l <- h_l + alpha * v at an absolute-position mask.

Layer convention: h_l is the residual stream entering block l (HF `output_hidden_states[l]`); l = L is
the final-norm input. Position modes are masks over absolute positions, so a full forward, a prefill and
every KV-cache decode step steer exactly the same tokens:
    "last"            the last prompt token
    "last+generated"  the last prompt token and every generated token (the paper's released code)
    "all"             every real (non-pad) prompt and generated token
    "generated"       generated tokens only
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from steerjax.errors import SteeringError
from steerjax.models.config import ModelConfig

POSITION_MODES = ("last", "last+generated", "all", "generated")


@dataclasses.dataclass(frozen=True)
class Steer:
    """Add `alpha * vector` (d,) to h_`layer` at the positions of mode `positions`."""

    layer: int
    vector: Any
    alpha: float = 1.0
    positions: str = "last"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)):
            raise SteeringError(f"steering layer must be an int, got {self.layer!r}")
        if self.positions not in POSITION_MODES:
            raise SteeringError(f"unknown steering positions {self.positions!r}; choose one of {POSITION_MODES}")
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError) as err:
            raise SteeringError(f"steering alpha must be a real number, got {self.alpha!r}") from err
        if not math.isfinite(alpha):
            raise SteeringError(f"steering alpha must be finite, got {alpha}")
        vector = np.asarray(self.vector)
        if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.number):
            raise SteeringError(f"steering vector must be a 1-D numeric array (d,), got shape {vector.shape} "
                                f"and dtype {vector.dtype}")
        if not np.all(np.isfinite(vector)):
            raise SteeringError(f"steering vector has {int(np.sum(~np.isfinite(vector)))} NaN/inf entries")
        if not np.any(vector):
            raise SteeringError("steering vector has zero norm (it would steer nothing); pass steer=None for an "
                                "unsteered run")

    def check_for(self, config: ModelConfig) -> None:
        """Raise SteeringError if the layer or vector does not fit the model."""
        if not 0 <= self.layer <= config.num_layers:
            raise SteeringError(f"steering layer {self.layer} is outside [0, {config.num_layers}] "
                                f"(this model has {config.num_layers} blocks; layer L steers the final-norm input)")
        if np.shape(self.vector) != (config.hidden_size,):
            raise SteeringError(f"steering vector has shape {np.shape(self.vector)}, the model needs "
                                f"({config.hidden_size},)")


def position_mask(mode: str, prompt_len: int, attention_mask) -> jnp.ndarray:
    """(B, S) float mask of steered absolute positions for a left-padded sequence of S slots whose
    first `prompt_len` slots are the (padded) prompt and the rest generated tokens."""
    positions = jnp.arange(attention_mask.shape[-1])[None, :]
    real = attention_mask.astype(bool)
    last = positions == prompt_len - 1
    generated = positions >= prompt_len
    masks = {"last": last, "last+generated": last | generated, "all": real, "generated": generated}
    return (masks[mode] & real).astype(jnp.float32)


def steer_delta(vector, alpha, mask) -> jnp.ndarray:
    """alpha * mask (B, S) outer vector (d,) -> (B, S, d)."""
    return alpha * mask[..., None] * jnp.asarray(vector)[None, None, :]
