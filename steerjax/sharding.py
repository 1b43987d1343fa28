"""SPMD sharding of models and batches over a ('data', 'model') device mesh, with JAX's own GSPMD.

Nothing here changes the model code: parameters and batches are placed with `NamedSharding`s, and every
jitted function (forward, Jacobian products, Lanczos, generation) is partitioned by XLA's sharding
propagation. `steerjax.model.shard_model(lm, mesh)` (`lm.shard(mesh)`) returns a LanguageModel whose params live on the
mesh and whose batches are split over 'data', so the whole public API runs sharded unchanged.

Layout (m = size of the 'model' axis; Megatron-style tensor parallelism: column-parallel projections into a
sublayer, row-parallel out of it, so each attention and MLP sublayer ends in one all-reduce):
  - q_proj kernel (L, d, H*h) and bias: output dim over 'model' if H % m == 0 (whole heads per device);
    o_proj kernel (L, H*h, d): input dim over 'model' under the same condition; o_proj bias replicated.
  - k_proj / v_proj kernel (L, d, K*h) and bias: output dim over 'model' if K % m == 0, else replicated
    (GQA with fewer key/value heads than model shards: every device keeps all K heads, its query heads
    read the ones they need).
  - gate_proj / up_proj kernel (L, d, f) and bias: output dim over 'model' if f % m == 0; down_proj kernel
    (L, f, d): input dim under the same condition; down_proj bias replicated.
  - embed and lm_head (V, d): vocabulary dim over 'model' if V % m == 0 (each device owns a slice of the
    logits), else replicated.
  - RMSNorm weights replicated. The leading stacked-layer axis L is never sharded (blocks run under
    lax.scan). Parameters are replicated over 'data'.
  - Batches (leading prompt axis B): over 'data' if B % (data size) == 0, else replicated (pad the batch to
    a multiple of the data axis to use it).
Rule for any other non-divisible dimension: replicate it (correct everywhere, only costs memory).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from steerjax.errors import InputError
from steerjax.models.config import ModelConfig

AXES = ("data", "model")


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A (data, model) mesh with axis names ('data', 'model') and automatic (GSPMD) axis types.
    model=None takes every remaining device: model = n_devices // data."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // max(data, 1)
    if data < 1 or model < 1 or data * model > len(devices):
        raise InputError(f"a mesh of data={data} x model={model} needs {data * model} devices, "
                         f"{len(devices)} are visible (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "before jax starts)")
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[: data * model])


def _divides(size: int, dim: int) -> bool:
    return dim % size == 0


def block_partition_specs(config: ModelConfig, model_size: int, block_params) -> dict:
    """PartitionSpecs of the stacked DecoderBlock params (every leaf has the leading layer axis)."""
    m = model_size
    heads = "model" if _divides(m, config.num_heads) else None
    kv_heads = "model" if _divides(m, config.num_kv_heads) else None
    inner = "model" if _divides(m, config.intermediate_size) else None

    def column(shard):  # kernel (L, in, out) sharded on out; bias (L, out)
        return {"kernel": P(None, None, shard), "bias": P(None, shard)}

    def row(shard):  # kernel (L, in, out) sharded on in; bias (L, out) replicated
        return {"kernel": P(None, shard, None), "bias": P(None, None)}

    norm = {"weight": P(None, None)}  # replicated (also Gemma's extra norms and the per-head q/k norms)
    layout = {
        "input_layernorm": norm, "post_attention_layernorm": norm,
        "pre_feedforward_layernorm": norm, "post_feedforward_layernorm": norm,
        "self_attn": {"q_proj": column(heads), "k_proj": column(kv_heads), "v_proj": column(kv_heads),
                      "o_proj": row(heads), "q_norm": norm, "k_norm": norm},
        "mlp": {"gate_proj": column(inner), "up_proj": column(inner), "down_proj": row(inner)},
    }
    return _restrict(layout, block_params)


def _restrict(layout, params):
    """layout restricted to the keys params has (biases are optional)."""
    return {k: _restrict(layout[k], v) if isinstance(v, dict) else layout[k] for k, v in params.items()}


def partition_specs(config: ModelConfig, params, model_size: int) -> dict:
    """Pytree of PartitionSpecs (same structure as params) for a 'model' axis of `model_size`."""
    vocab = "model" if _divides(model_size, config.vocab_size) else None
    specs = {
        "embed": P(vocab, None),
        "blocks": block_partition_specs(config, model_size, params["blocks"]),
        "norm": {"weight": P(None)},
    }
    if "lm_head" in params:
        specs["lm_head"] = P(vocab, None)
    return specs


def param_shardings(params, mesh: Mesh, config: ModelConfig) -> dict:
    """Pytree of NamedShardings for params on `mesh` (see the module docstring for the layout)."""
    specs = partition_specs(config, params, mesh.shape["model"])
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh, config: ModelConfig) -> dict:
    """params placed on the mesh with `param_shardings` (jax.device_put; no host round trip on device)."""
    return jax.device_put(params, param_shardings(params, mesh, config))


def batch_sharding(shape, mesh: Mesh) -> NamedSharding:
    """Leading (prompt) axis over 'data' when it divides, else replicated."""
    shape = tuple(shape)
    if shape and _divides(mesh.shape["data"], shape[0]):
        return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
    """Arrays (or a pytree of them, e.g. a TokenBatch) with a leading prompt axis, split over 'data'."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(np.shape(x), mesh)), batch)


def describe(lm) -> list[dict[str, Any]]:
    """Per-parameter placement: path, global shape, per-device shard shape, spec and bytes per device."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(lm.params)[0]:
        shard = leaf.addressable_shards[0].data.shape
        rows.append({"param": jax.tree_util.keystr(path), "shape": tuple(leaf.shape), "shard": tuple(shard),
                     "spec": str(getattr(leaf.sharding, "spec", "single device")),
                     "bytes_per_device": int(np.prod(shard)) * leaf.dtype.itemsize})
    return rows
