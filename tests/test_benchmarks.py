"""The benchmark scripts run end to end (CPU smoke size); their numbers are for humans, not asserted."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_decode_smoke(tmp_path):
    rows = _load("bench_decode").main(["--smoke", "--out", str(tmp_path / "d.json")])
    assert {r["method"] for r in rows} >= {"dense", "pq", "pq_offload"}
    assert all("ms_per_token" in r for r in rows)
    assert (tmp_path / "d.json").exists()
