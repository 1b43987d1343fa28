"""Result files: atomic JSON writes (a killed run never leaves a half-written file) and run metadata."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import flax
import jax
import numpy as np

from steerjax.errors import InputError
from steerjax.generation import DECODE_RECORD
from steerjax.version import __version__


def to_jsonable(obj: Any) -> Any:
    """numpy / jax scalars and arrays -> plain Python for json."""
    if hasattr(obj, "to_json"):  # a live record (e.g. generation.DECODE_RECORD), read when the file is written
        return to_jsonable(obj.to_json())
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_jsonable(data), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the result file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if str(path) not in _SAVED:
        record_saved(path, "results so far", resumable=False)


class SavedWork(NamedTuple):
    """A file a run has written so far: what it holds, and whether rerunning the same command resumes from it."""
    path: str
    what: str
    resumable: bool


_SAVED: dict[str, SavedWork] = {}


def record_saved(path: str | os.PathLike, what: str, resumable: bool) -> None:
    """Note that `path` now holds `what` (e.g. "3 finished units"), for the message of an interrupted run."""
    _SAVED[str(path)] = SavedWork(str(path), what, resumable)


def saved_work() -> list[SavedWork]:
    """The files written since the last `forget_saved()`, resumable ones first."""
    return sorted(_SAVED.values(), key=lambda w: not w.resumable)


def forget_saved() -> None:
    """Start a new run's record of saved files."""
    _SAVED.clear()


def read_json(path: str | os.PathLike) -> Any | None:
    """Parsed JSON, or None if the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_identity(lm) -> dict[str, Any]:
    """What pins the model of a result: its spec, dtype, config and the SHA-256 of every file the weights
    were read from (GGUF file, or config.json + safetensors files), plus one combined hash. Hashes are cached
    per file path and size/mtime for the process."""
    files = {Path(f).name: _cached_sha256(str(f)) for f in lm.weight_files}
    combined = hashlib.sha256("".join(f"{name}:{h};" for name, h in sorted(files.items())).encode()).hexdigest()
    return {"source": lm.source, "dtype": str(np.dtype(lm.dtype)), "config": lm.config.to_dict(),
            "files_sha256": files, "sha256": combined if files else None}


_HASHES: dict[tuple, str] = {}


def _cached_sha256(path: str) -> str:
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def run_metadata(lm=None, seeds: Any = None) -> dict[str, Any]:
    """Versions and environment recorded with every result file; with `lm`, the model's identity
    (`model_identity`), and the run's seeds when given. "decode" says which decode path (CPU kernel or XLA
    dot) the run's generations took from this call on, and whether the kernel compiled, as of the write
    (`generation.DecodeWindow`)."""

    meta = {
        "steerjax": __version__, "jax": jax.__version__, "flax": flax.__version__,
        "numpy": np.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "backend": jax.default_backend(), "x64": bool(jax.config.jax_enable_x64),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
        "decode": DECODE_RECORD.since_now(),
    }
    if lm is not None:
        meta["model"] = model_identity(lm)
    if seeds is not None:
        meta["seeds"] = seeds
    return meta


# keys whose values differ between two runs of the same computation (clock, command line, timings); keys
# starting with "seconds" or ending in "_seconds" are timings too
VOLATILE_KEYS = ("meta", "started", "argv", "elapsed")


def is_volatile(key: str) -> bool:
    return key in VOLATILE_KEYS or key.startswith("seconds") or key.endswith("_seconds")


def strip_volatile(obj: Any) -> Any:
    """obj without wall-clock data (run metadata, timings): what two runs with the same seed must agree on."""
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if not is_volatile(str(k))}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def _normalised(obj: Any) -> Any:
    """obj as it reads back from JSON (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(to_jsonable(obj)))


class UnitStore:
    """Finished work units of a long run, in one JSON file {"settings", "units": {key: unit}, "meta"}
    rewritten atomically after every unit. Reopening with the same settings resumes (finished keys are
    skipped); different settings raise unless `fresh`, so finished work is never silently overwritten."""

    def __init__(self, path: str | os.PathLike, settings: Any, fresh: bool = False, meta: Any = None):
        self.path = Path(path)
        self.settings = _normalised(settings)
        self.meta = meta
        previous = None if fresh else read_json(self.path)
        if previous is not None and previous.get("settings") != self.settings:
            raise InputError(f"{self.path} holds units of a run with different settings; pass --fresh to "
                             f"overwrite it, or choose another --out")
        self.units: dict[str, Any] = dict(previous["units"]) if previous is not None else {}
        self.resumed = len(self.units)
        if self.units:
            self._record()

    def _record(self) -> None:
        record_saved(self.path, f"{len(self.units)} finished unit(s)", resumable=True)

    def __contains__(self, key: str) -> bool:
        return key in self.units

    def __getitem__(self, key: str) -> Any:
        return self.units[key]

    def __len__(self) -> int:
        return len(self.units)

    def put(self, key: str, unit: Any) -> None:
        self.units[key] = _normalised(unit)
        write_json_atomic(self.path, {"settings": self.settings, "units": self.units, "meta": self.meta})
        self._record()


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Rows (dicts with the same keys) as a CSV file with a header, written atomically."""
    if not rows:
        raise ValueError("write_csv needs at least one row")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
