"""The benchmark scripts run end to end (CPU smoke size); their numbers are for humans, not asserted. What is
asserted is their honesty: no k-means job of one call runs inside the next timed call, the offload speed-up is
only on offloaded rows, and a failing row makes the script exit non-zero."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_decode_smoke_no_kmeans_leaks_into_timed_calls(tmp_path):
    mod = _load("bench_decode")
    build, entries = mod.build_model, []

    def build_watched(*args, **kwargs):
        model = build(*args, **kwargs)
        generate = model.generate

        def watched(*a, **kw):  # at the start of every call: is a k-means job of an earlier call still pending?
            state = getattr(model, "_pqpatch", None)
            entries.append(None if state is None else state.pool.drain(timeout=0))
            return generate(*a, **kw)

        model.generate = watched
        return model

    mod.build_model = build_watched
    rows = mod.run(["--smoke", "--out", str(tmp_path / "d.json")])
    assert {r["method"] for r in rows} >= {"dense", "pq", "pq_offload"}
    assert all("ms_per_token" in r for r in rows), rows
    assert all("speedup_vs_hf_offload" not in r for r in rows if r["method"] != "pq_offload")
    assert (tmp_path / "d.json").exists()
    patched = [e for e in entries if e is not None]
    assert len(patched) >= 8 and all(patched), "a k-means job of an earlier call was still pending"


def test_bench_decode_exit_status_reports_a_failed_row(tmp_path, monkeypatch):
    mod = _load("bench_decode")
    measure = mod.measure
    monkeypatch.setattr(mod, "measure", lambda model, method, *a: {"error": "boom"} if method == "pq"
                        else measure(model, method, *a))
    assert mod.main(["--smoke", "--methods", "dense,pq", "--out", str(tmp_path / "d.json")]) == 1
    monkeypatch.setattr(mod, "measure", lambda *a: {"ms_per_token": 1.0, "prefill_s": 0.0, "first_decode_s": 0.0,
                                                     "peak_gpu_gib": None})
    assert mod.main(["--smoke", "--methods", "dense", "--out", str(tmp_path / "d.json")]) == 0


@pytest.mark.parametrize("argv", [["--n", "2048", "--rounds", "1", "--aten"],
                                  ["--n", "2048", "--rounds", "1", "--dtype", "bfloat16", "--primitives"]])
def test_bench_step_phases_runs(argv, monkeypatch, capsys):
    """The per-part timing script runs end to end at a small size and prints every part."""
    mod = _load("bench_step_phases")
    monkeypatch.setattr(sys, "argv", ["bench_step_phases.py", *argv])
    before = torch.get_num_threads()
    try:
        mod.main()
    finally:
        torch.set_num_threads(before)
        torch.set_grad_enabled(True)
    out = capsys.readouterr().out
    for part in ("pq_shortlist", "rerank_attention", "rerank_topk", "PQLayer.decode", "dense SDPA"):
        assert part in out
    assert ("np.partition" in out) == ("--primitives" in argv)
    assert ("aten" in out) == ("--aten" in argv)  # the fallback's column


def test_bench_hugepages_runs(monkeypatch, capsys):
    mod = _load("bench_hugepages")
    monkeypatch.setattr(sys, "argv", ["bench_hugepages.py", "--n", "4096", "--rounds", "1"])
    before = torch.get_num_threads()
    try:
        mod.main()
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "gather huge" in out and "contiguous ordinary" in out
