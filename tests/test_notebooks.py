"""Every notebook in notebooks/ is stored executed (outputs and figures), executes end to end (any cell error,
including a failed `assert` in a notebook's checks cell, fails), and its stored outputs are current: re-executed
text outputs equal the stored ones, numbers within 1% or one unit of their last printed digit (float32 results may
differ in the last bits between BLAS builds), and every stored figure is still drawn. Refresh them with
`python notebooks/refresh.py`.

Needs nbformat, nbclient and ipykernel (the `test` extra). ipykernel installs the default `python3` kernelspec, and
jupyter_client starts it with the interpreter running pytest; nothing is installed or registered at run time.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
RELATIVE_TOLERANCE = 0.01


def refresh_module():
    spec = importlib.util.spec_from_file_location("notebooks_refresh", REPO_ROOT / "notebooks" / "refresh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell_outputs(cell) -> tuple[str, int]:
    """(the cell's text output: stdout and text/plain results, figures: the number of image outputs). stderr is
    left out: it holds library warnings with local paths, not results."""
    text, figures = [], 0
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] == "stdout":
            text.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            figures += "image/png" in out["data"]
            if "image/png" not in out["data"] and "text/plain" in out["data"]:
                text.append(out["data"]["text/plain"])
        elif out["output_type"] == "error":
            text.append(f"{out['ename']}: {out['evalue']}")
    return "".join(text), figures


def last_digit(token: str) -> float:
    """One unit of the last printed digit of a number token ("0.123" -> 0.001, "12" -> 1, "1.5e-3" -> 1e-4)."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def texts_match(stored: str, fresh: str) -> str | None:
    """None if the texts agree (words exactly, numbers to tolerance), else the first difference."""
    stored_words, fresh_words = NUMBER.split(stored), NUMBER.split(fresh)
    if stored_words != fresh_words:
        for a, b in zip(stored.splitlines(), fresh.splitlines()):
            if NUMBER.split(a) != NUMBER.split(b):
                return f"text differs:\n  stored: {a}\n  now:    {b}"
        return "the number of output lines differs"
    for a, b in zip(NUMBER.findall(stored), NUMBER.findall(fresh)):
        x, y = float(a), float(b)
        if abs(x - y) > RELATIVE_TOLERANCE * max(abs(x), abs(y)) + max(last_digit(a), last_digit(b)):
            return f"number {a} is now {b}"
    return None


def stored_outputs_match(stored_nb, fresh_nb) -> list[str]:
    """Differences between a notebook's stored outputs and a fresh execution, one line per cell."""
    problems = []
    stored_cells = [c for c in stored_nb.cells if c.cell_type == "code"]
    fresh_cells = [c for c in fresh_nb.cells if c.cell_type == "code"]
    for number, (old, new) in enumerate(zip(stored_cells, fresh_cells), 1):
        (old_text, old_figures), (new_text, new_figures) = cell_outputs(old), cell_outputs(new)
        if old_figures != new_figures:
            problems.append(f"code cell {number}: {old_figures} stored figure(s), {new_figures} now")
        difference = texts_match(old_text, new_text)
        if difference:
            problems.append(f"code cell {number}: {difference}")
    return problems


def test_notebooks_found():
    assert {p.name for p in NOTEBOOKS} >= {"tour.ipynb", "layer_and_strength.ipynb", "identifiability_curve.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_executed_and_current(path: Path):
    stored = nbformat.read(path, as_version=4)
    code_cells = [c for c in stored.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), (
        f"{path.name} is stored unexecuted: run `python notebooks/refresh.py {path.relative_to(REPO_ROOT)}`")
    try:
        fresh = refresh_module().execute(path)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    problems = stored_outputs_match(stored, fresh)
    assert not problems, (f"{path.name}'s stored outputs are stale (refresh with `python notebooks/refresh.py "
                          f"{path.relative_to(REPO_ROOT)}`):\n" + "\n".join(problems))


def test_the_comparison_catches_stale_outputs():
    assert texts_match("alpha 0.123, KL 1.5e-3\n", "alpha 0.124, KL 1.5e-3\n") is None      # last digit
    assert texts_match("ratio 0.50\n", "ratio 0.60\n") == "number 0.50 is now 0.60"
    assert texts_match("12 directions\n", "12 layers\n").startswith("text differs")
    assert texts_match("took 3 s\n", "took 3 s\nextra\n") == "the number of output lines differs"
    assert last_digit("0.123") == pytest.approx(1e-3) and last_digit("1.5e-3") == pytest.approx(1e-4)
    stored = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("display_data", data={"image/png": "iVBOR", "text/plain": "<Figure>"})])])
    fresh = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[])])
    assert stored_outputs_match(stored, fresh) == ["code cell 1: 1 stored figure(s), 0 now"]
