"""Execute every notebook in notebooks/ (or the ones named) in place, storing their outputs and figures, so a
reader sees results without running them. tests/test_notebooks.py re-executes them and checks the stored outputs
are current (`stored_outputs_match`).

    python notebooks/refresh.py [notebooks/NAME.ipynb ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbclient
import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAME = "python3"          # ipykernel's default kernelspec name
CELL_TIMEOUT_S = 600


def execute(path: Path):
    """The notebook at `path`, executed top to bottom in a fresh kernel started in the repository root."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()
    return nb


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        started = time.time()
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"executed {path} in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
