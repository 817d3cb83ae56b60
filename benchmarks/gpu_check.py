"""One command for a lent GPU machine: native kernel/GPU tests, then the kernel benchmark, one summary table.

    python benchmarks/gpu_check.py              # every step, ~3-4 minutes on an H100
    python benchmarks/gpu_check.py --list       # step names
    python benchmarks/gpu_check.py --only bench_kernels

Each step is a `Step` in STEPS: a name, a command run from the repository root (PYTHONPATH set to it), a timeout
and an optional `summary` that turns the step's output into the lines of the final table. To add a section (e.g. a
decode benchmark), append a Step; steps run in order, a failing step does not stop the later ones, and the exit
status is non-zero if any step failed. Results land in results/ (bench JSONs) and results/gpu_check.json.
Needs only torch, triton and pytest (no faiss, no gguf).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
PY = sys.executable


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout_s: int
    summary: Callable[[str], list[str]] | None = None  # output -> table lines (status/time are added anyway)
    env: dict[str, str] = field(default_factory=dict)


def _pytest_summary(output: str) -> list[str]:
    tail = [ln for ln in output.strip().splitlines() if ln.strip()]
    return [tail[-1][:110]] if tail else []


def _bench_kernels_summary(_: str) -> list[str]:
    """Headline numbers at the largest N vs the H100 targets (pq_topk <= 25 us, sparse_attn <= 57 us at k = N/5)."""
    path = RESULTS / "bench_kernels.json"
    if not path.exists():
        return ["no results/bench_kernels.json"]
    res = json.loads(path.read_text())
    rows = res["rows"]
    n = max(r["n"] for r in rows)
    # the CUDA-graph replay (no Python launch overhead, L2 flushed as for "us"); the eager time when capture failed
    best = lambda r: (r["graph_us"] if r["graph_us"] is not None else r["us"]) if r["us"] else None  # noqa: E731
    lines = [f"{res['device']}, N={n} (CUDA graph replay, L2 flushed)"]
    target = {"pq_topk": 25.0, "sparse_attn": 57.0}
    for r in rows:
        if r["n"] != n or (r["k"] not in (n, n // 5)):
            continue
        b = best(r)
        on_target = r["backend"] == "triton" and r["k"] == n // 5 and not res.get("smoke")
        t = target.get(r["op"]) if on_target else None
        verdict = "" if t is None or b is None else ("  OK" if b <= t else f"  MISSES {t:.0f} us target")
        lines.append(f"  {r['op']:<12} {r['backend']:<7} k={r['k']:<6} "
                     + ("ERROR" if b is None else f"{b:8.1f} us {r['gbps']:6.0f} GB/s") + verdict)
    return lines


def _bench_decode_summary(_: str) -> list[str]:
    """ms/token per method and the speed-up over transformers' offloaded cache (issue target: >= 3x at 32K)."""
    path = RESULTS / "bench_decode.json"
    if not path.exists():
        return ["no results/bench_decode.json"]
    res = json.loads(path.read_text())
    lines = [f"{res['device']}, {res['layers']} layers (Llama-3-8B shape)"]
    for r in res["rows"]:
        head = f"  ctx={r['context']:<7} B={r['batch']} {r['method']:<11}"
        if "error" in r:
            lines.append(f"{head} {r['error']}")
            continue
        extra = f" x{r['speedup_vs_hf_offload']:.2f} vs hf_offload" if "speedup_vs_hf_offload" in r else ""
        kv = f" GPU KV {r['gpu_kv_mib']:.0f}/{r['dense_kv_mib']:.0f} MiB" if "gpu_kv_mib" in r else ""
        lines.append(f"{head} {r['ms_per_token']:8.2f} ms/tok peak {r['peak_gpu_gib'] or 0:.1f} GiB{kv}{extra}")
    return lines


def _bench_gates_summary(output: str) -> list[str]:
    """The suite's printed table (one line per case, with its gate verdicts) and pytest's last line."""
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if "pqpatch decode-step benchmark" in ln), None)
    table: list[str] = []
    for ln in lines[start + 1:] if start is not None else []:
        if not ln.strip() or ln.startswith(("-", "=")):
            break  # the table ends where pytest-benchmark's own table (or the summary line) begins
        table.append(ln[:150])
    return table + _pytest_summary(output)


STEPS: list[Step] = [
    Step("kernel_tests", [PY, "-m", "pytest", "-m", "gpu or triton", "-x", "-q", "tests/"], 200, _pytest_summary),
    Step("bench_kernels", [PY, "benchmarks/bench_kernels.py", "--out", str(RESULTS / "bench_kernels.json")], 120,
         _bench_kernels_summary),
    # 4 of the 32 layers keep the step inside the 5-minute budget; per-token times scale with the layer count
    Step("bench_decode", [PY, "benchmarks/bench_decode.py", "--layers", "4", "--contexts", "32768,131072",
                          "--batches", "1", "--new-tokens", "8", "--out", str(RESULTS / "bench_decode.json")], 150,
         _bench_decode_summary),
    # the pytest-benchmark gates (benchmarks/thresholds.json, "cuda" section: 128K, pq_topk <= 25 us,
    # sparse attention <= 57 us, both < 1/3 of dense SDPA); the per-case table is the end of its output
    Step("bench_gates", [PY, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                         "--benchmark-json", str(RESULTS / "bench_gates.json")], 240, _bench_gates_summary),
    # a model split over 2 GPUs decodes like one GPU, kernels on a non-current GPU (skipped with fewer than 2 GPUs)
    Step("multi_gpu", [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                       "tests/test_multigpu.py"], 180, _pytest_summary),
    # eager vs compiled (CUDA graphs) pqpatch vs dense ms/token, Llama-3-8B attention shape, 4 layers, 32K
    Step("bench_compile", [PY, "benchmarks/bench_compile.py", "--device", "cuda", "--mode", "reduce-overhead",
                           "--lengths", "32768", "--layers", "4", "--threads", "4", "--steps", "16",
                           "--out", str(RESULTS / "bench_compile.json")], 240, lambda out: out.strip().splitlines()[-2:]),
    # issue 11: offload store writes are asynchronous (contiguous page-locked destinations), offload equals resident
    # on CUDA, pinned buffers are registered exactly and released, pool staging is reused (also in kernel_tests,
    # which stops at its first failure; here on their own)
    Step("offload_pinned", [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                            "tests/test_offload.py", "tests/test_pinned.py"], 180, _pytest_summary),
]


def run_step(step: Step) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **step.env}
    t0 = time.time()
    try:
        proc = subprocess.run(step.cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout_s)
        output, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0 else f"FAIL rc={proc.returncode}")
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = f"TIMEOUT {step.timeout_s}s"
    wall = time.time() - t0
    print(f"\n===== {step.name}: {status} in {wall:.0f}s =====")
    print(output[-6000:])
    try:
        lines = step.summary(output) if step.summary else []
    except Exception as e:  # a broken summary must not hide the status
        lines = [f"summary failed: {type(e).__name__}: {e}"]
    return dict(name=step.name, status=status, wall_s=round(wall, 1), summary=lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", help="run only these steps")
    ap.add_argument("--skip", nargs="+", default=[], help="skip these steps")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(f"{s.name:<16} timeout {s.timeout_s:>4}s  {' '.join(s.cmd[1:])}" for s in STEPS))
        return 0
    steps = [s for s in STEPS if (not args.only or s.name in args.only) and s.name not in args.skip]
    RESULTS.mkdir(exist_ok=True)
    results = [run_step(s) for s in steps]

    print("\n" + "=" * 100)
    print(f"{'step':<16} {'status':<16} {'wall s':>7}  summary")
    for r in results:
        first, *rest = r["summary"] or [""]
        print(f"{r['name']:<16} {r['status']:<16} {r['wall_s']:>7.0f}  {first}")
        for ln in rest:
            print(f"{'':<42}{ln}")
    (RESULTS / "gpu_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
