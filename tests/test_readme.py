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
    assert namespace["alpha"] > 0 and len(namespace["text"]) == 1 and namespace["text"][0]
    assert set(sj.import_control_vector(tmp_path / "formality.gguf")) == {15}


def test_the_peer_layer_conversion_sits_next_to_the_hidden_states_note():
    """Issue 25 item 3: the conventions section states the peers' layer index beside the hidden_states note."""
    text = README.read_text()
    conventions = text[text.index("## Conventions"):]
    conventions = conventions[:conventions.index("\n## ", 1)]
    layer_note = conventions.index("`output_hidden_states[l]`")
    peer_note = conventions.index("**Peer layer index.**")
    example = conventions.index("sj.peer_layer_from_steerjax(15) == 14")
    assert layer_note < peer_note < example < conventions.index("- **Positions**")
