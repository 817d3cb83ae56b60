"""benchmarks/bench_kernels.py and benchmarks/gpu_check.py run (tiny sizes on CPU); their numbers are not asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.triton
def test_bench_kernels_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "k.json"
    assert _load("bench_kernels").main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    ops = {(r["op"], r["backend"]) for r in res["rows"]}
    assert ops >= {("pq_topk", "triton"), ("sparse_attn", "triton"), ("topk+attn", "triton"), ("pq_topk", "torch"),
                   ("dense_sdpa", "torch")}
    assert all(r["error"] is None and r["us"] > 0 and r["bytes"] > 0 for r in res["rows"])
    assert res["device"]


def test_gpu_check_steps_are_listed(capsys):
    mod = _load("gpu_check")
    assert mod.main(["--list"]) == 0
    names = [s.name for s in mod.STEPS]
    assert names[:2] == ["kernel_tests", "bench_kernels"] and len(set(names)) == len(names)
    assert "kernel_tests" in capsys.readouterr().out


def test_gpu_check_runs_the_benchmark_gates_and_summarises_their_table():
    mod = _load("gpu_check")
    step = next(s for s in mod.STEPS if s.name == "bench_gates")
    assert step.cmd[1:4] == ["-m", "pytest", "benchmarks"] and "--benchmark-json" in step.cmd
    out = ("......\n= pqpatch decode-step benchmark (min of interleaved rounds) =\n"
           "      N bits dtype ...\n  32768    6 float32  1.0 ...  step_vs_dense 0.13 <= gate 0.25\n"
           "----- benchmark: 3 tests -----\nName (time in ms)  Min\n1 failed, 5 passed in 9.70s\n")
    lines = step.summary(out)
    assert lines[1].strip().startswith("32768") and lines[-1] == "1 failed, 5 passed in 9.70s" and len(lines) == 3
