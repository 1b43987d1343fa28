"""`dense_threads(d)`: the BLAS thread policy for steerjax's float64 d x d NumPy work (factor products, SVDs).

Small problems run on ONE BLAS thread. Two reasons, measured on a 2-core machine (OpenBLAS 0.3.31 in
NumPy 2.4, XLA CPU in jaxlib 0.10):
- one thread is as fast for them: a 576-wide singular-value SVD took 43 ms on one thread and 44 ms on two;
  at d = 768 it was 119 against 104 ms, at d = 896 188 against 144 ms.
- more threads slow down the next XLA program. OpenBLAS's worker threads spin for a while after each call,
  on the cores XLA wants. SmolLM2's 32-token prefix pass took 112 ms straight after a two-thread SVD and
  77 ms after a pause. Over consecutive exact spectra (`JacobianOperator.singular_values`) a call took
  0.460 s with two threads and 0.421 s with one.

Larger d keeps the library's thread count: there the SVD's parallel speed-up outweighs the spin. Set
`SINGLE_THREAD_MAX_D = 0` to turn the policy off.
"""

from __future__ import annotations

import contextlib

from threadpoolctl import threadpool_limits

SINGLE_THREAD_MAX_D = 768


def dense_threads(d: int):
    """Context manager for float64 NumPy work on d x d matrices: every loaded BLAS limited to one thread
    when d <= SINGLE_THREAD_MAX_D, otherwise a no-op. (Entering scans the loaded libraries, ~0.3 ms, so
    a BLAS loaded later is covered too.)"""
    if d > SINGLE_THREAD_MAX_D:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
