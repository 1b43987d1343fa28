"""Peer vector formats (steerjax/control_vectors.py): exact round trips, the file structure llama.cpp and repeng
read, and the layer convention: a vector written for steerjax's h_l, added the way the peer adds it (a forward
hook on the OUTPUT of block l - 1), is the same intervention as `Steer(layer=l, positions="all")`."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import safetensors.numpy

import steerjax as sj
from conftest import random_ids, rel_err
from hf_reference import hf_forward, hf_output_hook

# float32 logits of the same intervention by two implementations (steerjax vs transformers, 3 tiny blocks): the
# README's measured agreement is ~1e-6, so 1e-5 leaves rounding room and still separates a one-block shift (> 1e-2)
SAME_STEER_TOL = 1e-5
OTHER_BLOCK_MIN = 1e-2
D = 64


def random_vectors(layers, d: int = D, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.normal(size=d).astype(np.float32) for layer in layers}


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray], model_hint: str | None = "llama",
               layer_count: int | None = None):
    """A GGUF written the way repeng's ControlVector.export_gguf writes one (arch, model_hint, layer_count,
    tensors in the given order), with any architecture and tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    if model_hint is not None:
        writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- the layer convention

def test_layer_conversion_is_one_block_off_and_inverse():
    for layer in range(1, 40):
        assert sj.peer_layer_from_steerjax(layer) == layer - 1
        assert sj.steerjax_layer_from_peer(sj.peer_layer_from_steerjax(layer)) == layer
    assert sj.steerjax_layer_from_peer(np.int64(0)) == 1
    for bad in (0, -1, 1.0, True, "2"):
        with pytest.raises(sj.InputError, match="no peer index"):
            sj.peer_layer_from_steerjax(bad)
    for bad in (-1, 0.0, None):
        with pytest.raises(sj.InputError, match="must be an int >= 0"):
            sj.steerjax_layer_from_peer(bad)


@pytest.mark.parametrize("fmt", ["gguf", "safetensors"])
def test_an_exported_vector_is_the_same_intervention_in_the_peer(tiny_checkpoints, tmp_path, fmt):
    """Read the file as the peer does (GGUFReader's direction.N / safetensors key N), add the vector to the output
    of block N with a forward hook (repeng, steering-vectors, llama.cpp's build_cvec): the logits are steerjax's
    Steer(layer=l, positions="all"); the hook one block earlier or later is a different steer."""
    folder, hf_model = tiny_checkpoints["llama3_untied_gqa2"]
    lm = sj.load_model(folder)
    L = lm.num_layers
    ids = random_ids(np.random.default_rng(1), batch=2, length=7)
    plain, _, _ = hf_forward(hf_model, ids)
    layers = range(2 if fmt == "gguf" else 1, L + 1)                   # llama.cpp has no direction.0 (h_1)
    for layer, v in random_vectors(layers, lm.d, seed=3).items():
        path = tmp_path / f"v{layer}.{fmt}"
        if fmt == "gguf":
            sj.export_control_vector(path, {layer: v}, "llama", num_layers=L)
            (tensor,) = gguf.GGUFReader(str(path)).tensors
            block, peer_v = int(tensor.name.removeprefix("direction.")), np.asarray(tensor.data)
        else:
            sj.export_steering_vectors(path, {layer: v}, num_layers=L)
            ((key, peer_v),) = safetensors.numpy.load_file(path).items()
            block = int(key)
        ours = np.asarray(lm.forward(ids, steer=sj.Steer(layer=layer, vector=v, alpha=1.0, positions="all")).logits)
        with hf_output_hook(hf_model, block, peer_v):
            theirs, _, _ = hf_forward(hf_model, ids)
        assert rel_err(ours, theirs) <= SAME_STEER_TOL, (layer, block)
        assert rel_err(theirs, plain) > OTHER_BLOCK_MIN                  # the steer moved the logits
        for other in {block - 1, block + 1} & set(range(L)):
            with hf_output_hook(hf_model, other, peer_v):
                shifted, _, _ = hf_forward(hf_model, ids)
            assert rel_err(ours, shifted) > OTHER_BLOCK_MIN, (layer, other)


# ----------------------------------------------------------------------------- llama.cpp / repeng GGUF

def test_control_vector_round_trip_is_bit_exact(tmp_path):
    vectors = random_vectors((30, 2, 7, 3), d=576)
    path = sj.export_control_vector(tmp_path / "sub" / "v.gguf", vectors, "llama")
    back = sj.import_control_vector(path)
    assert list(back) == [2, 3, 7, 30]
    for layer, v in vectors.items():
        assert back[layer].dtype == np.float32 and back[layer].tobytes() == v.tobytes()
    wide = {4: np.random.default_rng(1).normal(size=576)}             # float64 in: written as its float32 rounding
    back = sj.import_control_vector(sj.export_control_vector(tmp_path / "w.gguf", wide))
    np.testing.assert_array_equal(back[4], wide[4].astype(np.float32))
    assert not list(tmp_path.rglob("*.tmp"))


def test_control_vector_file_has_repeng_and_llama_cpp_structure(tmp_path):
    """repeng's export_gguf layout, which llama.cpp's common_control_vector_load reads: architecture
    "controlvector", model_hint (str), layer_count (uint32), one 1-D F32 tensor direction.{i} of d per layer."""
    vectors = random_vectors((5, 2, 9))
    reader = gguf.GGUFReader(str(sj.export_control_vector(tmp_path / "v.gguf", vectors, "qwen2")))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(fields) == {"general.architecture", "controlvector.model_hint", "controlvector.layer_count"}
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].types == [gguf.GGUFValueType.STRING]
    assert fields["controlvector.model_hint"].contents() == "qwen2"
    assert fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["controlvector.layer_count"].contents() == 3
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.4", "direction.8"}
    for layer, v in vectors.items():
        t = tensors[f"direction.{layer - 1}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.shape.tolist() == [D] and t.n_elements == D
        assert t.data.tobytes() == v.tobytes()


def test_import_reads_repeng_and_llama_cpp_files(tmp_path):
    """repeng may write direction.0 (block 0's output, h_1); llama.cpp's cvector-generator writes an int32
    layer_count; tensors other than direction.<i> are skipped as both peers skip them."""
    v = random_vectors((0, 1, 5))
    repeng = write_gguf(tmp_path / "repeng.gguf", "controlvector", {f"direction.{i}": v[i] for i in v})
    back = sj.import_control_vector(repeng)
    assert list(back) == [1, 2, 6] and all(back[i + 1].tobytes() == v[i].tobytes() for i in v)
    writer = gguf.GGUFWriter(str(tmp_path / "cvgen.gguf"), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", 2)
    writer.add_tensor("direction.1", v[1])
    writer.add_tensor("extra", v[5])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert list(sj.import_control_vector(tmp_path / "cvgen.gguf")) == [2]


# ----------------------------------------------------------------------------- steering-vectors safetensors

def test_steering_vectors_round_trip_and_metadata(tmp_path):
    vectors = random_vectors((1, 12, 4))
    path = sj.export_steering_vectors(tmp_path / "v.safetensors", vectors)
    raw = safetensors.numpy.load_file(path)
    assert set(raw) == {"0", "11", "3"} and all(raw[k].dtype == np.float32 and raw[k].shape == (D,) for k in raw)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["layer_type"] == "decoder_block" and "h_(i+1)" in meta["layer_convention"]
    back = sj.import_steering_vectors(path)
    assert list(back) == [1, 4, 12]
    for layer, v in vectors.items():
        assert back[layer].dtype == np.float32 and back[layer].tobytes() == v.tobytes()
    # a plain {str(i): tensor} file as torch users save one (no metadata, float16) reads as decoder blocks
    safetensors.numpy.save_file({"2": vectors[1].astype(np.float16)}, tmp_path / "plain.safetensors")
    back = sj.import_steering_vectors(tmp_path / "plain.safetensors")
    assert list(back) == [3] and back[3].dtype == np.float32
    np.testing.assert_array_equal(back[3], vectors[1].astype(np.float16))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("vectors, kwargs, message", [
    ({}, {}, "non-empty dict"),
    ([np.ones(D)], {}, "non-empty dict"),
    ({0: np.ones(D)}, {}, r"layer 0 is outside \[2, L\]: h_0"),
    ({1: np.ones(D)}, {}, "direction.0 .* llama.cpp refuses"),
    ({-2: np.ones(D)}, {}, "count from 0"),
    ({2.0: np.ones(D)}, {}, "ints"),
    ({4: np.ones(D)}, {"num_layers": 3}, r"outside \[2, 3\]: the model has 3 blocks"),
    ({2: np.ones(D)}, {"num_layers": 0}, "num_layers must be an int >= 1"),
    ({2: np.ones((2, D))}, {}, r"1-D real array \(d,\), got shape \(2, 64\)"),
    ({2: np.ones(0)}, {}, "non-empty 1-D"),
    ({2: np.array(["a", "b"])}, {}, "dtype <U1"),
    ({2: np.ones(D), 3: np.ones(D + 1)}, {}, "layer 3 has d = 65, the others d = 64"),
    ({2: np.r_[np.nan, np.ones(3)]}, {}, "1 NaN/inf"),
    ({2: np.r_[1e39, np.ones(3)]}, {}, "NaN/inf entries in float32"),
])
def test_export_rejects_bad_vectors(tmp_path, vectors, kwargs, message):
    with pytest.raises(sj.InputError, match=message):
        sj.export_control_vector(tmp_path / "v.gguf", vectors, **kwargs)
    assert not list(tmp_path.iterdir())
    if "llama.cpp" not in message and "[2, " not in message:
        with pytest.raises(sj.InputError, match=message.replace(r"\[2, ", r"\[1, ")):
            sj.export_steering_vectors(tmp_path / "v.safetensors", vectors, **kwargs)


def test_export_rejects_a_folder_and_a_bad_hint(tmp_path):
    with pytest.raises(sj.InputError, match="is a folder"):
        sj.export_control_vector(tmp_path, {2: np.ones(D)})
    with pytest.raises(sj.InputError, match="model_hint must be a str"):
        sj.export_control_vector(tmp_path / "v.gguf", {2: np.ones(D)}, model_hint=None)
    assert sj.export_steering_vectors(tmp_path / "ok.safetensors", {1: np.ones(D)}).is_file()  # layer 1 is fine here


def test_import_control_vector_rejects_bad_files(tmp_path):
    one = np.ones(D, np.float32)
    cases = {
        "missing.gguf": (None, "no such file"),
        "text.gguf": (lambda p: p.write_text("not a gguf"), "not a GGUF file"),
        "model.gguf": (lambda p: write_gguf(p, "llama", {"token_embd.weight": one}), "architecture is 'llama'"),
        "empty.gguf": (lambda p: write_gguf(p, "controlvector", {}), "no direction"),
        "name.gguf": (lambda p: write_gguf(p, "controlvector", {"direction.x": one}), "direction.<int>"),
        "f16.gguf": (lambda p: write_gguf(p, "controlvector", {"direction.1": one.astype(np.float16)}), "1-D F32"),
        "2d.gguf": (lambda p: write_gguf(p, "controlvector", {"direction.1": np.ones((2, 4), np.float32)}),
                    "1-D F32"),
        "ragged.gguf": (lambda p: write_gguf(p, "controlvector", {"direction.1": one, "direction.2": one[:5]}),
                        "d = 5, the others d = 64"),
        "nan.gguf": (lambda p: write_gguf(p, "controlvector", {"direction.1": np.r_[np.nan, one].astype(np.float32)}),
                     "1 NaN/inf"),
    }
    for name, (make, message) in cases.items():
        path = tmp_path / name
        if make is not None:
            make(path)
        with pytest.raises(sj.InputError, match=message):
            sj.import_control_vector(path)


def test_import_steering_vectors_rejects_bad_files(tmp_path):
    one = np.ones(D, np.float32)
    save = safetensors.numpy.save_file
    cases = {
        "text": (lambda p: p.write_text("not safetensors"), "cannot read"),
        "mlp": (lambda p: save({"1": one}, p, metadata={"layer_type": "mlp"}), "layer_type 'mlp'"),
        "key": (lambda p: save({"layer.1": one}, p), "key 'layer.1' is not a decoder-block index"),
        "2d": (lambda p: save({"1": np.ones((2, 3), np.float32)}, p), "1-D float"),
        "int": (lambda p: save({"1": np.ones(3, np.int32)}, p), "1-D float"),
        "ragged": (lambda p: save({"1": one, "2": one[:3]}, p), "d = 3, the others d = 64"),
        "nan": (lambda p: save({"1": np.r_[np.inf, one]}, p), "1 NaN/inf"),
        "empty": (lambda p: save({}, p), "no tensors"),
    }
    for name, (make, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        make(path)
        with pytest.raises(sj.InputError, match=message):
            sj.import_steering_vectors(path)
    with pytest.raises(sj.InputError, match="no such file"):
        sj.import_steering_vectors(tmp_path / "missing.safetensors")
