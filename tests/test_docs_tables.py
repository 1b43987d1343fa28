"""Every table in docs/identifiability.md is regenerated from a committed result file: each study's --report
markdown of its file under docs/data/ appears verbatim in the page; every report block of docs/results.md and
README.md is what `python experiments/report.py --update` writes from the folders under docs/results/ (no model is
loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_experiment

ROOT = Path(__file__).resolve().parents[1]
TABLES = [
    ("identifiability", "identifiability_smollm2.json"),
    ("paper_estimator", "paper_estimator_smollm2_layer15.json"),
    ("paper_estimator", "paper_estimator_smollm2_layer25.json"),
    ("first_order", "first_order_smollm2.json"),
    ("sequence_identifiability", "sequence_identifiability_smollm2.json"),
    ("invisible_steering", "invisible_steering_smollm2.json"),
]


@pytest.mark.parametrize("script,name", TABLES)
def test_identifiability_page_tables_come_from_committed_files(script, name):
    page = (ROOT / "docs" / "identifiability.md").read_text()
    result = json.loads((ROOT / "docs" / "data" / name).read_text())
    table = load_experiment(script).markdown(result)
    for block in table.split("\n\n"):
        assert block in page, f"{name}: a table of `python experiments/{script}.py --report` is not in the page"


@pytest.mark.parametrize("page", ["docs/results.md", "README.md", "docs/models.md"])
def test_results_report_blocks_are_current(page):
    report = load_experiment("report")
    text = (ROOT / page).read_text()
    folders = {f for m in report.BLOCK.finditer(text) for f in m.group(3).split()}
    assert folders and all((ROOT / f).is_dir() and f.startswith("docs/results/") for f in folders)
    assert report.update_text(text, ROOT) == text, f"run `python experiments/report.py --update {page}`"


NULLSPACE_FILES = sorted((ROOT / "docs" / "data").glob("nullspace_*.json"))


@pytest.mark.parametrize("path", NULLSPACE_FILES, ids=lambda p: p.stem)
def test_readme_nullspace_tables_come_from_committed_files(path):
    """Each main-job table in the README is what experiments/nullspace.py prints from its committed result file."""
    nullspace = load_experiment("nullspace")
    result = json.loads(path.read_text())
    assert result["complete"], f"{path.name} is an unfinished run"
    table = nullspace.format_table([nullspace.summary_row(e) for e in result["layers"]])
    assert table in (ROOT / "README.md").read_text(), f"the table of {path.name} is not in README.md"


PRINTED_TABLES = [("fisher_cramer_rao", "fisher_cramer_rao_gemma3_270m_quick.json"),
                  ("linearization", "linearization_gemma3_270m_quick.json"),
                  ("recovery", "recovery_gemma3_270m_quick.json")]


@pytest.mark.parametrize("script,name", PRINTED_TABLES)
def test_models_page_tables_come_from_committed_files(script, name, capsys):
    """docs/models.md shows what each script's print_tables prints from its committed file."""
    load_experiment(script).print_tables(json.loads((ROOT / "docs" / "data" / name).read_text()))
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed in (ROOT / "docs" / "models.md").read_text(), f"the tables of {name} are not in docs/models.md"


@pytest.mark.parametrize("script,name", [("identifiability", "identifiability_gemma3_270m.json"),
                                         ("paper_estimator", "paper_estimator_gemma3_270m_layer9.json"),
                                         ("first_order", "first_order_gemma3_270m.json"),
                                         ("sequence_identifiability", "sequence_identifiability_gemma3_270m.json"),
                                         ("invisible_steering", "invisible_steering_gemma3_270m.json")])
def test_models_page_study_tables_come_from_committed_files(script, name):
    """docs/models.md holds each Gemma study's --report markdown of its committed file."""
    table = load_experiment(script).markdown(json.loads((ROOT / "docs" / "data" / name).read_text()))
    assert table in (ROOT / "docs" / "models.md").read_text(), f"{name}: its --report table is not in docs/models.md"
