"""Nothing in the library assumes the CPU backend or the default device where it claims not to (README "GPU and
TPU"). There is no accelerator here, so the checks run on 2 host devices: the device count is fixed when jax
starts, while the rest of the suite runs on 1, so this file runs itself in a subprocess

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu python tests/test_device_agnostic.py DIR

on a tiny random Llama (vocab 160, d 64, 2 blocks) saved in DIR, and prints one JSON object: for each call (a steered
forward, J v, the exact factors and singular values, steered greedy generation, steering_kl, calibrate_alpha), its
result under `jax.default_device(jax.devices()[1])` and with the params `jax.device_put` on device 1, against the
same call on device 0, and the devices its jax arrays live on. The decode-path rule (the CPU kernels only on the CPU
backend) and the CPU-only compiler options are checked in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest

from steerjax import cpu_kernels, generation, xla
from steerjax.errors import InputError

# Device 1 is a second host device of the same CPU: the same XLA program on the same hardware, so its results
# should equal device 0's to the last bit (measured: 0 for every call). 1e-6 relative (a few float32 ulps) leaves
# room only for a different summation order, never for a different computation or a lost steer.
DEVICE_TOL = 1e-6
ROOT = Path(__file__).resolve().parents[1]
CALLS = ("forward", "matvec", "factors", "singular_values", "generate_logits", "steering_kl", "calibrate_alpha")
ARRAY_CALLS = ("forward", "matvec", "generate_logits")     # results that stay jax arrays (the rest are NumPy)
EXACT_CALLS = ("factors", "singular_values")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run_calls(sj, lm, ids, v, exact: bool = True) -> dict:
    """Every call of the check on `lm`: name -> result (a jax array or NumPy); generated tokens under "tokens".
    exact=False leaves out the exact factors and spectra (NumPy, from the same device programs as J v)."""
    steer = sj.Steer(layer=1, vector=v, alpha=2.0, positions="last")
    op = sj.jacobian_operator(lm, ids, layer=1, observable="fisher")   # the operator steering_kl builds: one compile
    gen = sj.generate(lm, ids, steer=steer, max_new_tokens=3, return_logits=True)
    out = {"forward": lm.forward(ids, steer=steer).logits, "matvec": op.matvec(v), "generate_logits": gen.logits,
           "tokens": gen.tokens, "steering_kl": sj.steering_kl(lm, ids, v, 1, 2.0).kl,
           "calibrate_alpha": np.float64(sj.calibrate_alpha(lm, ids, v, 1, target_kl=0.05).alpha)}
    if exact:
        out.update(factors=op.factors(), singular_values=op.singular_values())
    return out


def compare(ref: dict, got: dict) -> dict:
    """Relative errors against ref, whether the tokens agree, and where got's jax arrays live."""
    import jax

    names = [name for name in CALLS if name in got]
    return {"errors": {name: rel_err(got[name], ref[name]) for name in names},
            "tokens_equal": bool(np.array_equal(got["tokens"], ref["tokens"])),
            "devices": {name: sorted(str(dev) for dev in got[name].devices()) if isinstance(got[name], jax.Array)
                        else None for name in names}}


def device_checks(folder: str) -> dict:
    import jax

    import steerjax as sj

    start = time.perf_counter()
    dev0, dev1 = jax.devices()[:2]
    lm = sj.load_model(folder)
    rng = np.random.default_rng(0)
    ids, v = rng.integers(1, 160, (2, 6)).astype(np.int32), rng.normal(size=lm.d)
    ref = run_calls(sj, lm, ids, v)
    with jax.default_device(dev1):
        on_default = compare(ref, run_calls(sj, lm, ids, v))
    lm1 = lm.replace(params=jax.device_put(lm.params, dev1))       # committed to device 1, default device 0
    placed = compare(ref, run_calls(sj, lm1, ids, v, exact=False))  # (every call compiles again: kept short)
    panels = generation.decode_panels(lm1) if generation.decode_path(lm1) == "cpu_kernel" else {}
    return {"devices": [str(dev0), str(dev1)], "reference_devices": compare(ref, ref)["devices"],
            "default_device_1": on_default, "params_on_1": placed,
            "params_devices": sorted({str(dev) for leaf in jax.tree.leaves(lm1.params) for dev in leaf.devices()}),
            "decode_path": generation.decode_path(lm1),
            "panel_devices": sorted({str(dev) for leaf in jax.tree.leaves(panels) for dev in leaf.devices()}),
            "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def device_results(tmp_path_factory):
    from conftest import build_hf_model

    folder = tmp_path_factory.mktemp("device_agnostic")
    build_hf_model("llama3_untied_gqa2", num_layers=2).save_pretrained(folder)
    # cheaper LLVM passes cut the compile time that dominates (as tests/test_sharding.py; no numerics change)
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["default_device_1", "params_on_1"])
def test_results_on_device_1_equal_device_0_and_stay_there(device_results, case):
    """Under jax.default_device(device 1), and with the params device_put on device 1 (default device 0), every call
    gives device 0's result and its jax arrays live on device 1: nothing is moved to device 0 or jax.devices("cpu")."""
    res = device_results
    assert res["devices"] == ["cpu:0", "cpu:1"]                  # device 0 is the default device
    assert res["reference_devices"] == {name: [res["devices"][0]] if name in ARRAY_CALLS else None for name in CALLS}
    got = res[case]
    names = CALLS if case == "default_device_1" else [name for name in CALLS if name not in EXACT_CALLS]
    assert got["tokens_equal"] and sorted(got["errors"]) == sorted(names)
    assert all(err <= DEVICE_TOL for err in got["errors"].values()), got["errors"]
    assert got["devices"] == {name: [res["devices"][1]] if name in ARRAY_CALLS else None for name in names}


def test_params_and_decode_panels_stay_on_device_1(device_results):
    """device_put params stay where they were put; the CPU decode kernels (a CPU device, unsharded float32) pack their
    weights next to them and run there."""
    res = device_results
    assert res["params_devices"] == [res["devices"][1]]
    if res["decode_path"] == "cpu_kernel":
        assert res["panel_devices"] == [res["devices"][1]]
    else:                                             # no C++ compiler: XLA's dot, nothing packed
        assert res["decode_path"] == "xla_dot" and res["panel_devices"] == []


class StandInDevice(NamedTuple):
    platform: str
    id: int = 0


class StandInArray:
    """An array whose `.devices()` reports a device of one platform (all decode_kernels_possible reads of it)."""

    def __init__(self, platform: str):
        self.platform = platform

    def devices(self):
        return {StandInDevice(self.platform)}


def stand_in_model(platform: str, dtype: str = "float32"):
    return SimpleNamespace(params={"embed": StandInArray(platform)}, mesh=None, dtype=np.dtype(dtype))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_cpu_decode_kernels_are_never_chosen_off_cpu(platform, monkeypatch):
    """decode_kernels_possible reads the platform of the params' devices: an unsharded float32 / bfloat16 model on a
    GPU or TPU never gets the CPU kernels (auto: XLA's dot; forced: a clear error) and never builds them, while the
    same stand-in on "cpu" passes the rule (the control that the stand-in is read at all)."""
    def never(*_):
        raise AssertionError("the CPU kernels were asked for off the CPU backend")

    monkeypatch.setattr(cpu_kernels, "available", never)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", never)
    monkeypatch.delenv(generation.DECODE_KERNELS_ENV, raising=False)
    for dtype in ("float32", "bfloat16"):
        assert generation.decode_kernels_possible(stand_in_model("cpu", dtype))
        lm = stand_in_model(platform, dtype)
        assert not generation.decode_kernels_possible(lm) and not generation.decode_kernels_apply(lm)
        assert generation.decode_path(lm) == "xla_dot" and generation.decode_path(lm, False) == "xla_dot"
        with pytest.raises(InputError, match=f"on the CPU backend .*{dtype} on {platform}, .*kernels: not built"):
            generation.decode_path(lm, True)
        monkeypatch.setenv(generation.DECODE_KERNELS_ENV, "1")
        with pytest.raises(InputError, match=f"{dtype} on {platform}"):
            generation.decode_path(lm)
        monkeypatch.delenv(generation.DECODE_KERNELS_ENV)


def test_cpu_compiler_options_only_on_cpu():
    assert xla.compiler_options("cpu") == xla.CPU_COMPILER_OPTIONS
    assert xla.compiler_options("gpu") is None and xla.compiler_options("tpu") is None


def test_load_sharded_without_the_cpu_backend_says_so(monkeypatch):
    """load_sharded stages weights on jax.devices("cpu")[0]; with JAX_PLATFORMS=cuda that backend is off, and jax's
    own error (an unknown backend) would not say why steerjax wants it."""
    import jax

    import steerjax as sj

    devices = jax.devices

    def no_cpu(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend: 'cpu' requested, but no platforms that are instances of cpu "
                               "are present")
        return devices(backend)

    monkeypatch.setattr(jax, "devices", no_cpu)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    with pytest.raises(InputError, match="JAX_PLATFORMS='cuda'.*JAX_PLATFORMS=cuda,cpu"):
        sj.load_sharded("/no/such/model", mesh=None)


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## GPU and TPU\n"):]
    return section[:section.index("\n## ", 1)]


def test_readme_memory_table_is_printed_by_console():
    """The README's exact-route memory table is `console.exact_route_memory_table()` (one row per (model, d, V), its
    cells `exact_route_memory`, the numbers `steerjax info` prints for a model of that d and V)."""
    from steerjax import console

    table = console.exact_route_memory_table()
    assert table in readme_section()
    assert [(d, V) for _, d, V in console.EXACT_ROUTE_MODELS] == [(2048, 128256), (4096, 128256), (8192, 128256)]
    row = table.splitlines()[3]                                            # Llama 3.1 8B
    assert row == "| Llama 3.1 8B | 4096 | 128256 | 1002.0 MiB | 2.0 GiB | 128.0 MiB |"
    assert console.exact_route_memory(4096, 128256, "float32")["dense_jacobian"]["bytes"] == 128256 * 4096 * 4


def test_readme_section_states_the_committed_facts():
    """The jax requirement, the decode-kernel rule and the device count are the ones in the code."""
    import tomllib

    section = " ".join(readme_section().split())
    jax_requirement = [dep for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
                       if dep.startswith("jax")]
    assert jax_requirement == ["jax>=0.9.1"] and section.count("`jax>=0.9.1`") == 2
    rule = generation.decode_kernels_possible.__doc__.split(" (")[0]
    assert rule == "Unsharded float32 / bfloat16 weights on the CPU backend" and f'"{rule.lower()}"' in section.lower()
    assert "on 2 forced host devices" in section and "--xla_force_host_platform_device_count=2" in __doc__


if __name__ == "__main__":
    print(json.dumps(device_checks(sys.argv[1])))
