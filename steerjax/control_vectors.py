"""Steering vectors in the files of peer tools, and the layer index each peer uses.

Two formats, both one (d,) float32 vector per layer:
- llama.cpp control vectors (GGUF, `llama-cli --control-vector FILE`), as repeng's `ControlVector.export_gguf`
  writes them: architecture "controlvector", metadata `controlvector.model_hint` (str) and
  `controlvector.layer_count` (uint32), and one 1-D F32 tensor `direction.{i}` per layer
  (`export_control_vector`, `import_control_vector`);
- steering-vectors' `SteeringVector(layer_activations={i: tensor}, layer_type="decoder_block")` as a safetensors
  file {str(i): (d,) float32} whose metadata names the convention (`export_steering_vectors`,
  `import_steering_vectors`; plain tensors, so no torch is needed to write or read them).

Layer convention: steerjax's h_l is the residual stream ENTERING block l (h_L enters the final norm). All three
peers index a vector by the block i whose OUTPUT it is added to, which is steerjax's h_(i+1):
`peer_layer_from_steerjax(l) = l - 1`, `steerjax_layer_from_peer(i) = i + 1`. steerjax's h_0 (the embedding
output) has no peer index. Checked in the peers' sources:
- repeng (repeng/control.py): `ControlModel` wraps `model.model.layers[i]` in a `ControlModule` whose forward
  adds the control to the block's output; `read_representations` reads `hidden_states[i + 1]`
  (repeng/extract.py `batched_get_hiddens`) and `export_gguf` names the tensor `direction.{i}`.
- llama.cpp: `common_control_vector_load` (common/common.cpp; `llama_control_vector_load` in older versions)
  reads `direction.N` for N >= 1 (a `direction.0` makes it refuse the whole file) into slot N - 1;
  `llama_adapter_cvec::apply` (src/llama-adapter.cpp) copies slot il - 1 into `tensors[il]` for il in [1, n_layer);
  every model graph (e.g. src/models/llama.cpp) calls `build_cvec(cur, il)` on the output of block il (`l_out`).
  So direction.N is added to the output of block N (N = 1 .. n_layer - 1), the block repeng's index N names.
  llama.cpp's own cvector-generator reads its direction.N from the output of block N - 1 (`l_out` of il, written
  as `direction.{il+1}`), one block before the loader applies it; the functions here follow the loader, i.e. where
  the vector acts.
- steering-vectors (steering_vectors/steering_vector.py): `patch_activations` registers a forward hook on the
  i-th matching "decoder_block" module (`model.layers.{i}`) that adds the vector to the module's output.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
import safetensors
import safetensors.numpy

from steerjax.checks import is_int
from steerjax.errors import InputError
from steerjax.version import __version__

CONTROL_VECTOR_ARCH = "controlvector"
DIRECTION = re.compile(r"direction\.(\d+)")
# the metadata of a steering-vectors file written here: what its keys mean
STEERING_VECTORS_METADATA = {
    "format": "steering-vectors",
    "layer_type": "decoder_block",
    "layer_convention": "key i = the vector added to the OUTPUT of decoder block i (model.layers[i]), "
                        "which is steerjax's h_(i+1) (h_l enters block l)",
}


def peer_layer_from_steerjax(layer: int) -> int:
    """The peers' layer index i = layer - 1 of steerjax's h_layer (layer >= 1): the block whose OUTPUT is steered.

    repeng (`ControlModel`, `ControlVector.directions`), llama.cpp (`direction.i` of a control-vector GGUF) and
    steering-vectors (`SteeringVector.layer_activations`, layer_type "decoder_block") all add vector i to the
    output of HF's `model.model.layers[i]`; steerjax's h_l enters block l, so h_layer is the output of block
    layer - 1. h_0 (the embeddings) has no peer index: InputError."""
    if not is_int(layer) or layer < 1:
        raise InputError(f"steerjax layer {layer!r} has no peer index: peers steer the output of block i, which is "
                         "h_(i+1), so the layer must be an int >= 1 (h_0, the embedding output, is no block's "
                         "output)")
    return int(layer) - 1


def steerjax_layer_from_peer(index: int) -> int:
    """steerjax's layer l = index + 1 of a peer's layer index (>= 0): the vector a peer adds to the output of block
    `index` (repeng, llama.cpp's `direction.index`, steering-vectors' decoder_block `index`) is a steer of
    h_(index + 1), the stream entering block index + 1 (the final-norm input when index = L - 1)."""
    if not is_int(index) or index < 0:
        raise InputError(f"peer layer index {index!r} must be an int >= 0 (the block whose output is steered)")
    return int(index) + 1


# ----------------------------------------------------------------------------- checks

def _peer_layer_reason(layer, lowest: int, num_layers: int | None) -> str | None:
    """Why steerjax layer `layer` cannot be written (lowest = the least layer the format holds), or None."""
    if not is_int(layer):
        return "keys are steerjax layers: ints, h_l enters block l"
    if layer < 0:
        return "steerjax layers count from 0 (h_l enters block l); pass L + layer for a negative one"
    if layer == 0:
        return "h_0 (the embedding output) is no block's output, so no peer can steer it"
    if layer < lowest:
        return ("it would be direction.0 (the output of block 0), which llama.cpp refuses, failing the whole file; "
                "write it with export_steering_vectors, or steer a layer >= 2")
    if num_layers is not None and layer > num_layers:
        return f"the model has {num_layers} blocks and h_{num_layers}, the final-norm input, is the last one's output"
    return None


def _checked_vectors(vectors: Mapping[int, Any], num_layers: int | None, lowest: int) -> dict[int, np.ndarray]:
    """{steerjax layer: (d,) float32} sorted by layer: every layer an int in [lowest, num_layers] (no upper bound
    when None), every vector a finite 1-D real array (also after the cast to float32), all of one d."""
    if not isinstance(vectors, Mapping) or not vectors:
        raise InputError(f"vectors must be a non-empty dict {{steerjax layer: (d,) array}}, got {vectors!r:.80}")
    if num_layers is not None and (not is_int(num_layers) or num_layers < 1):
        raise InputError(f"num_layers must be an int >= 1 (the model's block count L), got {num_layers!r}")
    out, d = {}, None
    for layer in sorted(vectors, key=lambda k: (not is_int(k), k if is_int(k) else 0)):
        reason = _peer_layer_reason(layer, lowest, num_layers)
        if reason is not None:
            top = "L" if num_layers is None else num_layers
            raise InputError(f"layer {layer!r} is outside [{lowest}, {top}]: {reason}")
        try:
            v = np.asarray(vectors[layer])
        except (TypeError, ValueError) as err:
            raise InputError(f"the vector of layer {layer} is not an array ({err})") from None
        if v.ndim != 1 or v.size == 0 or v.dtype.kind not in "fiu":
            raise InputError(f"the vector of layer {layer} must be a non-empty 1-D real array (d,), got shape "
                             f"{v.shape} and dtype {v.dtype}")
        with np.errstate(over="ignore"):
            v32 = v.astype(np.float32)
        if not np.all(np.isfinite(v32)):
            raise InputError(f"the vector of layer {layer} has {int(np.sum(~np.isfinite(v32)))} NaN/inf entries "
                             "in float32")
        if d is not None and v.shape[0] != d:
            raise InputError(f"the vector of layer {layer} has d = {v.shape[0]}, the others d = {d}; one file holds "
                             "the vectors of one model")
        d = v.shape[0]
        out[int(layer)] = v32
    return out


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) on a temp file next to `path`, then rename it over `path` (no half-written file)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    return path


# ----------------------------------------------------------------------------- llama.cpp / repeng GGUF

def export_control_vector(path: str | os.PathLike, vectors: Mapping[int, Any], model_hint: str = "", *,
                          num_layers: int | None = None) -> Path:
    """Write `vectors` {steerjax layer l: (d,)} as a llama.cpp control vector (the GGUF repeng's
    `ControlVector.export_gguf` writes; `llama-cli -m MODEL --control-vector FILE` applies it at every token) and
    return the path. h_l becomes tensor `direction.{l - 1}` (`peer_layer_from_steerjax`), float32.

    Layers must lie in [2, num_layers] (num_layers = the model's L, unchecked when None): h_0 has no peer index,
    and h_1 would be `direction.0`, which llama.cpp's loader refuses (the whole file). InputError for a bad
    layer, a vector that is not 1-D, unequal d or NaN/inf entries."""
    checked = _checked_vectors(vectors, num_layers, lowest=2)
    if not isinstance(model_hint, str):
        raise InputError(f"model_hint must be a str (e.g. the model_type), got {model_hint!r}")

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(checked))
        for layer, v in checked.items():
            writer.add_tensor(f"direction.{peer_layer_from_steerjax(layer)}", v)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _atomic_write(path, write)


def _check_imported(path, name: str, values: np.ndarray, d: int | None) -> int:
    """Raise InputError when an imported vector's size differs from the others' (d) or it holds NaN/inf; its size."""
    if d is not None and values.shape[0] != d:
        raise InputError(f"{path}: tensor {name} has d = {values.shape[0]}, the others d = {d}")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path}: tensor {name} has {int(np.sum(~np.isfinite(values)))} NaN/inf entries")
    return values.shape[0]


def import_control_vector(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """{steerjax layer: (d,) float32} of a llama.cpp / repeng control-vector GGUF: tensor `direction.i` becomes
    h_(i+1) (`steerjax_layer_from_peer`; repeng may write direction.0, read as h_1). Other tensors are ignored, as
    both peers do. InputError for a file that is not a GGUF of architecture "controlvector", has no direction
    tensors, or holds one that is not 1-D F32, of unequal d or with NaN/inf entries."""
    path = _existing_file(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError / struct errors on files that are not GGUF
        raise InputError(f"{path} is not a GGUF file: {err}") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != CONTROL_VECTOR_ARCH:
        raise InputError(f"{path} is not a control vector: its GGUF architecture is {arch!r}, not "
                         f"{CONTROL_VECTOR_ARCH!r} (a model file? pass the file written by export_control_vector, "
                         "repeng's export_gguf or llama.cpp's cvector-generator)")
    vectors, d = {}, None
    for tensor in reader.tensors:
        match = DIRECTION.fullmatch(tensor.name)
        if match is None:
            if tensor.name.startswith("direction."):
                raise InputError(f"{path}: tensor {tensor.name!r} is not named direction.<int>")
            continue
        values = np.asarray(tensor.data)
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or values.ndim != 1:
            raise InputError(f"{path}: tensor {tensor.name} must be 1-D F32 (as llama.cpp requires), got "
                             f"{tensor.tensor_type.name} of shape {values.shape}")
        d = _check_imported(path, tensor.name, values, d)
        vectors[steerjax_layer_from_peer(int(match.group(1)))] = np.array(values, np.float32)
    if not vectors:
        raise InputError(f"{path} holds no direction.<i> tensors")
    return dict(sorted(vectors.items()))


# ----------------------------------------------------------------------------- steering-vectors safetensors

def export_steering_vectors(path: str | os.PathLike, vectors: Mapping[int, Any], *,
                            num_layers: int | None = None) -> Path:
    """Write `vectors` {steerjax layer l: (d,)} as a safetensors file {str(l - 1): (d,) float32} for
    steering-vectors' `SteeringVector(layer_activations={int(k): torch.from_numpy(v) for k, v in
    safetensors.numpy.load_file(path).items()})` (layer_type "decoder_block"), with metadata naming the
    convention (`STEERING_VECTORS_METADATA`); return the path. Layers in [1, num_layers]; InputError as
    `export_control_vector`."""
    checked = _checked_vectors(vectors, num_layers, lowest=1)
    tensors = {str(peer_layer_from_steerjax(layer)): v for layer, v in checked.items()}
    metadata = {**STEERING_VECTORS_METADATA, "steerjax": __version__}
    return _atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=metadata))


def import_steering_vectors(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """{steerjax layer: (d,)} of a safetensors file of steering-vectors' decoder-block vectors {str(i): (d,)}:
    key i becomes h_(i+1). Float32 and float16 tensors come back as float32, float64 as float64. A file whose
    metadata names another layer_type (e.g. "mlp") is refused, as are keys that are not ints >= 0, tensors that are
    not 1-D floats, unequal d and NaN/inf entries (InputError)."""
    path = _existing_file(path)
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        tensors = safetensors.numpy.load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError / TypeError (e.g. bfloat16) on bad files
        raise InputError(f"cannot read {path} as a safetensors file of float tensors: {err}") from None
    layer_type = metadata.get("layer_type", "decoder_block")
    if layer_type != "decoder_block":
        raise InputError(f"{path} holds layer_type {layer_type!r} vectors; only 'decoder_block' (the block's "
                         "output, steerjax's h_(i+1)) is a residual-stream steer")
    if not tensors:
        raise InputError(f"{path} holds no tensors")
    vectors, d = {}, None
    for key in sorted(tensors, key=lambda k: (len(k), k)):
        if not re.fullmatch(r"\d+", key):
            raise InputError(f"{path}: key {key!r} is not a decoder-block index (an int >= 0 as text)")
        v = tensors[key]
        if v.ndim != 1 or v.size == 0 or not np.issubdtype(v.dtype, np.floating):
            raise InputError(f"{path}: tensor {key!r} must be a non-empty 1-D float vector, got shape {v.shape} and "
                             f"dtype {v.dtype}")
        d = _check_imported(path, repr(key), v, d)
        vectors[steerjax_layer_from_peer(int(key))] = v.astype(np.float64 if v.dtype == np.float64 else np.float32)
    return dict(sorted(vectors.items()))
