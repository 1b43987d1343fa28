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

from steerjax.checks import check_int, check_layer
from steerjax.errors import SteeringError
from steerjax.models.config import ModelConfig

POSITION_MODES = ("last", "last+generated", "all", "generated")


@dataclasses.dataclass(frozen=True)
class Steer:
    """Add `alpha * vector` to h_`layer` at the positions of mode `positions`; vector (d,) is shared by every
    row, (B, d) gives row b its own vector."""

    layer: int
    vector: Any
    alpha: float = 1.0
    positions: str = "last"

    def __post_init__(self):
        check_int(self.layer, "steering layer", error=SteeringError)
        if self.positions not in POSITION_MODES:
            raise SteeringError(f"unknown steering positions {self.positions!r}; choose one of {POSITION_MODES}")
        try:
            alpha = float(self.alpha)
        except (TypeError, ValueError) as err:
            raise SteeringError(f"steering alpha must be a real number, got {self.alpha!r}") from err
        if not math.isfinite(alpha):
            raise SteeringError(f"steering alpha must be finite, got {alpha}")
        object.__setattr__(self, "alpha", alpha)
        vector = np.asarray(self.vector)
        if vector.ndim not in (1, 2) or vector.size == 0 or not np.issubdtype(vector.dtype, np.number):
            raise SteeringError(f"steering vector must be a numeric array (d,) or one per row (B, d), got shape "
                                f"{vector.shape} and dtype {vector.dtype}")
        if not np.all(np.isfinite(vector)):
            raise SteeringError(f"steering vector has {int(np.sum(~np.isfinite(vector)))} NaN/inf entries")
        if not np.any(vector):
            raise SteeringError("steering vector has zero norm (it would steer nothing); pass steer=None for an "
                                "unsteered run")

    def check_for(self, config: ModelConfig) -> None:
        """Raise SteeringError if the layer or vector does not fit the model."""
        check_layer(self.layer, config.num_layers, "steering layer")
        if np.shape(self.vector)[-1] != config.hidden_size:
            raise SteeringError(f"steering vector has shape {np.shape(self.vector)}, the model needs "
                                f"({config.hidden_size},) or (B, {config.hidden_size})")


def position_mask(mode: str, prompt_len: int, attention_mask) -> jnp.ndarray:
    """(B, S) float mask of steered absolute positions for a left-padded sequence of S slots whose
    first `prompt_len` slots are the (padded) prompt and the rest generated tokens."""
    positions = jnp.arange(attention_mask.shape[-1])[None, :]
    real = attention_mask.astype(bool)
    last = positions == prompt_len - 1
    generated = positions >= prompt_len
    masks = {"last": last, "last+generated": last | generated, "all": real, "generated": generated}
    return (masks[mode] & real).astype(jnp.float32)


def steer_deltas(mode: str, prompt_len: int, attention_mask, vector, alpha) -> jnp.ndarray:
    """The one lowering of a steer to arrays: per-position deltas (B, S, d) = alpha * position_mask(...)
    outer vector, for vector (d,) (every row) or (B, d) (one per row). Pure jnp: vmaps over vector and alpha."""
    vector = jnp.asarray(vector)
    mask = position_mask(mode, prompt_len, attention_mask).astype(vector.dtype)   # alpha in the vector's precision
    return alpha * mask[..., None] * (vector[:, None, :] if vector.ndim == 2 else vector[None, None, :])


def lower_steer(steer: Steer | None, config: ModelConfig, attention_mask, prompt_len: int | None, dtype):
    """(layer int32, deltas (B, S, d) in dtype) for a forward pass over S slots whose first prompt_len
    (default S) are prompt; layer -1 and zero deltas when steer is None."""
    B, S = np.shape(attention_mask)
    if steer is None:
        return jnp.int32(-1), jnp.zeros((B, S, config.hidden_size), dtype)
    steer.check_for(config)
    if np.ndim(steer.vector) == 2 and np.shape(steer.vector)[0] != B:
        raise SteeringError(f"steering vectors {np.shape(steer.vector)} give {np.shape(steer.vector)[0]} rows; "
                            f"the batch has {B}")
    deltas = steer_deltas(steer.positions, S if prompt_len is None else prompt_len, jnp.asarray(attention_mask),
                          jnp.asarray(steer.vector, dtype), steer.alpha)
    return jnp.int32(steer.layer), deltas.astype(dtype)
