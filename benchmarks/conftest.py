"""pytest configuration of the benchmark suite: a one-line-per-case table at the end of the session (the helpers
live in bench_util.py; this file only hooks pytest)."""

from __future__ import annotations

import pytest

from bench_util import ROWS, settings


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest hook signature
    if not ROWS:
        return
    tr = terminalreporter
    from pqpatch.kernels import native

    # which CPU path the gates measured: the native kernels, or the ATen fallback (no C compiler, PQPATCH_NATIVE=0)
    tr.write_line(f"native CPU kernels: {'yes' if native.available() else 'no (' + str(native.unavailable_reason) + ')'}")
    model_rows = [r for r in ROWS if r.get("kind") in ("model", "counter")]
    step_rows = [r for r in ROWS if r.get("kind") not in ("model", "counter")]
    if model_rows:
        tr.section("pqpatch end to end (default config vs the unpatched model, same process; min of interleaved rounds)")
        for r in model_rows:
            if r["kind"] == "counter":
                tr.write_line(f"{r['name']:<48} {r['verdict']}")
            else:
                tr.write_line(f"{r['name']:<40} N={r['n']:>6}  dense {r['dense_ms']:9.1f} ms  pqpatch {r['pq_ms']:9.1f} "
                              f"ms  {r['verdict']}")
    if not step_rows:
        return
    tr.section("pqpatch decode-step benchmark (min of interleaved rounds; ratios vs dense SDPA of the same rounds)")
    tr.write_line(f"{'N':>7} {'bits':>4} {'dtype':<8} {'dense ms':>9} {'gqa ms':>8} {'topk ms':>8} {'attn ms':>8} "
                  f"{'step ms':>8} "
                  f"{'step/dense':>10} {'rr/dense':>8} {'topk/dense':>10} {'floor ms':>8} {'floor/dense':>11} {'gather ms':>9} "
                  f"{'2ops ms':>8} {'fused ms':>8} {'fused/2ops':>10}  verdict")
    for r in step_rows:
        tr.write_line(f"{r['n']:>7} {r['bits']:>4} {r['dtype']:<8} {r['dense_ms']:9.2f} {r['dense_gqa_ms']:8.2f} "
                      f"{r['topk_ms']:8.2f} "
                      f"{r['attn_ms']:8.2f} {r['step_ms']:8.2f} {r['step_vs_dense']:10.3f} "
                      f"{r['step_rerank_vs_dense']:8.3f} {r['select_vs_dense']:10.3f} {r['floor_ms']:8.2f} {r['floor_vs_dense']:11.3f} {r['gather_ms']:9.2f} "
                      f"{r['shortlist_2ops_ms']:8.2f} {r['shortlist_ms']:8.2f} {r['shortlist_vs_2ops']:10.3f}  "
                      f"{r.get('verdict', '')}")


@pytest.fixture(scope="session")
def bench_settings() -> dict:
    return settings()
