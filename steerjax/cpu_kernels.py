"""CPU decode kernels: skinny matmuls over column-panel-packed weights, as XLA FFI custom calls.

A batch-8 decode step multiplies an (8, K) activation by every weight matrix once, so it is bound by how
fast the weights stream. In a 30-layer scan of SmolLM2-shaped (576 x 1536) products on a 2-core box whose
memory reads at 22 GB/s, XLA CPU's dot streamed 10.7 GB/s; `panel_matmul`, over weights packed once per
model into contiguous (K, 8) column panels (steerjax.generation.decode_panels), 17-19.6 GB/s. The
generation benchmark prints both rates (benchmarks/generation_throughput.py).

The C++ source (steerjax/kernels/panel_matmul.cc) is compiled at first use with the system C++ compiler
(`$CXX`, else g++ / c++; -O3 -march=native) against jaxlib's FFI headers, into a cache folder keyed by
source, flags, jaxlib version and CPU (`$STEERJAX_KERNEL_CACHE`, else ~/.cache/steerjax/kernels). Without a
compiler callers fall back to XLA's own dot (`available()` is False and `unavailable_reason()` says why,
with one warning); results agree to float32 rounding either way. `build_status()` says whether the library
compiled, came from the cache or failed (run metadata records it); STEERJAX_DECODE_KERNELS=0 keeps
`steerjax.generation` from ever building it.

Shapes: L layers, K input width, N output width (a multiple of PANEL), P = N / PANEL panels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 8
SOURCE = Path(__file__).parent / "kernels" / "panel_matmul.cc"
CXX_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")
TARGETS = {"float32": ("steerjax_panel_matmul_f32", "SteerjaxPanelMatmulF32"),
           "bfloat16": ("steerjax_panel_matmul_bf16", "SteerjaxPanelMatmulBF16")}


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else g++ or c++ on PATH (None if there is none)."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("c++")


def cpu_signature() -> str:
    """What -march=native depends on: machine and CPU flags (a cache shared by different CPUs stays safe)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def cache_dir() -> Path:
    return Path(os.environ.get("STEERJAX_KERNEL_CACHE", Path.home() / ".cache" / "steerjax" / "kernels"))


def library_path(cxx: str) -> Path:
    """Cache location of the shared library for this source, compiler, flags, jaxlib and CPU."""
    import jaxlib

    key = "\n".join([SOURCE.read_text(), cxx, " ".join(CXX_FLAGS), jaxlib.__version__, cpu_signature()])
    return cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:16] / "libsteerjax_cpu.so"


def build_library() -> Path:
    """Compile the kernel into the cache (once; concurrent builders each write a temp file, then rename)."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set $CXX or install g++)")
    target = library_path(cxx)
    if target.exists():
        _STATUS["build"] = "loaded from cache"
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    command = [cxx, *CXX_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(tmp_path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        tmp_path.unlink(missing_ok=True)
        raise KernelBuildError(f"{' '.join(command)} failed: {err}") from err
    if result.returncode != 0:
        tmp_path.unlink(missing_ok=True)
        raise KernelBuildError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp_path, target)
    _STATUS["build"] = "compiled"
    return target


_STATUS = {"build": "not built"}


def build_status() -> str:
    """"not built" (no generate has needed it), "compiled" (in this process), "loaded from cache", or
    "unavailable: <reason>"."""
    return _STATUS["build"]


@functools.lru_cache(maxsize=None)
def _register() -> str | None:
    """Build, load and register the FFI targets once. Returns None on success, else the reason."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build_library()))
        for name, symbol in TARGETS.values():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (KernelBuildError, OSError, AttributeError) as err:
        warnings.warn(f"steerjax CPU decode kernels unavailable, using XLA's dot instead: {err}", stacklevel=3)
        _STATUS["build"] = f"unavailable: {err}"
        return str(err)
    return None


def unavailable_reason() -> str | None:
    """None when the kernels can be used, else why not (disabled, no compiler, build error)."""
    return _register()


def available() -> bool:
    return unavailable_reason() is None


def supports(w: jax.Array) -> bool:
    """Whether `panel_matmul` handles this (..., K, N) weight: float32 or bfloat16, N a multiple of PANEL."""
    return w.dtype.name in TARGETS and w.ndim >= 2 and w.shape[-1] % PANEL == 0


def pack_panels(w: jax.Array) -> jax.Array:
    """(L, K, N) weights -> (L, P, K, PANEL) panels, panels[l, p, k, j] = w[l, k, PANEL p + j]."""
    L, K, N = w.shape
    if N % PANEL:
        raise ValueError(f"pack_panels: N = {N} is not a multiple of {PANEL}")
    return jnp.transpose(w.reshape(L, K, N // PANEL, PANEL), (0, 2, 1, 3))


def panel_matmul(x: jax.Array, panels: jax.Array, layer) -> jax.Array:
    """x (..., K) @ W_layer (K, N) -> (..., N) float32, W_layer held as panels (L, P, K, PANEL).
    layer: int or traced int32 scalar. x is computed in float32; bfloat16 panels widen exactly.
    Under jax.vmap x may carry batch axes (rows are flattened); the panels and layer may not."""
    reason = unavailable_reason()
    if reason is not None:
        raise KernelBuildError(f"steerjax CPU kernels unavailable: {reason}")
    L, P, K, _ = panels.shape
    if x.shape[-1] != K:
        raise ValueError(f"panel_matmul: x has width {x.shape[-1]}, the panels expect K = {K}")
    name = TARGETS[panels.dtype.name][0]
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape[:-1] + (P * PANEL,), jnp.float32),
                            vmap_method="expand_dims")
    return call(x.astype(jnp.float32), panels, jnp.asarray(layer, jnp.int32).reshape(()), layers=np.int64(L))
