"""The package's import graph: imports go down the layers of ../shared/DESIGN.md only (so there is no circle),
no module imports a steerjax module inside a function (the usual way to hide a circle), scripts call no private
name, and every module opens with a docstring. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "steerjax"

# lower numbers are lower layers; a module may import only modules of strictly lower layers
LAYERS = {
    "steerjax.errors": 0, "steerjax.version": 0, "steerjax.xla": 0, "steerjax.blas": 0,
    "steerjax.checks": 1, "steerjax.models.config": 1, "steerjax.data": 1,
    "steerjax.control_vectors": 2,
    "steerjax.models.layers": 2, "steerjax.models.loading": 2,
    "steerjax.models.causal_lm": 3, "steerjax.models": 3,
    "steerjax.cpu_kernels": 4, "steerjax.spectrum": 4, "steerjax.lanczos": 4, "steerjax.stats": 4,
    "steerjax.fisher": 4, "steerjax.plotting": 4, "steerjax.clustered": 4,
    "steerjax.steering": 5, "steerjax.sharding": 5,
    "steerjax.model": 6,
    "steerjax.tail": 7, "steerjax.generation": 7, "steerjax.extraction": 7,
    "steerjax.jacobian": 8, "steerjax.fits": 8, "steerjax.linearization": 8, "steerjax.io": 8,
    "steerjax.geometry": 9, "steerjax.probes": 9, "steerjax.studies": 9, "steerjax.identifiability": 9,
    "steerjax.sequence": 9,
    "steerjax.behaviour": 10, "steerjax.cli": 10, "steerjax.strength": 10,
    "steerjax": 11,
    "steerjax.console": 12,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """The steerjax modules an import statement loads (a `from pkg import sub` counts as sub)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    subs = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
    return subs or ({base} & set(MODULES))


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> imported steerjax modules, module -> function-local steerjax imports)."""
    edges, local = {}, {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        edges[name], local[name] = set(), []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = imported_modules(node, name, path.name == "__init__.py") - {name}
                edges[name] |= targets
                if targets and node not in tree.body:
                    local[name] += sorted(targets)
    return edges, local


def test_every_module_has_a_layer():
    assert set(MODULES) == set(LAYERS), "place new modules in LAYERS (and in DESIGN.md's layout)"


def test_imports_go_down_only():
    edges, _ = import_graph()
    upward = [(a, b) for a, targets in edges.items() for b in targets if LAYERS[b] >= LAYERS[a]]
    assert upward == []


def test_no_function_local_steerjax_imports():
    _, local = import_graph()
    assert {m: t for m, t in local.items() if t} == {}


def test_the_layer_check_can_fail():
    """The graph reader sees a real edge: jacobian imports tail, the model, spectrum."""
    edges, _ = import_graph()
    assert {"steerjax.tail", "steerjax.model", "steerjax.spectrum"} <= edges["steerjax.jacobian"]
    assert "steerjax.model" in edges["steerjax.steering"] or LAYERS["steerjax.model"] > LAYERS["steerjax.steering"]


def test_every_module_opens_with_a_docstring():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []


@pytest.mark.parametrize("folder", ["experiments", "benchmarks", "notebooks"])
def test_scripts_call_no_private_name(folder):
    """No `module._helper`, `op.ctx` or `causal_lm` internals in scripts (tests may reach inside)."""
    private = re.compile(r"\b(?!self\.|cls\.)[a-z_]\w*\.(_[a-z]\w*)\b")
    hits = []
    for path in [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.ipynb")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if private.search(code) or re.search(r"\bop\.ctx\b|\bcausal_lm\.", code):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert hits == []


def test_no_noqa_comments():
    """Lint exceptions live in pyproject.toml's ruff configuration, not in comments."""
    hits = [f"{path.relative_to(ROOT)}:{number}"
            for folder in ("steerjax", "experiments", "benchmarks", "tests", "notebooks")
            for path in [*(ROOT / folder).rglob("*.py"), *(ROOT / folder).rglob("*.ipynb")]
            for number, line in enumerate(path.read_text().splitlines(), 1) if "# " + "noqa" in line]
    assert hits == []
