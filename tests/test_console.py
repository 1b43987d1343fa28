"""The `steerjax` command (steerjax/console.py), called in-process through console.main (an install would repoint
the shared environment): the pyproject entry point, help of the console and of every sub-command, a run of an
experiment on the embedded model, `info` against the checkpoint's config, and the errors (exit code 2)."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import jax
import pytest

import steerjax as sj
from conftest import build_hf_model
from steerjax import console

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (*console.EXPERIMENTS, "info")


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of console.main(argv), argparse's SystemExit included."""
    try:
        code = console.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pyproject_declares_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"steerjax": "steerjax.console:main"}
    module, attr = scripts["steerjax"].split(":")
    assert getattr(sys.modules[module], attr) is console.main


def test_there_is_one_command_per_experiment_script():
    assert sorted(console.EXPERIMENTS) == sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
    assert console.experiments_folder() == ROOT / "experiments"        # found next to the package (editable layout)


def test_console_help_lists_every_command_with_its_summary(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0 and out.startswith("usage: steerjax <command>")
    for name in console.EXPERIMENTS:
        summary = console.script_summary(ROOT / "experiments" / f"{name}.py")
        assert f"  {name}  " in out and summary.split()[0] in out, name
    assert "Main job: exact null-space geometry" in out and "  info  " in out
    code, out, err = call([], capsys)                                    # no command: the same text, exit 2
    assert code == 2 and err.startswith("usage: steerjax") and out == ""
    assert call(["--version"], capsys)[:2] == (0, f"steerjax {sj.__version__}\n")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_is_the_scripts_own(name, capsys):
    code, out, _ = call([name, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: steerjax {name} ")
    if name != "info":
        summary = console.script_summary(ROOT / "experiments" / f"{name}.py")
        assert " ".join(out.split()).count(summary[:60]) == 1
        assert "--model" in out or name == "report"
    assert sys.argv[0] != f"steerjax {name}"                            # restored after the run


def test_hyphenated_names_run_the_same_script(capsys):
    code, out, _ = call(["first-order", "--help"], capsys)
    assert code == 0 and out.startswith("usage: steerjax first_order ")
    code, _, err = call(["first-order", "--no-such-flag"], capsys)     # the script's own one-line error
    assert code == 2 and err.startswith("error: steerjax first_order: unrecognized arguments: --no-such-flag")


@pytest.mark.parametrize("argv", [["nulspace"], ["--layers", "3"], ["Info"]])
def test_unknown_command_exits_2_with_the_list(argv, capsys):
    code, out, err = call(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: steerjax: unknown command {argv[0]!r}; choose one of nullspace, ")
    assert err.rstrip().endswith("report, info (see steerjax --help)")


def test_no_experiments_folder_is_a_clear_error(monkeypatch, tmp_path, capsys):
    """A non-editable install has no experiments/ next to the package: the commands say so and how to fix it."""
    monkeypatch.setenv(console.EXPERIMENTS_ENV, str(tmp_path / "nowhere"))
    code, _, err = call(["nullspace"], capsys)
    assert code == 2 and "a non-editable install has none" in err and "pip install -e ." in err
    code, out, _ = call(["--help"], capsys)                               # help still lists the commands
    assert code == 0 and "  nullspace  " in out and "note: no experiments folder" in out
    monkeypatch.setenv(console.EXPERIMENTS_ENV, str(tmp_path))           # a folder without the script
    code, _, err = call(["report"], capsys)
    assert code == 2 and "no script report.py in" in err


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    """A tiny Qwen2 folder (3 blocks, d = 64) with a character-level tokenizer, so a script runs on it in seconds
    (as in test_reliability.py)."""
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


def test_an_experiment_runs_end_to_end(tiny_with_tokenizer, tmp_path, capsys):
    """`steerjax paper-estimator --model FOLDER ...` (the cheapest script run: no plots) loads the model, writes the
    result and records the command."""
    argv = ["--model", str(tiny_with_tokenizer), "--layer", "3", "--n-directions", "4", "--dtypes", "float32",
            "--out", str(tmp_path)]
    code, out, _ = call(["paper-estimator", *argv], capsys)
    assert code == 0 and "wrote " in out and "paper estimator, float32 model" in out
    result = json.loads((tmp_path / "paper_estimator.json").read_text())
    assert [row["method"] for row in result["rows"]][1:] == ["paper estimator, float32 model"]
    assert result["meta"]["argv"] == ["steerjax paper_estimator", *argv]


@pytest.mark.slow  # 12-49 s on a shared 2-core machine (float64 work on the 49152 x 576 unembedding)
def test_an_experiment_runs_on_the_embedded_model(monkeypatch, smollm2, tmp_path, capsys):
    """The cheapest run on the embedded model (nullspace, one prompt at layer L) as `steerjax nullspace ...`."""
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    code, out, _ = call(["nullspace", "--layers", "30", "--n-prompts", "1", "--out", str(tmp_path)], capsys)
    assert code == 0 and "wrote " in out
    result = json.loads((tmp_path / "nullspace.json").read_text())
    assert [row["layer"] for row in result["layers"]] == [30]
    assert result["meta"]["argv"] == ["steerjax nullspace", "--layers", "30", "--n-prompts", "1", "--out",
                                      str(tmp_path)]


@pytest.mark.parametrize("name", ["llama3_untied_gqa2", "qwen2_tied_gqa1"])
def test_info_json_matches_the_checkpoint(tiny_checkpoints, name, capsys):
    folder, hf_model = tiny_checkpoints[name]
    code, out, _ = call(["info", str(folder), "--json"], capsys)
    assert code == 0
    info, config = json.loads(out), hf_model.config
    assert info["model_type"] == config.model_type and info["num_layers"] == config.num_hidden_layers
    assert (info["d"], info["vocab_size"], info["intermediate_size"]) == (config.hidden_size, config.vocab_size,
                                                                        config.intermediate_size)
    assert (info["num_heads"], info["num_kv_heads"]) == (config.num_attention_heads, config.num_key_value_heads)
    assert info["head_dim"] == config.hidden_size // config.num_attention_heads
    assert info["tie_word_embeddings"] == config.tie_word_embeddings
    assert info["layer_types"] == ["full_attention"] * config.num_hidden_layers and info["sliding_window"] is None
    assert info["parameters"] == hf_model.num_parameters() and info["dtype"] == "float32"
    assert info["parameter_bytes"] == 4 * info["parameters"]
    files = {Path(f["path"]).name: f["bytes"] for f in info["weight_files"]}
    assert files["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    V, d = config.vocab_size, config.hidden_size
    memory = info["exact_jacobian_per_prompt"]
    assert memory["dense_jacobian"] == {"shape": [V, d], "dtype": "float32", "bytes": V * d * 4,
                                        "formula": "V x d x 4 B"}
    assert memory["gram"] == {"shape": [d, d], "dtype": "float64", "bytes": d * d * 8, "formula": "d x d x 8 B"}
    code, out, _ = call(["info", str(folder), "--dtype", "float64"], capsys)   # the table
    assert code == 0 and f"{config.model_type}: {config.num_hidden_layers} blocks, d = {d}" in out
    assert f"dense J, V x d in float64: {V} x {d} x 8 B" in out and f"Gram J^T J, d x d in float64: {d} x {d}" in out


def test_info_shows_sliding_window_layers(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    slide, full = "sliding_attention", "full_attention"
    config = Gemma3TextConfig(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=[slide, full, slide], max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    code, out, _ = call(["info", str(tmp_path), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["layer_types"] == [slide, full, slide] and info["sliding_window"] == 4
    assert (info["model_type"], info["head_dim"], info["num_kv_heads"]) == ("gemma3_text", 16, 1)
    code, out, _ = call(["info", str(tmp_path)], capsys)
    assert "sliding window 4 on 2 of 3 layers, full on layers 1" in out


@pytest.mark.parametrize("argv, message", [
    (["info", "/no/such/model"], "error: model folder not found: /no/such/model"),
    (["info", "--dtype", "float16"], "error: steerjax info: argument --dtype: invalid choice"),
    (["info", "a", "b"], "error: steerjax info: unrecognized arguments: b"),
])
def test_info_bad_input_exits_2(argv, message, capsys):
    code, _, err = call(argv, capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(message), err


def test_info_of_the_embedded_model(monkeypatch, smollm2, capsys):
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    code, out, _ = call(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and (info["num_layers"], info["d"], info["vocab_size"]) == (30, 576, 49152)
    assert info["parameters"] == sum(x.size for x in jax.tree.leaves(smollm2.params))
    assert info["exact_jacobian_per_prompt"]["dense_jacobian"]["bytes"] == 49152 * 576 * 4
    assert info["weight_files"][0]["path"].endswith(".gguf")


def test_a_quick_run_through_the_console(tiny_llama_with_smollm2_tokenizer, tmp_path, capsys):
    """`steerjax linearization --quick` (issue 24: one --quick run in the tests) on the tiny model: the preset's
    design is recorded and the slopes it prints are the first-order residual's (2 within fitting error)."""
    argv = ["--quick", "--model", str(tiny_llama_with_smollm2_tokenizer), "--k-smallest", "8", "--out", str(tmp_path)]
    code, out, _ = call(["linearization", *argv], capsys)
    assert code == 0 and "wrote " in out
    result = json.loads((tmp_path / "linearization.json").read_text())
    assert result["settings"]["quick"] is True and result["meta"]["argv"] == ["steerjax linearization", *argv]
    summary = result["summary"]
    assert set(summary) == {"v", "v+v_null", "v_null", "v_perp"}
    assert all(abs(row[key] - 2) < 0.05 for row in summary.values() for key in ("slope_min", "slope_max"))
