"""Bad input ends in a steerjax error whose message names the problem (never a deep JAX traceback)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import steerjax as sj
from conftest import build_hf_model
from gguf_writer import write_gguf


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    folder, _ = tiny_checkpoints["llama3_untied_gqa2"]
    return folder, sj.load_model(folder)


def copy_checkpoint(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def test_missing_folder(tmp_path):
    with pytest.raises(sj.ModelNotFoundError, match="model folder not found"):
        sj.load_model(tmp_path / "nope" / "model")
    with pytest.raises(sj.ModelNotFoundError, match="GGUF file not found"):
        sj.load_model(tmp_path / "absent.gguf")


def test_folder_without_config_or_weights(tmp_path, tiny):
    with pytest.raises(sj.ModelNotFoundError, match="no config.json"):
        sj.load_model(tmp_path)
    folder = copy_checkpoint(tiny[0], tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(sj.WeightError, match="never unpickles"):
        sj.load_model(folder)


def test_unsupported_model_type(tmp_path, tiny):
    folder = copy_checkpoint(tiny[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sj.UnsupportedModelError, match="unsupported model_type 'gpt2'"):
        sj.load_model(folder)


def test_unsupported_rope_scaling(tmp_path, tiny):
    folder = copy_checkpoint(tiny[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sj.UnsupportedModelError, match="rope scaling type 'yarn'"):
        sj.load_model(folder)


def test_missing_weight_tensors(tmp_path, tiny):
    folder = copy_checkpoint(tiny[0], tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"], state["lm_head.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(sj.WeightError, match="missing 2 weight tensor.*model.layers.1.mlp.up_proj.weight"):
        sj.load_model(folder)


def test_config_weight_shape_mismatch(tmp_path, tiny):
    folder = copy_checkpoint(tiny[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sj.WeightError, match=r"mlp.gate_proj.weight: checkpoint \(96, 64\) vs config \(128, 64\)"):
        sj.load_model(folder)


def test_truncated_safetensors(tmp_path, tiny):
    folder = copy_checkpoint(tiny[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(sj.WeightError, match="cannot read safetensors file"):
        sj.load_model(folder)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(build_hf_model("qwen2_tied_gqa1"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(sj.WeightError, match="cannot read GGUF file"):
        sj.load_model(path)


@pytest.mark.parametrize("layer", [-1, 4, 100])
def test_layer_out_of_range(tiny, layer):
    lm = tiny[1]
    with pytest.raises(sj.SteeringError, match=rf"layer {layer} is outside \[0, 3\]"):
        lm.forward(np.arange(1, 5), steer=sj.Steer(layer=layer, vector=np.ones(lm.d)))


def test_vector_wrong_shape(tiny):
    lm = tiny[1]
    with pytest.raises(sj.SteeringError, match=r"shape \(65,\), the model needs \(64,\)"):
        lm.forward(np.arange(1, 5), steer=sj.Steer(layer=1, vector=np.ones(65)))
    with pytest.raises(sj.SteeringError, match=r"must be a numeric array \(d,\) or one per row \(B, d\)"):
        sj.Steer(layer=1, vector=np.ones((2, 2, 64)))
    with pytest.raises(sj.SteeringError, match="give 3 rows; the batch has 1"):
        lm.forward(np.arange(1, 5), steer=sj.Steer(layer=1, vector=np.ones((3, 64))))


def test_non_finite_vector_or_alpha():
    v = np.ones(64)
    v[3] = np.nan
    with pytest.raises(sj.SteeringError, match="1 NaN/inf entries"):
        sj.Steer(layer=1, vector=v)
    with pytest.raises(sj.SteeringError, match="alpha must be finite"):
        sj.Steer(layer=1, vector=np.ones(64), alpha=float("inf"))
    with pytest.raises(sj.SteeringError, match="unknown steering positions 'first'"):
        sj.Steer(layer=1, vector=np.ones(64), positions="first")
    # negative alpha is valid: it steers the other way
    assert sj.Steer(layer=1, vector=np.ones(64), alpha=-3.0).alpha == -3.0


def test_bad_token_ids(tiny):
    lm = tiny[1]
    with pytest.raises(sj.InputError, match=r"token ids must lie in \[0, 160\)"):
        lm.forward(np.array([1, 2, 500]))
    with pytest.raises(sj.InputError, match="must be integers"):
        lm.forward(np.array([1.0, 2.0]))
    with pytest.raises(sj.InputError, match="exceeds the model's context of 64"):
        lm.forward(np.ones(65, np.int32))
    with pytest.raises(sj.InputError, match="left-padded"):
        lm.forward(np.ones((1, 4), np.int32), attention_mask=np.array([[1, 1, 1, 0]]))
    with pytest.raises(sj.InputError, match="no tokenizer files"):
        lm.tokenize(["hello"])


def test_unknown_dtype(tiny):
    with pytest.raises(sj.SteerjaxError, match="unsupported dtype 'float16'"):
        sj.load_model(tiny[0], dtype="float16")
