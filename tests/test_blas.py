"""The BLAS thread policy for float64 d x d work (steerjax.blas)."""

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_info, threadpool_limits

from steerjax import blas

# scipy ships its own OpenBLAS: loading it here makes the policy's tests cover that library too
SCIPY_GEMM = scipy.linalg.get_blas_funcs("gemm")


def blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_small_dense_work_runs_on_one_blas_thread_and_restores():
    assert blas_threads(), "no BLAS library visible to threadpoolctl"
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        with blas.dense_threads(blas.SINGLE_THREAD_MAX_D):
            assert blas_threads() == {1}
            a = np.random.default_rng(0).normal(size=(64, 64))
            np.testing.assert_allclose(np.linalg.svd(a, compute_uv=False) ** 2,
                                       np.sort(np.linalg.eigvalsh(a.T @ a))[::-1], rtol=1e-10)
        assert blas_threads() == {2}


def test_large_dense_work_and_disabled_policy_keep_the_thread_count(monkeypatch):
    with threadpool_limits(limits=2, user_api="blas"):
        with blas.dense_threads(blas.SINGLE_THREAD_MAX_D + 1):
            assert blas_threads() == {2}
        monkeypatch.setattr(blas, "SINGLE_THREAD_MAX_D", 0)
        with blas.dense_threads(64):
            assert blas_threads() == {2}
