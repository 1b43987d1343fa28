"""The benchmark scripts run end to end (on a tiny model) and agree with their peers: a smoke test of
benchmarks/jacobian_spectrum.py (all three parts). Timings are printed, never asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # 23 s: runs the benchmark script against torch.func and SciPy (run with -m slow)
def test_jacobian_spectrum_benchmark_runs_and_agrees_with_peers(tiny_checkpoints):
    folder = tiny_checkpoints["llama3_untied_gqa2"][0]
    argv = [sys.executable, str(BENCHMARKS / "jacobian_spectrum.py"), "--model", str(folder), "--repeats", "1",
            "--prompt-len", "8", "--k", "4", "--gen-batch", "2", "--gen-tokens", "4"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for heading in ("(a) exact spectrum", "(b) top-4 singular values", "(c) steered generation"):
        assert heading in out
    # float32 everywhere: every route agrees with the exact spectrum to well under 1e-4 of sigma_max
    agreement = re.search(r"agreement \(max \|diff\| / sigma_max\): (.*)", out).group(1)
    accuracy = re.search(r"accuracy of the top 4 vs the exact spectrum \(max \|diff\| / sigma_max\): (.*)",
                         out).group(1)
    errors = [float(x) for x in re.findall(r" (\d\.\de[-+]\d\d)", " " + agreement + ", " + accuracy)]
    assert len(errors) == 7 and max(errors) < 1e-4, (agreement, accuracy)
    assert out.count("converged True") == 3  # auto route, block Lanczos on M D and on J
    for dtype in ("float32", "bfloat16"):  # (c) compares in both weight dtypes
        assert re.search(rf"{dtype} +steerjax sj\.generate\s+\d", out), out[-2000:]
        assert re.search(rf"{dtype} +HF generate \(sdpa\) \+ hook\s+\d.*x$", out, re.M), out[-2000:]
    assert re.search(r"jax \d+\.\d GB/s, torch \d+\.\d GB/s", out)
