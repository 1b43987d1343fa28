"""Ctrl-C and SIGTERM during an experiment: one line saying what was saved and how to resume, exit code
128 + signal, and a rerun of the same command that resumes and completes (issue 25 item 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from steerjax import cli, io

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = "1,2,3"


def start(folder: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, str(REPO_ROOT / "experiments" / "nullspace.py"), "--model", str(folder),
            "--layers", LAYERS, "--n-prompts", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished_layers(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["layers"])
    except (OSError, ValueError, KeyError):   # not written yet
        return 0


def test_an_interrupted_run_says_what_was_saved_and_resumes(tiny_llama_with_smollm2_tokenizer, tmp_path):
    """SIGINT (Ctrl-C) after the first saved layer; SIGTERM takes the same handler (tested in-process below)."""
    signum = signal.SIGINT
    out = tmp_path / "run"
    json_path = out / "nullspace.json"
    proc = start(tiny_llama_with_smollm2_tokenizer, out)
    deadline = time.time() + 240
    while finished_layers(json_path) == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    saved = finished_layers(json_path)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert 1 <= saved < 3, "the signal came after the run had finished: make the run longer"
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"interrupted by {name} after "), err[-2000:]
    assert f"{saved} finished layer(s) saved in {json_path}; run the same command again to resume" in last
    assert "Traceback" not in err
    assert json.loads(json_path.read_text())["complete"] is False

    rerun = start(tiny_llama_with_smollm2_tokenizer, out)
    _, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err[-2000:]
    assert f"resuming: {saved} finished layer(s) found in {json_path}" in err
    result = json.loads(json_path.read_text())
    assert result["complete"] is True
    assert [row["layer"] for row in result["layers"]] == [int(x) for x in LAYERS.split(",")]


def test_the_message_names_what_each_kind_of_script_saved():
    resumable = [io.SavedWork("out/x_units.json", "3 finished unit(s)", True),
                 io.SavedWork("out/x.png", "results so far", False)]
    line = cli.interrupted_message("SIGINT", 12.4, resumable)
    assert line == ("interrupted by SIGINT after 12 s: 3 finished unit(s) saved in out/x_units.json; run the same "
                    "command again to resume from there (--fresh starts over)")
    line = cli.interrupted_message("SIGTERM", 3, [io.SavedWork("out/a.json", "results so far", False)])
    assert line == ("interrupted by SIGTERM after 3 s: wrote out/a.json; this script does not resume, so running the "
                    "same command again starts over")
    assert cli.interrupted_message("SIGINT", 0.2, []) == ("interrupted by SIGINT after 0 s, before any result was "
                                                          "saved; run the same command again to start over")


def test_unit_store_and_atomic_writes_record_what_they_saved(tmp_path):
    io.forget_saved()
    io.write_json_atomic(tmp_path / "final.json", {"a": 1})
    store = io.UnitStore(tmp_path / "units.json", {"n": 1})
    store.put("a", 1)
    store.put("b", 2)
    saved = io.saved_work()
    assert saved[0] == io.SavedWork(str(tmp_path / "units.json"), "2 finished unit(s)", True)
    assert saved[1] == io.SavedWork(str(tmp_path / "final.json"), "results so far", False)
    io.forget_saved()
    reopened = io.UnitStore(tmp_path / "units.json", {"n": 1})     # a resumed store counts its old units
    assert len(reopened) == 2 and io.saved_work()[0].what == "2 finished unit(s)"
    io.forget_saved()


def test_sigterm_ends_a_run_with_the_line_and_143_and_the_handlers_come_back(tmp_path, capsys):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def run(args):
        store = io.UnitStore(tmp_path / "units.json", {"n": 1})
        store.put("first", 1)
        os.kill(os.getpid(), signal.SIGTERM)      # a real signal, delivered to this (the main) thread
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the run")

    assert cli.run_cli(lambda argv: None, run, []) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted by SIGTERM after 0 s: 1 finished unit(s) saved in ")
    assert {sig: signal.getsignal(sig) for sig in before} == before
