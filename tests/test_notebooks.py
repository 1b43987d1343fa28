"""Execute every notebook in notebooks/ end to end; any cell error (including a failed `assert` in a
notebook's checks cell) fails the test.

Needs nbformat, nbclient and ipykernel (the `test` extra). ipykernel installs the default `python3`
kernelspec, and jupyter_client starts it with the interpreter running pytest; nothing is installed or
registered at run time.
"""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "python3"          # ipykernel's default kernelspec name
CELL_TIMEOUT_S = 600


def test_notebooks_found():
    assert NOTEBOOKS, "no notebooks in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
