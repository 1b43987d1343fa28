"""The `steerjax` command: `steerjax <experiment> [options]` runs experiments/<experiment>.py with those options,
and `steerjax info MODEL` prints a model's architecture and the memory of the exact Jacobian route.

The experiment scripts are files of the repository, not modules of the package: the command finds them in the
`experiments/` folder next to the `steerjax` package, which is where an editable install (`pip install -e .`)
leaves them, or in $STEERJAX_EXPERIMENTS. `python experiments/<name>.py [options]` runs the same scripts."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import jax
import numpy as np

import steerjax as sj
from steerjax import cli, io
from steerjax.errors import InputError

# one sub-command per script in experiments/, in the README's order (tests/test_console.py checks the folder)
EXPERIMENTS = ("nullspace", "identifiability", "first_order", "sequence_identifiability", "invisible_steering",
               "paper_estimator", "logit_equivalence", "orthogonal", "scale_invariance", "environments",
               "fisher_cramer_rao", "recovery", "linearization", "report")
EXPERIMENTS_ENV = "STEERJAX_EXPERIMENTS"
INFO_SUMMARY = "A model's architecture, parameter count, weight files and the memory of the exact Jacobian route."
INFO_DTYPES = ("float32", "float64", "bfloat16")
GRAM_DTYPE = "float64"  # the exact route's d x d factor C = M D and Gram C^T C (`JacobianOperator.factors`)


# ----------------------------------------------------------------------------- experiments

def command_name(text: str) -> str:
    """The script name of a sub-command: hyphens read as underscores (first-order -> first_order)."""
    return text.replace("-", "_")


def experiments_folder() -> Path:
    """The experiments/ folder next to the steerjax package (or $STEERJAX_EXPERIMENTS); InputError when there is
    none, as in a non-editable install, which ships the package only."""
    env = os.environ.get(EXPERIMENTS_ENV)
    folder = Path(env) if env else Path(sj.__file__).resolve().parent.parent / "experiments"
    if not folder.is_dir():
        where = f"${EXPERIMENTS_ENV} = {env}" if env else f"{folder}, next to the steerjax package"
        raise InputError(f"no experiments folder at {where}: the experiment scripts live in the repository, not in "
                         "the package, so a non-editable install has none. Install from a checkout with "
                         f"`pip install -e .`, or set {EXPERIMENTS_ENV} to a checkout's experiments/ folder")
    return folder


def script_path(name: str) -> Path:
    """experiments/<name>.py, InputError when the folder or the file is missing."""
    path = experiments_folder() / f"{name}.py"
    if not path.is_file():
        raise InputError(f"no script {path.name} in {path.parent}")
    return path


def script_summary(path: Path) -> str:
    """The first paragraph of a script's docstring on one line (read with ast: nothing is imported)."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return " ".join(doc.split("\n\n")[0].split())


def load_script(name: str) -> ModuleType:
    """experiments/<name>.py imported as module `steerjax_experiment_<name>` (the scripts are not a package)."""
    path = script_path(name)
    module_name = f"steerjax_experiment_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_experiment(name: str, argv: Sequence[str]) -> int:
    """Exit code of experiments/<name>.py's main(argv); while it runs, sys.argv reads `steerjax <name> argv...` so
    its --help, its errors and the argv its result file records name the command that ran."""
    module = load_script(name)
    saved = sys.argv
    sys.argv = [f"steerjax {name}", *argv]
    try:
        code = module.main(list(argv))
    finally:
        sys.argv = saved
    return 0 if code is None else code


def usage() -> str:
    """`steerjax --help`: the sub-commands, each with its script's first docstring paragraph."""
    try:
        folder, missing = experiments_folder(), None
    except InputError as err:
        folder, missing = None, str(err)
    rows = [(name, script_summary(folder / f"{name}.py") if folder and (folder / f"{name}.py").is_file()
             else "(script not found)") for name in EXPERIMENTS]
    rows.append(("info", INFO_SUMMARY))
    width = max(len(name) for name, _ in rows) + 2
    lines = ["usage: steerjax <command> [options]    (steerjax <command> --help: the command's options)", "",
             sj.__doc__.strip().splitlines()[0], "",
             "commands (experiments/<command>.py; hyphens work too, e.g. first-order):"]
    for name, summary in rows:
        wrapped = textwrap.wrap(summary, 118 - width) or [""]
        lines += [f"  {name:<{width}}{wrapped[0]}", *(" " * (width + 2) + rest for rest in wrapped[1:])]
    lines += ["", "`python experiments/<command>.py [options]` runs the same scripts."]
    if missing:
        lines += ["", f"note: {missing}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- info

def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def model_info(lm) -> dict[str, Any]:
    """The facts `steerjax info` prints: architecture, parameters, weight files, and per prompt the memory of the
    exact Jacobian route's arrays: the dense observable Jacobian J (V x d, model dtype; `JacobianOperator.dense`)
    and the d x d float64 factor / Gram J^T J the exact spectra come from (`JacobianOperator.factors`)."""
    c = lm.config
    leaves = jax.tree.leaves(lm.params)
    dtype = np.dtype(lm.dtype)
    return {
        "source": lm.source,
        "model_type": c.model_type, "num_layers": c.num_layers, "d": c.hidden_size, "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "layer_types": list(c.layer_types) or ["full_attention"] * c.num_layers,
        "sliding_window": c.sliding_window if c.has_local_layers else None,
        "tie_word_embeddings": c.tie_word_embeddings,
        "parameters": int(sum(x.size for x in leaves)), "dtype": dtype.name,
        "parameter_bytes": int(sum(x.size * x.dtype.itemsize for x in leaves)),
        "weight_files": [{"path": f, "bytes": os.path.getsize(f) if os.path.isfile(f) else None}
                         for f in lm.weight_files],
        "exact_jacobian_per_prompt": exact_route_memory(c.hidden_size, c.vocab_size, dtype),
        "config": c.to_dict(),
    }


def exact_route_memory(d: int, vocab_size: int, dtype) -> dict[str, dict[str, Any]]:
    """Per prompt, the memory of the exact Jacobian route's arrays for hidden size d, vocabulary V and model dtype
    `dtype`: the dense observable Jacobian J (V x d in the model dtype; `JacobianOperator.dense`, a device array)
    and the d x d float64 factor / Gram J^T J the exact spectra come from (`JacobianOperator.factors`, formed by
    NumPy in host memory). `model_info` reports it as "exact_jacobian_per_prompt"."""
    dtype, gram_size = np.dtype(dtype), np.dtype(GRAM_DTYPE).itemsize
    V, d = int(vocab_size), int(d)
    return {
        "dense_jacobian": {"shape": [V, d], "dtype": dtype.name, "bytes": V * d * dtype.itemsize,
                           "formula": f"V x d x {dtype.itemsize} B"},
        "gram": {"shape": [d, d], "dtype": GRAM_DTYPE, "bytes": d * d * gram_size,
                 "formula": f"d x d x {gram_size} B"},
    }


# (model, d, V) of the README's table "Memory of the exact route on an accelerator"
EXACT_ROUTE_MODELS = (("Llama 3.2 1B", 2048, 128256), ("Llama 3.1 8B", 4096, 128256),
                      ("Llama 3.1 70B", 8192, 128256))
EXACT_ROUTE_DTYPES = ("bfloat16", "float32")


def exact_route_memory_table(models=EXACT_ROUTE_MODELS, dtypes=EXACT_ROUTE_DTYPES) -> str:
    """The README's markdown table of `exact_route_memory` per prompt for (model, d, V) rows: the dense J in each
    model dtype and the float64 d x d factor. Print it with
    `python -c "from steerjax import console; print(console.exact_route_memory_table())"`."""
    head = ["model", "d", "V", *(f"dense J (V x d), {name}" for name in dtypes), "d x d factor, float64 (host)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d, V in models:
        memory = [exact_route_memory(d, V, dtype) for dtype in dtypes]
        cells = [*(m["dense_jacobian"]["bytes"] for m in memory), memory[0]["gram"]["bytes"]]
        lines.append("| " + " | ".join([name, str(d), str(V), *map(format_bytes, cells)]) + " |")
    return "\n".join(lines)


def info_lines(info: dict[str, Any]) -> list[str]:
    """The human-readable table of `model_info`."""
    types = info["layer_types"]
    sliding = sum(t == "sliding_attention" for t in types)
    attention = ("full attention on every layer" if not sliding else
                 f"sliding window {info['sliding_window']} on {sliding} of {len(types)} layers, full on layers "
                 + ", ".join(str(i) for i, t in enumerate(types) if t == "full_attention"))
    jac, gram = info["exact_jacobian_per_prompt"]["dense_jacobian"], info["exact_jacobian_per_prompt"]["gram"]
    V, d = jac["shape"]
    lines = [
        f"model           {info['source']}",
        f"architecture    {info['model_type']}: {info['num_layers']} blocks, d = {info['d']}, {info['num_heads']} "
        f"heads ({info['num_kv_heads']} kv heads) of head_dim {info['head_dim']}, MLP {info['intermediate_size']}, "
        f"vocab {V}, context {info['max_position_embeddings']}",
        f"attention       {attention}",
        f"embeddings      {'tied (lm_head = embedding)' if info['tie_word_embeddings'] else 'untied'}",
        f"parameters      {info['parameters']:,} in {info['dtype']} = {format_bytes(info['parameter_bytes'])}",
    ]
    for i, f in enumerate(info["weight_files"]):
        size = "" if f["bytes"] is None else f" ({format_bytes(f['bytes'])})"
        lines.append(f"{'weight files' if i == 0 else '':<16}{f['path']}{size}")
    lines += [
        "exact Jacobian route, per prompt (J = d observable / d h_l at the last position; h_l enters block l):",
        f"  dense J, V x d in {jac['dtype']}: {V} x {d} x {jac['bytes'] // (V * d)} B = {format_bytes(jac['bytes'])}"
        "  (JacobianOperator.dense; the exact spectra never form it)",
        f"  Gram J^T J, d x d in {gram['dtype']}: {d} x {d} x {gram['bytes'] // (d * d)} B = "
        f"{format_bytes(gram['bytes'])}  (as the factor C = M D, C^T C = J^T J, of the exact singular values)",
    ]
    return lines


def parse_info_args(argv) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="steerjax info", description=INFO_SUMMARY)
    p.add_argument("model", nargs="?", default=None, help=cli.MODEL_HELP)
    p.add_argument("--dtype", choices=INFO_DTYPES, default="float32",
                   help="dtype the model is loaded in (default float32): sets the parameter and J memory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def run_info(args) -> dict[str, Any]:
    info = model_info(sj.load_model(args.model, dtype=args.dtype))
    print(json.dumps(io.to_jsonable(info), indent=1) if args.json else "\n".join(info_lines(info)))
    return info


# ----------------------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    """`steerjax <command> [options]`: the exit code of the command (2 for an unknown one, with the list)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"steerjax {sj.__version__}")
        return 0
    head, rest = argv[0], argv[1:]
    name = command_name(head)
    if name == "info":
        return cli.run_cli(parse_info_args, run_info, rest)
    if name not in EXPERIMENTS:
        print(f"error: steerjax: unknown command {head!r}; choose one of {', '.join((*EXPERIMENTS, 'info'))} "
              "(see steerjax --help)", file=sys.stderr)
        return 2
    try:
        script_path(name)
    except InputError as err:
        print(f"error: steerjax {name}: {err}", file=sys.stderr)
        return 2
    return run_experiment(name, rest)
