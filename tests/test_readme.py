"""The README's Python examples run as written (on the embedded model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(smollm2, monkeypatch, tmp_path):
    import steerjax as sj

    monkeypatch.chdir(tmp_path)                           # files the examples write land here
    monkeypatch.setattr(sj, "load_model", lambda spec=None, dtype="float32": smollm2)
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["scores"].shape == (8,)
    assert namespace["out"].logits.shape[0] == 2
    assert set(sj.import_control_vector(tmp_path / "formality.gguf")) == {15}
