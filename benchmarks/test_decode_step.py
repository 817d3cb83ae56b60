"""Regression gates of one PQ layer decode step (issue 9): Llama-3-8B layer shape (32 query heads, 8 KV heads, head
dim 128), B = 1, m = 2, b = 6 and 8, k = N/5, torch.set_num_threads(1) on CPU.

Time gates are ratios to dense SDPA measured in the same rounds, called the way transformers calls it for a decode
step with a cache mask (`sdpa_attention_forward`'s `pack_gqa`): the G query heads of a KV head become G query rows,
[B, Hkv, G, D] against [B, Hkv, N, D], so K and V are read once. On CPU that is ~3.7x faster at 32K than
`enable_gqa=True` (which reads them once per query head), the baseline of stops 9-15: its ratios were too low by
that factor. The enable_gqa time is reported beside it (dense_gqa column), not gated. Counters (bytes, tokens,
graph breaks, recompiles) are exact. Thresholds and targets: thresholds.json.
The floor is the time to read the k selected rows' worth of K and V with a plain contiguous read; the gather floor
copies the selected rows themselves out with index_select (random rows: bound by memory latency, not bandwidth).
Report only (no gate): the fused shortlist op of a re-ranked step (`kernels.pq_shortlist`, 2k = N/5 of all N
candidates) against the two ops it replaced (`pq_topk` + `pq_log_partition`), same rounds: the fused/2ops column.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bench_util import ROWS, THRESHOLDS, Timer, device_kind, gate, interleaved_min, settings
from pqpatch import kernels
from pqpatch.config import DEFAULT_RERANK

HKV, G, D, M = 8, 4, 128, 2
SET = settings()
CUDA = device_kind() == "cuda"
DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _one_thread():
    """The issue's CPU setting: one intra-op thread for every op, dense SDPA included."""
    before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cache_buffer(x: torch.Tensor) -> torch.Tensor:
    """x in the memory a PQ layer's cache lives in: on CPU transparent huge pages where the kernel offers them
    (`pqpatch.hugepages`, what `PQLayer` allocates its K/V with), else x itself. Dense SDPA reads the same buffers,
    so both sides of every ratio see the same pages."""
    if x.device.type != "cpu":
        return x
    from pqpatch import hugepages

    return hugepages.zeros(tuple(x.shape), x.dtype).copy_(x)


def make_case(n: int, bits: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs of one layer step and its timed callables."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    kc = 2 ** bits
    q = torch.randn(1, HKV, G, D, generator=gen, device=DEV, dtype=dtype)
    keys = _cache_buffer(torch.randn(1, HKV, n, D, generator=gen, device=DEV, dtype=dtype))
    values = _cache_buffer(torch.randn(1, HKV, n, D, generator=gen, device=DEV, dtype=dtype))
    cent = torch.randn(1, HKV, M, kc, D // M, generator=gen, device=DEV, dtype=dtype)
    codes = torch.randint(0, kc, (1, HKV, n, M), generator=gen, device=DEV, dtype=torch.uint8)
    lo = torch.zeros(1, dtype=torch.int64, device=DEV)
    hi = torch.full((1,), n, dtype=torch.int64, device=DEV)
    k, scaling, backend = n // 5, 1.0 / math.sqrt(D), SET["backend"]
    q_sdpa = q.reshape(1, HKV * G, 1, D)  # head h = kv * G + g, as enable_gqa expects
    idx = kernels.pq_topk(q, cent, codes, lo, hi, k, scaling, backend=backend)
    as_int = torch.int32 if dtype == torch.float32 else torch.int16  # the floor reads bits: an integer max streams
    # the gather floor: the selected rows (ascending) copied out with index_select, no arithmetic
    rows = (idx.sort(-1).values.clamp_min(0) + torch.arange(HKV, device=DEV).view(1, HKV, 1) * n).view(-1)
    k_buf, v_buf = keys.new_empty(rows.numel(), D), values.new_empty(rows.numel(), D)
    k_top = k // 2  # the default budget split: half window, half top-k (sink_tokens aside)
    window = torch.arange(n - (k - k_top), n, device=DEV).expand(1, HKV, -1).contiguous()  # [1, Hkv, k - k_top]
    hi_c = torch.full((1,), n - (k - k_top), dtype=torch.int64, device=DEV)  # the candidates end at the window

    def step_rerank():
        """The default step (rerank=None resolves to DEFAULT_RERANK on resident caches), as PQLayer._rerank_decode:
        an r x k shortlist by the codes with each head's log-partition (one op), then exact re-ranking fused with
        the attention, with the default composition: k attended = a window of k/2 recent tokens + a top-k of k/2
        among the rest."""
        short, log_z = kernels.pq_shortlist(q, cent, codes, lo, hi_c, DEFAULT_RERANK * k_top, scaling,
                                            backend=backend)
        return kernels.rerank_attention(q, keys, values, short, window, k_top, scaling, backend=backend, log_z=log_z)

    fns = dict(
        # the baseline: transformers' decode call (pack_gqa), the G heads of a KV head as G query rows
        dense=lambda: F.scaled_dot_product_attention(q, keys, values, scale=scaling),
        dense_gqa=lambda: F.scaled_dot_product_attention(q_sdpa, keys, values, scale=scaling, enable_gqa=True),
        topk=lambda: kernels.pq_topk(q, cent, codes, lo, hi, k, scaling, backend=backend),
        attn=lambda: kernels.sparse_decode_attention(q, keys, values, idx, scaling, backend=backend),
        step=lambda: kernels.sparse_decode_attention(
            q, keys, values, kernels.pq_topk(q, cent, codes, lo, hi, k, scaling, backend=backend), scaling,
            backend=backend),
        step_rerank=step_rerank,
        # report only: the fused shortlist op (2k = N/5 of all N) against the two ops it replaced, same rounds
        shortlist=lambda: kernels.pq_shortlist(q, cent, codes, lo, hi, k, scaling, backend=backend),
        shortlist_2ops=lambda: (kernels.pq_topk(q, cent, codes, lo, hi, k, scaling, backend=backend),
                                kernels.pq_log_partition(q, cent, codes, lo, hi, scaling, backend=backend)),
        floor=lambda: (keys[:, :, :k].view(as_int).amax(), values[:, :, :k].view(as_int).amax()),
        gather=lambda: (torch.index_select(keys.view(-1, D), 0, rows, out=k_buf),
                        torch.index_select(values.view(-1, D), 0, rows, out=v_buf)),
    )
    return dict(n=n, k=k, bits=bits, dtype=dtype, idx=idx, fns=fns, q=q, keys=keys, values=values, cent=cent,
                codes=codes, lo=lo, hi=hi, scaling=scaling)


def measure_with_benchmark(benchmark, fns: dict, rounds: int, timer: Timer) -> dict[str, float]:
    """pytest-benchmark records the full step (into --benchmark-json); the other ops are timed in its setup, in
    rotating order, so every round interleaves all of them. Returns min seconds per op."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    others = [name for name in fns if name != "step"]
    counter = itertools.count()

    def setup():
        r = next(counter)
        for name in others[r % len(others):] + others[: r % len(others)]:
            times[name].append(timer(fns[name]))

    def target():
        times["step"].append(timer(fns["step"]))

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
    if min(len(v) for v in times.values()) < rounds:  # --benchmark-disable runs the target once: time it here
        return interleaved_min(fns, rounds, timer)
    return {name: min(v) for name, v in times.items()}


def summarise(case: dict, best: dict[str, float]) -> dict:
    d = best["dense"]
    return dict(n=case["n"], bits=case["bits"], dtype=str(case["dtype"]).replace("torch.", ""),
                dense_ms=d * 1e3, dense_gqa_ms=best["dense_gqa"] * 1e3, topk_ms=best["topk"] * 1e3,
                attn_ms=best["attn"] * 1e3,
                step_ms=best["step"] * 1e3, step_rerank_ms=best["step_rerank"] * 1e3,
                step_rerank_vs_dense=best["step_rerank"] / d, floor_ms=best["floor"] * 1e3, gather_ms=best["gather"] * 1e3, step_vs_dense=best["step"] / d,
                shortlist_ms=best["shortlist"] * 1e3, shortlist_2ops_ms=best["shortlist_2ops"] * 1e3,
                shortlist_vs_2ops=best["shortlist"] / best["shortlist_2ops"],
                select_vs_dense=best["topk"] / d, attn_vs_dense=best["attn"] / d, floor_vs_dense=best["floor"] / d)


def check_time_gates(row: dict) -> list[tuple[bool, str]]:
    if row["n"] not in SET["gated_sizes"]:
        return []
    checks = [gate("step_vs_dense", row["step_vs_dense"], SET),
              gate("step_rerank_vs_dense", row["step_rerank_vs_dense"], SET),
              gate(f"select_vs_dense_b{row['bits']}", row["select_vs_dense"], SET)]
    if CUDA:
        checks.append(gate("attn_vs_dense", row["attn_vs_dense"], SET))
        checks.append(gate("attn_us", row["attn_ms"] * 1e3, SET))
        if row["bits"] == 6:
            checks.append(gate("select_us_b6", row["topk_ms"] * 1e3, SET))
    return checks


@pytest.mark.parametrize("bits", [6, 8])
@pytest.mark.parametrize("n", SET["sizes"])
def test_step_vs_dense(benchmark, n, bits):
    """selection + sparse attention vs dense SDPA (float32); selection alone vs dense."""
    case = make_case(n, bits, torch.float32)
    timer = Timer(CUDA)
    row = summarise(case, measure_with_benchmark(benchmark, case["fns"], SET["rounds"], timer))
    checks = check_time_gates(row)
    if not all(ok for ok, _ in checks):  # one re-measurement before failing: a neighbour may have stolen the core
        row = summarise(case, interleaved_min(case["fns"], SET["rounds"], timer))
        row["retried"] = True
        checks = check_time_gates(row)
    row["verdict"] = "; ".join(msg for _, msg in checks) or "not gated at this N"
    benchmark.extra_info.update(row)
    ROWS.append(row)
    failed = [msg for ok, msg in checks if not ok]
    assert not failed, failed


def test_bf16_not_slower_than_fp32(benchmark):
    """The patched ops on a bfloat16 cache cost no more than on a float32 one (same N, b = 6, same rounds)."""
    n = SET["sizes"][0]
    c32, c16 = make_case(n, 6, torch.float32), make_case(n, 6, torch.bfloat16)
    fns = {**{f"{name}": fn for name, fn in c16["fns"].items()}, "step32": c32["fns"]["step"]}
    timer = Timer(CUDA)

    def verdict(best):
        ratio = best["step"] / best["step32"]
        return ratio, gate("bf16_vs_fp32_step", ratio, SET)

    best = measure_with_benchmark(benchmark, fns, SET["rounds"], timer)
    ratio, (ok, msg) = verdict(best)
    if not ok:
        best = interleaved_min(fns, SET["rounds"], timer)
        ratio, (ok, msg) = verdict(best)
    row = summarise(c16, best)
    row["verdict"] = msg + f" (fp32 step {best['step32'] * 1e3:.2f} ms)"
    benchmark.extra_info.update(row)
    ROWS.append(row)
    assert ok, msg


@pytest.mark.parametrize("bits", [6, 8])
def test_counters(bits):
    """Exact counters of one step at the smallest gated size: K/V bytes read vs dense, tokens attended, index size."""
    n = min(SET["gated_sizes"])
    case = make_case(n, bits, torch.float32)
    idx, k = case["idx"].cpu(), case["k"]
    gates = THRESHOLDS["counters"]
    valid = idx >= 0
    per_head = valid.sum(-1)
    assert bool((per_head == k).all()), f"tokens attended per head {per_head.tolist()} != k = {k}"
    assert all(row[row >= 0].unique().numel() == k for row in idx.view(-1, k)), "a token listed twice"
    assert float(per_head.min()) / k == gates["tokens_attended_vs_k"]["gate"]
    row_bytes = (case["keys"].shape[-1] + case["values"].shape[-1]) * case["keys"].element_size()
    kv_read, kv_dense = int(valid.sum()) * row_bytes, HKV * n * row_bytes
    assert kv_read / kv_dense <= gates["kv_bytes_vs_dense"]["gate"], (kv_read, kv_dense)
    index_bytes = case["codes"].numel() * case["codes"].element_size() + case["cent"].numel() * 4
    assert index_bytes / kv_dense <= gates["index_bytes_vs_kv_bytes"]["gate"], (index_bytes, kv_dense)


def test_compiled_step_graph_breaks_and_recompiles():
    """A kernel-level decode step (select, attend, encode the new key) compiles to one graph, without recompiling
    when the values (lo, hi, cache contents) change between steps."""
    compiles = 0

    def counting_backend(gm, example_inputs):  # noqa: ARG001 - torch.compile backend signature
        nonlocal compiles
        compiles += 1
        return gm.forward

    backend = SET["backend"]

    def step(q, c, codes, keys, values, lo, hi):
        idx = kernels.pq_topk(q, c, codes, lo, hi, 64, 0.088, backend=backend)
        out, lse = kernels.sparse_decode_attention(q, keys, values, idx, 0.088, backend=backend)
        return out, lse, kernels.pq_assign(keys[:, :, -1:], c, backend=backend)

    case = make_case(1024, 6, torch.float32)
    args = lambda s: (torch.randn_like(case["q"]), case["cent"], case["codes"], case["keys"], case["values"],  # noqa
                      torch.full_like(case["lo"], s), torch.full_like(case["hi"], 1024 - s))
    explanation = torch._dynamo.explain(step)(*args(0))
    assert explanation.graph_break_count <= THRESHOLDS["counters"]["graph_breaks"]["gate"]
    compiled = torch.compile(step, backend=counting_backend, fullgraph=True, dynamic=False)
    for s in (0, 3, 17):
        compiled(*args(s))
    assert compiles - 1 <= THRESHOLDS["counters"]["recompiles"]["gate"], f"{compiles} compilations"
    torch._dynamo.reset()
