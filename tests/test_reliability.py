"""Reliability (issue 8): every bad input of the API and of every experiment CLI ends in one line
`error: ...` naming the problem and a non-zero exit code, with no traceback and no result file; killed runs
resume without recomputing finished units; same-seed runs agree; loading never unpickles or goes online.

In-process `main(argv)` on a tiny checkpoint with a character tokenizer where a model is needed (fast); a few
real subprocesses pin the exit codes and stderr a user sees. The SIGKILL tests run the scripts for real (slow)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import steerjax as sj
from conftest import build_hf_model, load_experiment
from gguf_writer import write_gguf
from steerjax import io

ROOT = Path(__file__).resolve().parents[1]
MODEL_CLIS = ("nullspace", "orthogonal", "scale_invariance", "environments", "logit_equivalence",
              "fisher_cramer_rao", "recovery", "linearization")
ALL_CLIS = (*MODEL_CLIS, "report")
LAYER_FLAGS = {"nullspace": "--layers", "fisher_cramer_rao": "--layer", "recovery": "--layer",
               "linearization": "--layer"}  # the rest steer at --read-layer (+ the protocol's offset)


# ----------------------------------------------------------------------------- helpers

def call_main(name: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of experiments/<name>.py's main(argv), argparse exits included."""
    try:
        code = load_experiment(name).main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err: str, *needles: str) -> None:
    """Non-zero exit, no traceback, and stderr ends in one `error:` line that contains every needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def assert_no_results(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.suffix in (".json", ".csv", ".png")], list(folder.rglob("*"))


def _forbidden(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} called while loading a model")
    return fail


class _NoUnpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        raise AssertionError("pickle.Unpickler used while loading a model")


def out_args(name: str, folder: Path) -> list[str]:
    return [str(folder)] if name == "report" else ["--out", str(folder)]


def run_script(name: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *argv], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, tuple[Path, type, str]]:
    """name -> (model spec, error class, message fragment) for checkpoints that must not load."""
    from safetensors.numpy import load_file

    root = tmp_path_factory.mktemp("broken")
    model = build_hf_model("qwen2_tied_gqa1")
    good = root / "good"
    model.save_pretrained(good)
    out = {"nonexistent folder": (root / "nope" / "model", sj.ModelNotFoundError, "model folder not found"),
           "nonexistent gguf": (root / "absent.gguf", sj.ModelNotFoundError, "GGUF file not found"),
           "model id not in the cache": ("nobody/no-such-model", sj.ModelNotFoundError, "never downloads")}

    def variant(name: str) -> Path:
        folder = root / name.replace(" ", "_")
        shutil.copytree(good, folder)
        return folder

    def edit_config(folder: Path, **changes) -> Path:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    empty = root / "empty"
    empty.mkdir()
    out["folder without config.json"] = (empty, sj.ModelNotFoundError, "no config.json")
    folder = variant("truncated safetensors")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated safetensors"] = (folder, sj.WeightError, "cannot read safetensors file")
    folder = variant("empty safetensors")
    (folder / "model.safetensors").write_bytes(b"")
    out["empty safetensors"] = (folder, sj.WeightError, "cannot read safetensors file")
    folder = variant("hidden size mismatch")
    out["config hidden_size vs weights"] = (edit_config(folder, hidden_size=128), sj.WeightError,
                                            "weight shapes do not match config.json")
    folder = variant("unknown model type")
    out["unknown model_type"] = (edit_config(folder, model_type="mamba"), sj.UnsupportedModelError,
                                 "unsupported model_type 'mamba'")
    folder = variant("malformed config")
    (folder / "config.json").write_text('{"model_type": "qwen2", ')
    out["malformed config.json"] = (folder, sj.UnsupportedModelError, "not valid JSON")
    folder = variant("pickle only")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({k: v.tolist() for k, v in list(state.items())[:1]}, f)
    out["only pytorch_model.bin"] = (folder, sj.WeightError, "never unpickles")

    path = root / "tiny.gguf"
    write_gguf(model, path)
    blob = path.read_bytes()
    (root / "truncated.gguf").write_bytes(blob[: len(blob) // 3])
    out["truncated gguf"] = (root / "truncated.gguf", sj.WeightError, "cannot read GGUF file")
    (root / "garbage.gguf").write_bytes(b"this is not a gguf file " * 8)
    out["not a gguf"] = (root / "garbage.gguf", sj.WeightError, "GGUF magic invalid")
    out["unknown gguf architecture"] = (stub_gguf(root / "gpt2.gguf", "gpt2"), sj.UnsupportedModelError,
                                        "unsupported GGUF architecture 'gpt2'")
    out["gguf without metadata"] = (stub_gguf(root / "bare.gguf", "llama"), sj.WeightError, "lacks required metadata")
    out["_good"] = (good, None, "")
    return out


def stub_gguf(path: Path, arch: str) -> Path:
    """A valid GGUF container with an embedding tensor and no model metadata."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    """A tiny Qwen2 folder (3 blocks, d = 64) with a character-level tokenizer (100 ids < its vocab of 160), so
    the CLIs run on it end to end in seconds."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_tok")
    build_hf_model("qwen2_tied_gqa1").save_pretrained(folder)
    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>").save_pretrained(folder)
    return folder


BROKEN = ("nonexistent folder", "nonexistent gguf", "model id not in the cache", "folder without config.json",
          "truncated safetensors", "empty safetensors", "config hidden_size vs weights", "unknown model_type",
          "malformed config.json", "only pytorch_model.bin", "truncated gguf", "not a gguf",
          "unknown gguf architecture", "gguf without metadata")


# ----------------------------------------------------------------------------- (i) bad flags, every CLI

@pytest.mark.parametrize("name", ALL_CLIS)
def test_unknown_flag(name, tmp_path, capsys):
    code, err = call_main(name, [*out_args(name, tmp_path), "--no-such-flag"], capsys)
    assert code == 2
    assert_one_line_error(code, err, "unrecognized arguments: --no-such-flag")
    assert_no_results(tmp_path)


@pytest.mark.parametrize("name", MODEL_CLIS)
def test_non_integer_flag_value(name, tmp_path, capsys):
    code, err = call_main(name, ["--seed", "one", *out_args(name, tmp_path)], capsys)
    assert_one_line_error(code, err, "--seed", "invalid int value: 'one'")


@pytest.mark.parametrize("name", MODEL_CLIS)
def test_out_is_a_file(name, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, err = call_main(name, ["--out", str(target)], capsys)
    assert_one_line_error(code, err, f"--out {target} is a file")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("name", MODEL_CLIS)
@pytest.mark.parametrize("model", ["nonexistent folder", "truncated gguf", "only pytorch_model.bin"])
def test_bad_model(name, model, broken_models, tmp_path, capsys):
    spec, _, message = broken_models[model]
    code, err = call_main(name, ["--model", str(spec), "--out", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(code, err, message)
    assert_no_results(tmp_path)


@pytest.mark.parametrize("name", MODEL_CLIS)
@pytest.mark.parametrize("layer", ["4", "-1"])
def test_layer_out_of_range(name, layer, tiny_with_tokenizer, tmp_path, capsys):
    flag = LAYER_FLAGS.get(name, "--read-layer")
    code, err = call_main(name, ["--model", str(tiny_with_tokenizer), f"{flag}={layer}", "--out", str(tmp_path)],
                          capsys)
    assert code == 2
    assert_one_line_error(code, err, layer, "outside [0, 3]")
    assert_no_results(tmp_path)


@pytest.mark.parametrize("name, argv, flag", [
    ("orthogonal", ["--alpha", "nan"], "--alpha"), ("orthogonal", ["--alpha", "inf"], "--alpha"),
    ("environments", ["--alpha", "nan"], "--alpha"), ("environments", ["--alpha", "-inf"], "--alpha"),
    ("scale_invariance", ["--alphas", "0,nan"], "--alphas"), ("scale_invariance", ["--alphas", "1,inf"], "--alphas"),
    ("logit_equivalence", ["--alphas", "nan"], "--alphas"), ("logit_equivalence", ["--alphas", "1,-inf"], "--alphas"),
    ("linearization", ["--a-max", "inf"], "--a-max"), ("fisher_cramer_rao", ["--sigma", "nan"], "--sigma"),
    ("recovery", ["--v-scale", "nan"], "--v-scale"),
])
def test_non_finite_strength(name, argv, flag, tmp_path, capsys):
    code, err = call_main(name, [*argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(code, err, flag)


@pytest.mark.parametrize("name, argv", [
    ("orthogonal", ["--alpha", "-2"]), ("environments", ["--alpha", "-0.5"]),
    ("scale_invariance", ["--alphas=-2,-1,0,1"]), ("logit_equivalence", ["--alphas=-1,1"]),
])
def test_negative_alpha_is_valid(name, argv):
    args = load_experiment(name).parse_args(argv)
    strengths = args.alphas if hasattr(args, "alphas") else [args.alpha]
    assert min(strengths) < 0


@pytest.mark.parametrize("name", MODEL_CLIS[1:])
def test_unknown_trait(name, tmp_path, capsys):
    flag = "--trait" if name in LAYER_FLAGS else "--traits"
    code, err = call_main(name, [flag, "formality,sarcasm" if flag == "--traits" else "sarcasm",
                                 "--out", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_error(code, err, "sarcasm", "formality")  # names the bad trait and the valid ones


def test_report_without_results(tmp_path, capsys):
    code, err = call_main("report", [str(tmp_path)], capsys)
    assert_one_line_error(code, err, "holds none of orthogonal.json")


@pytest.mark.parametrize("name, argv, message", [
    ("nullspace", ["--model", "/nonexistent/model"], "model folder not found: /nonexistent/model"),
    ("orthogonal", ["--alpha", "nan"], "--alpha must be finite"),
    ("report", ["/nonexistent/folder"], "holds none of"),
])
def test_subprocess_exit_code_and_stderr(name, argv, message, tmp_path):
    proc = run_script(name, *argv, *([] if name == "report" else ["--out", str(tmp_path)]), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, message)
    assert_no_results(tmp_path)


# ----------------------------------------------------------------------------- (ii) broken models

@pytest.mark.parametrize("case", BROKEN)
def test_broken_model_raises_a_named_error(case, broken_models, monkeypatch):
    monkeypatch.setattr(pickle, "load", _forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "loads", _forbidden("pickle.loads"))
    if "torch" in sys.modules:
        monkeypatch.setattr(sys.modules["torch"], "load", _forbidden("torch.load"))
    spec, error, message = broken_models[case]
    with pytest.raises(error, match=re.escape(message)):
        sj.load_model(spec)


def test_the_intact_copy_loads(broken_models):
    """The broken variants fail because of their one defect, not the base checkpoint."""
    lm = sj.load_model(broken_models["_good"][0])
    assert lm.d == 64 and np.isfinite(np.asarray(lm.forward(np.arange(1, 6)).logits)).all()


# ----------------------------------------------------------------------------- (iii) prompt files

LONG_PROMPT = "x" * 65  # 65 tokens of the character tokenizer: more than the tiny model's context of 64


@pytest.mark.parametrize("filename, content, message", [
    ("empty.txt", "", "holds no prompts"),
    ("blank.txt", "\n   \n\t\n", "holds no prompts"),
    ("empty.json", "[]", "holds no prompts"),
    ("malformed.json", '{"prompts": ["a", ', "is not valid JSON"),
    ("wrong_type.json", '{"prompts": 3}', "must hold a list of strings"),
    ("numbers.json", "[1, 2]", "must hold a list of strings"),
    ("binary.txt", b"\xff\xfe\x00\x81 prompts", "is not UTF-8 text"),
    ("long.txt", "a short prompt\n<LONG>\n", "prompt 1 has"),
    ("missing.txt", None, "prompt file not found"),
])
def test_bad_prompt_file(filename, content, message, tiny_with_tokenizer, tmp_path, capsys):
    path = tmp_path / filename
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content.replace("<LONG>", LONG_PROMPT))
    out = tmp_path / "out"
    argv = ["--model", str(tiny_with_tokenizer), "--prompts", str(path), "--layers", "3", "--out", str(out)]
    code, err = call_main("nullspace", argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, message)
    assert not out.exists()


# ----------------------------------------------------------------------------- API

@pytest.fixture(scope="module")
def tiny_lm(tiny_with_tokenizer):
    return sj.load_model(tiny_with_tokenizer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(vector=np.zeros(64)), "zero norm.*pass steer=None"),
    (dict(vector=np.ones(64), alpha=float("nan")), "alpha must be finite"),
    (dict(vector=np.ones(64), alpha=float("inf")), "alpha must be finite"),
    (dict(vector=np.full(64, np.inf)), "64 NaN/inf entries"),
    (dict(vector=np.ones((1, 1, 64))), r"numeric array \(d,\) or one per row \(B, d\)"),
    (dict(vector=np.zeros((0, 64))), r"numeric array \(d,\) or one per row \(B, d\)"),
    (dict(vector=np.array(["a"] * 64)), r"numeric array \(d,\) or one per row \(B, d\)"),
])
def test_steer_rejects_bad_vectors(kwargs, message):
    with pytest.raises(sj.SteeringError, match=message):
        sj.Steer(layer=1, **kwargs)


def test_steer_checks_the_model(tiny_lm):
    ids = np.arange(2, 8)
    with pytest.raises(sj.SteeringError, match=r"shape \(65,\), the model needs \(64,\)"):
        tiny_lm.forward(ids, steer=sj.Steer(layer=1, vector=np.ones(65)))
    with pytest.raises(sj.SteeringError, match=r"layer 4 is outside \[0, 3\]"):
        tiny_lm.forward(ids, steer=sj.Steer(layer=4, vector=np.ones(64)))
    # negative alpha is valid: it steers the other way
    base = np.asarray(tiny_lm.forward(ids).logits)
    steered = np.asarray(tiny_lm.forward(ids, steer=sj.Steer(layer=1, vector=np.ones(64), alpha=-0.5)).logits)
    assert np.isfinite(steered).all() and not np.allclose(steered, base)


def test_extract_vector_rejects_a_zero_result(tiny_lm):
    prompts = ["The weather today is", "Please describe the city"]
    with pytest.raises(sj.SteeringError, match="extracted vector at layer 2 is zero"):
        sj.extract_vector(tiny_lm, prompts, prompts, layer=2)
    with pytest.raises(sj.SteeringError, match="is zero"):                 # same last token: h_0 agrees
        sj.extract_vector(tiny_lm, ["I am happy."], ["I am sad."], layer=0)
    v = sj.extract_vector(tiny_lm, ["I am happy."], ["I am sad."], layer=2)  # different prompts: fine
    assert np.linalg.norm(v) > 1e-3


def test_tokenize_rejects_empty_and_overlong_prompts(tiny_lm):
    with pytest.raises(sj.InputError, match="empty"):
        tiny_lm.tokenize([])
    with pytest.raises(sj.InputError, match=r"prompt\(s\) \[1\] are empty"):
        tiny_lm.tokenize(["fine", "  "])
    with pytest.raises(sj.InputError, match="prompt 1 has 65 tokens, more than the model's context of 64"):
        tiny_lm.tokenize(["fine", LONG_PROMPT])
    with pytest.raises(sj.InputError, match="exceeds the model's context of 64"):
        tiny_lm.forward(np.ones(65, np.int32))
    assert tiny_lm.tokenize(["x" * 64]).ids.shape == (1, 64)                # the context itself is fine


# ----------------------------------------------------------------------------- (3) determinism, metadata

def test_same_seed_same_json_and_metadata(tiny_with_tokenizer, tmp_path):
    cli = load_experiment("nullspace")
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        argv = ["--model", str(tiny_with_tokenizer), "--layers", "1,3", "--n-prompts", "3", "--seed", seed]
        assert cli.main([*argv, "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "nullspace.json").read_text())
    assert runs["a"]["meta"]["started"] and runs["a"]["layers"][0]["seconds"] > 0   # what strip_volatile drops
    assert io.strip_volatile(runs["a"]) == io.strip_volatile(runs["b"])
    # the seed reaches the numbers (random v_perp of the null-fraction estimate), not only the settings
    assert io.strip_volatile(runs["a"]["layers"]) != io.strip_volatile(runs["c"]["layers"])
    meta = runs["a"]["meta"]
    assert meta["seeds"] == {"seed": 0} and runs["c"]["meta"]["seeds"] == {"seed": 1}
    files = {name: io.file_sha256(tiny_with_tokenizer / name) for name in ("config.json", "model.safetensors")}
    assert meta["model"]["files_sha256"] == files and len(meta["model"]["sha256"]) == 64
    assert meta["model"]["config"]["hidden_size"] == 64 and meta["model"]["source"] == str(tiny_with_tokenizer)
    for key in ("steerjax", "jax", "flax", "numpy", "python", "x64", "backend"):
        assert key in meta
    assert meta["decode"]["paths_run"] is None            # the geometry study generates nothing


def test_every_script_records_model_and_seeds():
    """Static guard: every experiment records run_metadata(lm, seeds=...) (a bare run_metadata() once lost
    the model hash and seeds)."""
    for script in MODEL_CLIS:
        text = (ROOT / "experiments" / f"{script}.py").read_text()
        assert "run_metadata(lm, seeds=" in text and "run_metadata()" not in text, script
        assert "cli.ArgumentParser(" in text or "= ArgumentParser(" in text, script


# ----------------------------------------------------------------------------- (v) no pickle, no network

def test_loading_never_unpickles_or_connects(monkeypatch, broken_models):
    torch = pytest.importorskip("torch")
    import transformers

    for module, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (np, "load"),
                         (socket.socket, "connect"), (socket.socket, "connect_ex"),
                         (socket, "create_connection"), (socket, "getaddrinfo")):
        monkeypatch.setattr(module, attr, _forbidden(f"{getattr(module, '__name__', module)}.{attr}"))
    monkeypatch.setattr(pickle, "Unpickler", _NoUnpickler)
    calls = []
    original = transformers.AutoTokenizer.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(recording))
    tiny = sj.load_model(broken_models["_good"][0])
    assert np.isfinite(np.asarray(tiny.forward(np.arange(1, 6)).logits)).all()
    lm = sj.load_model(None)                                          # the embedded GGUF, and its tokenizer
    logits = np.asarray(lm.forward(lm.tokenize(["The capital of France is"])).logits)
    assert np.isfinite(logits).all() and logits.shape[-1] == lm.config.vocab_size
    assert calls and all(c.get("local_files_only") and not c.get("trust_remote_code") for c in calls)
    from steerjax.models.loading import default_model_path

    path = default_model_path()
    assert io.model_identity(lm)["files_sha256"] == {path.name: io.file_sha256(path)}
    with pytest.raises(sj.ModelNotFoundError, match="never downloads"):
        sj.load_model("HuggingFaceTB/not-in-this-cache")            # a model id: cache lookup only, offline


# ----------------------------------------------------------------------------- (2) SIGKILL and resume

def run_until(argv: list[str], ready, log: Path, timeout: float = 600) -> None:
    """Start a script, SIGKILL it as soon as `ready()` holds; fail if it finished first or timed out."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.time() + timeout
        try:
            while not ready():
                assert proc.poll() is None, f"finished before it could be killed: {log.read_text()[-2000:]}"
                assert time.time() < deadline, "timed out"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def _json_or_none(path: Path):
    """The parsed file, or None before it exists. A half-written file (no atomic write) fails the test."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_nullspace_resumes_after_sigkill(tiny_with_tokenizer, tmp_path):
    """A fresh process compiles each layer's tail (seconds), so the kill lands between layers."""
    script = str(ROOT / "experiments" / "nullspace.py")
    common = ["--model", str(tiny_with_tokenizer), "--layers", "all", "--n-prompts", "3"]
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    path = killed / "nullspace.json"
    run_until([script, *common, "--out", str(killed)],
              lambda: (r := _json_or_none(path)) is not None and len(r["layers"]) >= 1, tmp_path / "kill.log")
    partial = json.loads(path.read_text())
    done = [e["layer"] for e in partial["layers"]]
    assert not partial["complete"] and done == list(range(len(done))) and len(done) < 4
    proc = run_script("nullspace", *common, "--out", str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: {len(done)} finished layer(s)" in proc.stderr
    resumed = json.loads(path.read_text())
    assert resumed["complete"] and [e["layer"] for e in resumed["layers"]] == [0, 1, 2, 3]   # no duplicates
    assert resumed["layers"][: len(done)] == partial["layers"]       # kept as written, timings too: not redone
    proc = run_script("nullspace", *common, "--out", str(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads((ref / "nullspace.json").read_text())
    assert io.strip_volatile(resumed) == io.strip_volatile(reference)
    assert resumed["meta"]["seeds"] == {"seed": 0}
    assert resumed["meta"]["model"]["sha256"] == reference["meta"]["model"]["sha256"] is not None


@pytest.mark.slow
def test_orthogonal_resumes_after_sigkill(tmp_path):
    script = str(ROOT / "experiments" / "orthogonal.py")
    common = ["--quick", "--traits", "formality", "--seeds", "2", "--n-prompts", "2", "--samples", "2",
              "--max-new-tokens", "8"]
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    units_path = killed / "orthogonal_units.json"
    run_until([script, *common, "--out", str(killed)],
              lambda: (u := _json_or_none(units_path)) is not None and len(u["units"]) >= 2, tmp_path / "kill.log")
    partial = json.loads(units_path.read_text())
    done = len(partial["units"])
    assert 2 <= done < 7 and not (killed / "orthogonal.json").exists()   # no summary that looks finished
    proc = run_script("orthogonal", *common, "--out", str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: {done} of 7 conditions" in proc.stderr
    units = json.loads(units_path.read_text())
    assert len(units["units"]) == 7
    assert {k: units["units"][k] for k in partial["units"]} == partial["units"]   # seconds too: not regenerated
    proc = run_script("orthogonal", *common, "--out", str(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("orthogonal.json", "orthogonal_units.json"):
        resumed, reference = (json.loads((folder / name).read_text()) for folder in (killed, ref))
        assert io.strip_volatile(resumed) == io.strip_volatile(reference), name
    meta = json.loads((killed / "orthogonal.json").read_text())["meta"]
    assert meta["seeds"] == {"seed": 0, "seeds": 2} and len(meta["model"]["sha256"]) == 64
