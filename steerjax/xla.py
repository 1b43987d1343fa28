"""`jit`: jax.jit with per-backend XLA compiler options, chosen when the function is first called.

On the CPU backend (jaxlib 0.10) a scan that slices one layer out of a bfloat16 weight stack (every
layer loop here: forward, Jacobian tails, decoding) gets the WHOLE stack converted to float32 on every
call: float normalisation rewrites the bf16 dynamic-slice as convert -> f32 dynamic-slice -> convert, and
while-loop-invariant code motion then hoists the stack-sized convert out of the loop. A bf16 decode step
of the Qwen2.5-0.5B shape then ran slower than float32 (8 x 32 tokens: 5.89 s; 3.38 s without that pass;
one bf16 weight stream in a scan, 1.5 vs 10 GB/s). `CPU_COMPILER_OPTIONS` turns the pass off for the
programs compiled through `jit`; float32 programs measured the same either way. Other backends compile
with XLA's defaults.
"""

from __future__ import annotations

import functools

import jax

CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiler_options(backend: str) -> dict[str, str] | None:
    """XLA compiler options steerjax compiles with on `backend` ("cpu", "gpu", "tpu")."""
    return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else None


class BackendJit:
    """A jax.jit-compiled function whose compiler options follow `jax.default_backend()` at the first call
    (not at import, so importing steerjax never starts a backend). Called on tracers (inside another jit, vmap
    or jvp) it traces the plain function inline. Attribute access (`lower`, ...) goes to the underlying jitted
    function."""

    def __init__(self, fn, jit_kwargs: dict):
        self._fn, self._jit_kwargs, self._jitted = fn, jit_kwargs, None
        functools.update_wrapper(self, fn)

    def jitted(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fn, compiler_options=compiler_options(jax.default_backend()),
                                   **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return self._fn(*args, **kwargs)  # inside another transformation: trace inline (compiler_options
            # may only be given to a top-level jit)
        return self.jitted()(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.jitted(), name)


def jit(fn=None, **jit_kwargs):
    """jax.jit(fn, **jit_kwargs) with `compiler_options(backend)`; usable as `jit(fn)`, `@jit` and
    `functools.partial(jit, static_argnums=...)`."""
    if fn is None:
        return functools.partial(jit, **jit_kwargs)
    return BackendJit(fn, jit_kwargs)
