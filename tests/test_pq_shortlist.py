"""`pq_shortlist` (the PQ top-k and the per-head log-partition of the same candidates as one op) on every backend
against the two separate references, `reference.pq_topk_ref` and `log_partition.log_partition_ref`, and against
the two separate ops of the same backend ("cpu": bit for bit; "triton": log_z bit for bit, the selection by its
rule). "triton" runs in the interpreter on a machine without CUDA (tests/conftest.py).

The selection is checked by its rule on the reference's float32 scores, not by index equality (ties and float
rounding may order near-equal tokens differently): min(k, k_valid, candidates) distinct candidates, then -1, and
every candidate scoring clearly above the lowest selected score is selected. Fixed cases over the axes, a fixed
seed set of random draws and one fresh draw per run (PQPATCH_SEED=<seed> replays it).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from pqpatch import kernels
from pqpatch.kernels import cpu_select, cpu_shortlist, log_partition
from pqpatch.kernels import reference as ref
from pqpatch.kernels.log_partition import log_partition_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# "clearly above": CPU float64/float32 code tables vs the reference's float32 logits (test_kernels_cpu.py); Triton
# resolves scores to 2**-16 relative (test_kernels.py)
_REL = {"torch": 0.0, "cpu": 1e-5, "triton": 1e-4}
BACKENDS = ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]


def _inputs(seed, hkv, g, d, m, bits, n, ranges, b=2):
    """Random query, centroids, codes [b, ...] and candidate ranges lo, hi [b] (different per sequence)."""
    gen = torch.Generator().manual_seed(seed)
    kc = 2 ** bits
    q = torch.randn(b, hkv, g, d, generator=gen)
    c = torch.randn(b, hkv, m, kc, d // m, generator=gen)
    codes = torch.randint(0, kc, (b, hkv, n, m), generator=gen, dtype=torch.uint8)
    lo, hi = {
        "full": ([0, 0], [n, n]),
        "inner": ([min(3, n), 1], [max(n - 5, 0), n - 1]),  # lo > 0 and hi < N, differing
        "ragged": ([0, n // 3], [n, n - n // 4]),
        "empty": ([n // 2, -4], [n // 2, n + 9]),  # no candidate (lo = hi); clipped to [0, N)
    }[ranges]
    return q, c, codes, torch.tensor(lo[:b]), torch.tensor(hi[:b])


def _run(backend, *args, k_valid=None, outliers=None):
    if backend == "triton":
        pytest.importorskip("triton")
        idx, log_z = kernels.pq_shortlist(*(t.to(DEV) for t in args[:5]), *args[5:], backend=backend,
                                          k_valid=None if k_valid is None else k_valid.to(DEV),
                                          outliers=None if outliers is None else outliers.to(DEV))
        return idx.cpu(), log_z.cpu()
    return kernels.pq_shortlist(*args, backend=backend, k_valid=k_valid, outliers=outliers)


def check_against_references(backend, idx, log_z, q, c, codes, lo, hi, k, scaling, k_valid):
    """idx [B, Hkv, k] and log_z [B, Hkv, G] of `backend` against pq_topk_ref's rule and log_partition_ref."""
    b, h, g, _ = q.shape
    n = codes.shape[2]
    want_z = log_partition_ref(q, c, codes, lo, hi, scaling)
    assert log_z.shape == (b, h, g) and log_z.dtype == torch.float32
    empty = torch.isinf(want_z)
    assert torch.equal(torch.isinf(log_z), empty)  # -inf exactly where a sequence has no candidate
    torch.testing.assert_close(log_z[~empty], want_z[~empty], rtol=1e-5, atol=1e-4 * max(1.0, scaling))
    assert idx.shape == (b, h, k) and idx.dtype == torch.int64
    if backend == "torch":  # the reference itself
        assert torch.equal(idx, ref.pq_topk_ref(q, c, codes, lo, hi, k, scaling, k_valid))
        return
    kk = k if k_valid is None else max(0, min(int(k_valid), k))
    scores = ref.pq_scores_ref(q, c, codes, lo, hi, scaling)  # [B, Hkv, N], -inf outside [lo, hi)
    for bi in range(b):
        a, e = max(0, int(lo[bi])), min(n, int(hi[bi]))
        for hh in range(h):
            row, s = idx[bi, hh], scores[bi, hh]
            sel = row[row >= 0]
            assert sel.numel() == min(kk, max(0, e - a)), (bi, hh, sel.numel(), kk, e - a)
            assert bool((row[sel.numel():] == -1).all()), "the empty slots come last"
            assert sel.unique().numel() == sel.numel(), "a position listed twice"
            assert bool(((sel >= a) & (sel < e)).all()), "a position outside [lo, hi)"
            if sel.numel():
                kth = float(s[sel].min())
                above = torch.nonzero(s > kth * (1 + _REL[backend]) + 1e-30)[:, 0]
                missed = above[~torch.isin(above, sel)]
                assert missed.numel() == 0, f"b={bi} h={hh}: {missed[:5].tolist()} score above the k-th, not selected"


def check_against_separate_ops(backend, idx, log_z, q, c, codes, lo, hi, k, scaling, k_valid):
    """The fused op returns what pq_topk and pq_log_partition of the same backend return."""
    if backend == "torch":
        return  # the fused reference *is* the two references (check_against_references)
    args = [t.to(DEV) for t in (q, c, codes, lo, hi)] if backend == "triton" else [q, c, codes, lo, hi]
    kv = None if k_valid is None else k_valid.to(args[0].device)
    top = kernels.pq_topk(*args, k, scaling, backend=backend, k_valid=kv).cpu()
    assert torch.equal(log_z, kernels.pq_log_partition(*args, scaling, backend=backend).cpu())
    if backend == "cpu":
        assert torch.equal(idx, top)  # same order too: ascending positions
    elif DEV == "cpu":  # the interpreter runs programs in order: ties at the boundary are taken alike
        assert torch.equal(idx.sort(-1).values, top.sort(-1).values)


CASES = [  # (Hkv, G, D, m, bits, N, k, ranges, k_valid)
    (2, 4, 64, 2, 6, 1, 1, "full", None),  # N = 1
    (2, 1, 64, 2, 8, 17, 5, "inner", 3),  # lo > 0, hi < N; k_valid < k
    (1, 8, 128, 2, 8, 97, 20, "ragged", None),
    (2, 4, 256, 1, 6, 97, 200, "ragged", 150),  # k > candidates, k_valid between
    (2, 4, 128, 2, 6, 1000, 200, "ragged", None),
    (1, 8, 128, 2, 8, 1000, 333, "empty", 500),  # one sequence without candidates; k_valid > k
    (2, 4, 64, 2, 8, 1000, 0, "inner", None),  # k = 0: log_z alone
    (2, 1, 256, 1, 8, 1000, 250, "inner", 0),  # k_valid = 0: every slot -1, log_z still computed
    (1, 4, 64, 1, 6, 1000, 100, "full", None),  # m = 1: 64 codes < 1000 tokens, the radix over the code table
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}g{}d{}m{}b{}n{}k{}{}kv{}".format(*c))
def test_pq_shortlist_matches_references_and_separate_ops(backend, case, seed=0, scale=1.0):
    hkv, g, d, m, bits, n, k, ranges, kv = case
    q, c, codes, lo, hi = _inputs(seed + n + g + m + bits, hkv, g, d, m, bits, n, ranges)
    k_valid = None if kv is None else torch.tensor([kv])
    scaling = scale / math.sqrt(d)
    idx, log_z = _run(backend, q, c, codes, lo, hi, k, scaling, k_valid=k_valid)
    check_against_references(backend, idx, log_z, q, c, codes, lo, hi, k, scaling, k_valid)
    check_against_separate_ops(backend, idx, log_z, q, c, codes, lo, hi, k, scaling, k_valid)


# The CPU top-k's code-table paths need more tokens than codes allow above (m = 2 scores per token below 2 G n
# entries of table): the float32 table over a token list, the radix over the table's counts, and b = 8 (65536 codes)
CPU_TABLE_CASES = [  # (Hkv, G, D, m, bits, N, k, ranges, k_valid)
    (2, 4, 64, 2, 6, 3000, 600, "ragged", None),  # 4096 codes >= 3000 tokens: float32 table, threshold over tokens
    (2, 8, 128, 2, 6, 5000, 1000, "inner", 700),  # 4096 codes < 5000 tokens: radix select over the code table
    (1, 4, 128, 2, 8, 9000, 1800, "full", None),  # the library default b = 8 at its shortest table length
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", CPU_TABLE_CASES, ids=lambda c: "h{}g{}d{}m{}b{}n{}k{}{}kv{}".format(*c))
def test_pq_shortlist_code_table_paths(backend, case, cpu_path):
    """The cpu backend through the native kernels (every table size: per-token scores from the head's table) and
    through the ATen path (the table paths the comment above lists)."""
    test_pq_shortlist_matches_references_and_separate_ops(backend, case)


SEED = int(os.environ.get("PQPATCH_SEED", random.randrange(2 ** 31)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, pytest.param(SEED, id="fresh")])
def test_pq_shortlist_random_case(backend, seed):
    rng = random.Random(seed)
    n = rng.choice([1, 17, 97, 1000])
    case = (rng.choice([1, 2]), rng.choice([1, 4, 8]), rng.choice([64, 128, 256]), rng.choice([1, 2]),
            rng.choice([6, 8]), n, rng.randint(0, n + 5), rng.choice(["full", "inner", "ragged", "empty"]),
            rng.choice([None, rng.randint(0, n + 5)]))
    print(f"PQPATCH_SEED={seed} case={case}")
    test_pq_shortlist_matches_references_and_separate_ops(backend, case, seed=seed)


def _far_centroids(factor: float):
    """Codes 0..7 of 16 only, and the absent centroids 8..15 far along the query: every code's softmax factor is
    tiny next to the maximum over all 16 centroids, which the CPU code table and log-partition subtract."""
    q, c, codes, lo, hi = _inputs(11, 2, 4, 64, 2, 4, 600, "ragged")  # 600 tokens: the code-table path is chosen
    codes.random_(0, 8, generator=torch.Generator().manual_seed(1))
    c[..., 8:, :] = q.reshape(2, 2, 4, 2, 32).sum(2)[:, :, :, None, :] * factor
    return q, c, codes, lo, hi


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["large_logits", "far_centroids"])
def test_pq_shortlist_denominators_near_underflow(backend, kind):
    """Peaked scores. large_logits (as test_log_partition.py): the query x 40, logits ~1e3, where exp overflows
    without the max shift. far_centroids (as test_kernels_cpu.py): the CPU top-k's float32 code table underflows
    (checked) and is redone in float64, whose range still holds; log_z ~140 stays finite."""
    if kind == "large_logits":
        q, c, codes, lo, hi = _inputs(5, 2, 4, 64, 2, 8, 1000, "inner")
        q, scaling = q * 40, 1.0
    else:
        q, c, codes, lo, hi = _far_centroids(1.0)
        scaling = 5.0
        lut = cpu_select.pq_lut(q, c, scaling)
        assert cpu_select._code_scores(lut[0], codes[0]) is None  # float32: the guard fires ...
        assert cpu_select._code_scores(lut[0], codes[0], wide=True) is not None  # ... float64 holds
    idx, log_z = _run(backend, q, c, codes, lo, hi, 100, scaling)
    assert float(log_z.abs().max()) > 100 and bool(torch.isfinite(log_z).all())
    check_against_references(backend, idx, log_z, q, c, codes, lo, hi, 100, scaling, None)
    check_against_separate_ops(backend, idx, log_z, q, c, codes, lo, hi, 100, scaling, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pq_shortlist_float64_table_underflows(backend):
    """Farther still: the float64 code table underflows too and the CPU top-k scores per token, as `pq_topk` does.
    log_partition_cpu's documented range ends here as well (-inf once the candidates' best logit lies ~700 nats
    below the sum of the per-sub-space maxima over all centroids), and the fused op returns what it returns; the
    other backends sum per token and stay finite."""
    q, c, codes, lo, hi = _far_centroids(50.0)
    lut = cpu_select.pq_lut(q, c, 30.0)
    assert cpu_select._code_scores(lut[0], codes[0], wide=True) is None
    idx, log_z = _run(backend, q, c, codes, lo, hi, 100, 30.0)
    if backend == "cpu":
        assert bool(torch.isneginf(log_z).all())
        log_z = log_partition_ref(q, c, codes, lo, hi, 30.0)  # the selection is still checked against the rule
    check_against_references(backend, idx, log_z, q, c, codes, lo, hi, 100, 30.0, None)
    check_against_separate_ops(backend, idx, _run(backend, q, c, codes, lo, hi, 100, 30.0)[1], q, c, codes, lo,
                               hi, 100, 30.0, None)


def _counting(monkeypatch, calls, module, name):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))


def test_cpu_builds_one_histogram_per_sequence(monkeypatch, cpu_path):
    """The point of the op on CPU: the per-token pass of a sequence for the softmax denominators is made once, not
    once per op: the joint-code histogram on the ATen path; with the native kernels (which build no histogram at
    all) `native.code_z` for the log-partition alone, and one `native.topk_pq` call (denominators and selection)
    for the top-k and for the shortlist."""
    from pqpatch.kernels import native

    q, c, codes, lo, hi = _inputs(4, 2, 4, 64, 2, 6, 3000, "inner")  # code-table path: both ops histogram
    calls: list[str] = []
    for module in (cpu_select, cpu_shortlist, log_partition):
        _counting(monkeypatch, calls, module, "joint_codes")
    _counting(monkeypatch, calls, native, "code_z")
    _counting(monkeypatch, calls, native, "topk_pq")
    native_path = cpu_path == "native"
    kernels.pq_topk(q, c, codes, lo, hi, 600, 0.125, backend="cpu")
    assert calls == ["topk_pq" if native_path else "joint_codes"] * 2  # one per sequence
    calls.clear()
    kernels.pq_log_partition(q, c, codes, lo, hi, 0.125, backend="cpu")
    assert calls == ["code_z" if native_path else "joint_codes"] * 2
    calls.clear()
    kernels.pq_shortlist(q, c, codes, lo, hi, 600, 0.125, backend="cpu")
    assert calls == ["topk_pq" if native_path else "joint_codes"] * 2


@pytest.mark.triton
def test_triton_reads_the_codes_once(monkeypatch):
    """The Triton op launches pq_topk's LUT and statistics passes once; log_z is merged from its partials."""
    pytest.importorskip("triton")
    from pqpatch.kernels import triton_ops

    launched: list[str] = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for mod, name in ((triton_ops._topk, "_lut_kernel"), (triton_ops._topk, "_stats_kernel"),
                      (triton_ops._logz, "_merge_kernel")):
        monkeypatch.setattr(mod, name, Counting(name, getattr(mod, name)))
    x = [t.to(DEV) for t in _inputs(5, 2, 4, 64, 2, 6, 300, "ragged")]
    kernels.pq_topk(*x, 60, 0.125, backend="triton")
    kernels.pq_log_partition(*x, 0.125, backend="triton")
    assert sorted(launched) == ["_lut_kernel"] * 2 + ["_merge_kernel"] + ["_stats_kernel"] * 2
    launched.clear()
    kernels.pq_shortlist(*x, 60, 0.125, backend="triton")
    assert sorted(launched) == ["_lut_kernel", "_merge_kernel", "_stats_kernel"]


@pytest.mark.triton
@pytest.mark.parametrize("block_n,progs", [(16, 3), (32, 1), (16, 64)])
def test_triton_multi_block_geometry(block_n, progs):
    """Several blocks per program and several programs per row: the log_z merged from the top-k's partials equals
    the log-partition launcher's with the same geometry, and the selection obeys the rule."""
    pytest.importorskip("triton")
    from pqpatch.kernels import triton_ops

    q, c, codes, lo, hi = _inputs(12, 2, 4, 64, 2, 6, 300, "empty")
    kv = torch.tensor([40])
    x = [t.to(DEV) for t in (q, c, codes, lo, hi)]
    idx, log_z = triton_ops.pq_shortlist_triton(*x, 50, 0.125, block_n=block_n, programs_per_row=progs,
                                                k_valid=kv.to(DEV))
    alone = triton_ops.pq_log_partition_triton(*x, 0.125, block_n=block_n, programs_per_row=progs)
    assert torch.equal(log_z, alone)
    check_against_references("triton", idx.cpu(), log_z.cpu(), q, c, codes, lo, hi, 50, 0.125, kv)


def _step(q, c, codes, keys, lo, hi, kv, backend, outliers=None):
    """The selection of a decode step with exact re-ranking: the shortlist (with the outliers, if given) and log_z,
    then the re-ranking."""
    short, log_z = kernels.pq_shortlist(q, c, codes, lo, hi, 48, 0.125, backend=backend, k_valid=kv * 2,
                                        outliers=outliers)
    top = kernels.rerank_topk(q, keys, short, 24, 0.125, backend=backend, k_valid=kv, log_z=log_z)
    return short.sort(-1).values, log_z, top.sort(-1).values


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_fullgraph(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    q, c, codes, lo, hi = (t.to(DEV if backend == "triton" else "cpu")
                           for t in _inputs(2, 2, 4, 64, 2, 4, 120, "ragged"))
    keys = torch.randn(2, 2, 120, 64, generator=torch.Generator().manual_seed(3)).to(q.device)
    outl = torch.tensor([-1, 3, 50, 77, 119]).expand(2, 2, 5).contiguous().to(q.device)  # some outside [lo, hi)
    for extra in (None, outl):  # with the outliers: the cpu mask merge, or with_outliers' sort and searchsorted
        args = (q, c, codes, keys, lo, hi, torch.tensor([20], device=q.device), backend, extra)
        explanation = torch._dynamo.explain(_step)(*args)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
        for got, want in zip(compiled(*args), _step(*args)):
            assert torch.equal(got, want)
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    q, c, codes, lo, hi = _inputs(6, 2, 4, 64, 2, 4, 120, "inner")
    outl = torch.tensor([-1, 5, 9, 60]).expand(2, 2, 4).contiguous()
    for kv in (None, torch.tensor([7])):
        for o in (None, outl):
            torch.library.opcheck(torch.ops.pqpatch.pq_shortlist.default,
                                  (q, c, codes, lo, hi, 24, 0.125, backend, kv, o))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_value_errors(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    q, c, codes, lo, hi = _inputs(0, 2, 4, 64, 2, 6, 50, "full")
    bad = [
        ((q[0], c, codes, lo, hi, 5), {}, "query must be"),
        ((q.int(), c, codes, lo, hi, 5), {}, "query must be"),
        ((q, c[..., :16], codes, lo, hi, 5), {}, "sub-spaces"),
        ((q, c, codes.int(), lo, hi, 5), {}, "codes must be a uint8"),
        ((q, c, codes, lo[:1], hi, 5), {}, "lo must be"),
        ((q, c, codes, lo, hi.float(), 5), {}, "hi must be"),
        ((q, torch.randn(2, 2, 2, 300, 32), codes, lo, hi, 5), {}, "at most 256 centroids"),
        ((q, c, codes, lo, hi, -1), {}, "k must be"),
        ((q, c, codes, lo, hi, 5), {"k_valid": torch.tensor([1, 2])}, "k_valid must be"),
        ((q, c, codes, lo, hi, 5), {"k_valid": torch.tensor([1.0])}, "k_valid must be"),
        ((q, c, codes, lo, hi, 5), {"outliers": torch.zeros(2, 2, 3, dtype=torch.int32)}, "outliers must be"),
        ((q, c, codes, lo, hi, 5), {"outliers": torch.zeros(2, 3, dtype=torch.int64)}, "outliers must be"),
    ]
    for args, kw, match in bad:
        with pytest.raises(ValueError, match=match):
            _run(backend, *args, 0.125, **kw)


def _outliers(seed, b, h, n, x, idx):
    """[b, h, x] ascending outlier positions, -1 first: about half drawn from idx's selection (already shortlisted),
    the rest anywhere in [0, n + 3) (some outside the candidates, some beyond N), a fifth empty."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for row in idx.reshape(b * h, -1):
        sel = row[row >= 0]
        held = sel[torch.randperm(sel.numel(), generator=gen)[: x // 2]]
        other = torch.randperm(n + 3, generator=gen)
        other = other[~torch.isin(other, held)][: x - held.numel()]
        o = torch.cat([held, other])
        o[torch.rand(o.numel(), generator=gen) < 0.2] = -1
        rows.append(torch.nn.functional.pad(o, (0, x - o.numel()), value=-1).sort().values)
    return torch.stack(rows).view(b, h, x)


OUTLIER_CASES = CASES[1:4] + CASES[5:] + CPU_TABLE_CASES[:2] + [(2, 4, 64, 4, 6, 97, 20, "inner", None)]  # m = 4: the
# path without a selection mask of its own


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x", [1, 17])
@pytest.mark.parametrize("case", OUTLIER_CASES, ids=lambda c: "h{}g{}d{}m{}b{}n{}k{}{}kv{}".format(*c))
def test_pq_shortlist_outliers_join_the_selection(backend, case, x):
    """With outliers, every backend returns the op's selection without them plus the outliers inside [lo, hi),
    each position once, then -1 ([B, Hkv, k + X]); "cpu" in ascending order (its re-ranking then needs no sort),
    "torch"/"triton" the selection first, as `quality.with_outliers` appends. log_z is unchanged."""
    if backend == "triton" and case[3] > 2:
        pytest.skip("the Triton top-k takes m <= 2")
    hkv, g, d, m, bits, n, k, ranges, kv = case
    q, c, codes, lo, hi = _inputs(x + n + m, hkv, g, d, m, bits, n, ranges)
    k_valid = None if kv is None else torch.tensor([kv])
    scaling = 1.0 / math.sqrt(d)
    base, base_z = _run(backend, q, c, codes, lo, hi, k, scaling, k_valid=k_valid)
    outl = _outliers(x + k, q.shape[0], hkv, n, x, base)
    idx, log_z = _run(backend, q, c, codes, lo, hi, k, scaling, k_valid=k_valid, outliers=outl)
    assert torch.equal(log_z, base_z)
    assert idx.shape == (q.shape[0], hkv, k + x) and idx.dtype == torch.int64
    for bi in range(q.shape[0]):
        for hh in range(hkv):
            row = idx[bi, hh]
            got = row[row >= 0]
            assert got.unique().numel() == got.numel(), "a position listed twice"
            inside = [p for p in outl[bi, hh].tolist() if max(0, int(lo[bi])) <= p < int(hi[bi])]
            want = set(base[bi, hh][base[bi, hh] >= 0].tolist()) | set(inside)
            assert set(got.tolist()) == want
            if backend == "cpu":
                assert bool((row[got.numel():] == -1).all()), "cpu: the empty slots come last"
                assert torch.equal(got, got.sort().values), "cpu: ascending"
            else:  # the k slots as without outliers, then the X outlier slots
                assert torch.equal(row[:k], base[bi, hh]), "the selection first, as it was"
                assert set(row[k:].tolist()) <= set(inside) | {-1}


def test_outliers_do_not_add_a_sort_to_the_cpu_reranking(monkeypatch):
    """The cpu shortlist with outliers is ascending then -1: `rerank_topk_cpu` reads it as it is (no sort call),
    where the same set as `with_outliers` lays it out (outliers appended) is sorted first."""
    from pqpatch.kernels import cpu_rerank
    from pqpatch.kernels.quality import with_outliers

    q, c, codes, lo, hi = _inputs(4, 2, 4, 64, 2, 6, 3000, "ragged")
    base, _ = kernels.pq_shortlist(q, c, codes, lo, hi, 300, 0.125, backend="cpu")
    outl = _outliers(9, 2, 2, 3000, 17, base)
    short, log_z = kernels.pq_shortlist(q, c, codes, lo, hi, 300, 0.125, backend="cpu", outliers=outl)
    keys = torch.randn(2, 2, 3000, 64, generator=torch.Generator().manual_seed(1))
    sorts = []
    real = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **kw: sorts.append(1) or real(self, *a, **kw))
    top = cpu_rerank.rerank_topk_cpu(q, keys, short, 150, 0.125, log_z=log_z)
    assert not sorts
    appended = with_outliers(base, outl, lo, hi)
    assert torch.equal(cpu_rerank.rerank_topk_cpu(q, keys, appended, 150, 0.125, log_z=log_z), top)
    assert sorts, "the appended layout is not ascending: it is sorted first"
