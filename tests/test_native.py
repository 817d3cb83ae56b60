"""The native CPU kernels (`kernels/native.py`, `kernels/native_select.py`, `kernels/csrc/`) against plain PyTorch on
fresh random inputs, odd sizes included, and the fallback to the ATen path when they cannot be built.

The ops that use them (sparse attention, re-ranking, the shortlist) are also run through both paths by
tests/test_kernels_cpu.py and tests/test_rerank_attention.py (`conftest.cpu_path`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pqpatch import kernels
from pqpatch.kernels import cpu_attention, native
from pqpatch.kernels import reference as ref

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: "
                                f"{native.unavailable_reason}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("s", [1, 17, 97, 1000])
@pytest.mark.parametrize("t,g", [(1, 1), (3, 4), (2, 8)])
def test_gather_logits_and_values_match_torch(dtype, d, s, t, g):
    """q . row and sum_s p * row for listed rows, skipped (-1) entries not read (0 logit, no contribution)."""
    gen = _gen(s * 7 + d + t)
    r = 1500
    src = torch.randn(r, d, generator=gen).to(dtype)
    q = torch.randn(t, g, d, generator=gen)
    rows = torch.randint(0, r, (t, s), generator=gen)
    rows[torch.rand(t, s, generator=gen) < 0.2] = -1
    p = torch.rand(t, g, s, generator=gen)
    rows64, ok = rows.clamp_min(0), (rows >= 0).double()
    k64 = src.double()[rows64] * ok[..., None]  # [T, S, D]: a skipped row reads as zeros
    want_l = torch.einsum("tgd,tsd->tgs", q.double(), k64)
    want_v = torch.einsum("tgs,tsd->tgd", p.double(), k64)
    torch.testing.assert_close(native.gather_logits(q, src, rows).double(), want_l, rtol=1e-5, atol=1e-4)
    # scaled, -inf for skipped entries, written into the first S slots of a wider buffer (the rest untouched)
    buf = torch.full((t, g, s + 5), 7.0)
    got = native.gather_logits(q, src, rows, scale=0.3, fill=float("-inf"), out=buf)
    assert got.data_ptr() == buf.data_ptr() and bool((buf[:, :, s:] == 7.0).all())
    want_s = torch.where(rows[:, None, :] >= 0, want_l * 0.3, float("-inf"))
    torch.testing.assert_close(got.double(), want_s, rtol=1e-5, atol=1e-4)
    acc = torch.randn(t, g, d, generator=gen)
    got_v = native.gather_values(p, src, rows, out=acc.clone())
    torch.testing.assert_close(got_v.double(), want_v + acc.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
def test_gather_over_runs_and_scattered_rows(dtype, d, g):
    """Row lists that mix contiguous runs (the sink and the recent window: the constant-shape loops, runs of >= 16
    rows) with scattered rows and skipped entries (the runtime-shape loops): runs of 15, 16 and 40 rows, a run cut
    by a skipped entry, a run at the start and at the end of a list, and a list that is one run."""
    gen = _gen(d * 10 + g)
    r = 3000
    src = torch.randn(r, d, generator=gen).to(dtype)
    scattered = torch.randperm(r - 200, generator=gen)[:60].sort().values + 100
    cut = torch.arange(1000, 1030)
    cut[12] = -1  # a skipped entry inside a run: two runs of 12 and 17
    lists = [torch.cat([torch.arange(0, 16), scattered[:20], torch.arange(500, 515), scattered[20:40], cut,
                        scattered[40:], torch.arange(r - 40, r)]),
             torch.cat([scattered, torch.full((3,), -1), torch.arange(2000, 2150)])[:146],
             torch.arange(1200, 1346)]
    s = min(len(x) for x in lists)
    rows = torch.stack([x[:s] for x in lists])
    t = rows.shape[0]
    q, p = torch.randn(t, g, d, generator=gen), torch.rand(t, g, s, generator=gen)
    rows64, ok = rows.clamp_min(0), (rows >= 0).double()
    k64 = src.double()[rows64] * ok[..., None]
    want_l = torch.where(rows[:, None, :] >= 0, torch.einsum("tgd,tsd->tgs", q.double(), k64) * 0.5, -1e9)
    want_v = torch.einsum("tgs,tsd->tgd", p.double(), k64)
    got_l = native.gather_logits(q, src, rows, scale=0.5, fill=-1e9)
    torch.testing.assert_close(got_l.double(), want_l, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(native.gather_values(p, src, rows).double(), want_v, rtol=1e-5, atol=1e-4)


def test_gather_rejects_bad_inputs_clearly():
    src, q, p = torch.randn(10, 8), torch.randn(2, 1, 8), torch.rand(2, 1, 3)
    rows = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="rows must be < R"):
        native.gather_logits(q, src, rows + 10)
    with pytest.raises(ValueError, match="int64"):
        native.gather_logits(q, src, rows.int())
    with pytest.raises(ValueError, match="contiguous"):
        native.gather_logits(q, torch.randn(8, 10).t(), rows)
    with pytest.raises(ValueError, match="D = 4"):
        native.gather_logits(torch.randn(2, 1, 4), src, rows)
    with pytest.raises(ValueError, match="do not take src"):
        native.gather_values(p, src.double(), rows)
    with pytest.raises(ValueError, match="rows have 3"):
        native.gather_values(torch.rand(2, 1, 4), src, rows)


def _select_ref(scores: torch.Tensor, kk: int, extra: torch.Tensor | None) -> list[list[int]]:
    """Each row's kk best positions (ties: earliest first), joined with the extra positions in [0, n), ascending."""
    out = []
    for r, row in enumerate(scores.tolist()):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        keep = set(order[:kk])
        if extra is not None:
            keep |= {e for e in extra[r].tolist() if 0 <= e < len(row)}
        out.append(sorted(keep))
    return out


def _rows(pos: torch.Tensor) -> list[list[int]]:
    return [[v for v in row if v >= 0] for row in pos.tolist()]


@pytest.mark.parametrize("n", [1, 17, 97, 1000, 5000])
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
def test_select_top_matches_a_sort(n, frac, ties, with_extra):
    """The kk best (ties to the earliest positions), joined with extra positions (-1, duplicates of selected ones
    and out-of-range ones ignored), ascending then -1; thr is the kk-th largest score."""
    gen = _gen(n + int(frac * 10) + 100 * ties + 1000 * with_extra)
    rows, kk = 3, max(1, int(frac * n))
    scores = torch.rand(rows, n, generator=gen)
    if ties:  # few distinct values, zeros included: many ties at the threshold
        scores = (scores * 4).floor() / 4
    scores[0, : n // 2] *= 1e-30  # tiny (denormal-range) scores still order by their bits
    extra = None
    if with_extra:
        extra = torch.randint(-1, n + 3, (rows, 7), generator=gen)
    pos, thr = native.select_top(rows, n, kk, scores=scores, extra=extra)
    assert pos.shape == (rows, kk + (0 if extra is None else 7))
    assert _rows(pos) == _select_ref(scores, kk, extra)
    for v in pos.tolist():  # the valid entries first, then only -1
        c = sum(x >= 0 for x in v)
        assert all(x >= 0 for x in v[:c]) and all(x == -1 for x in v[c:])
    torch.testing.assert_close(thr, scores.topk(kk, dim=-1).values[:, -1], rtol=0, atol=0)


def _exact_pq(codes: torch.Tensor, kc: int, g: int, gen: torch.Generator, high: int = 5):
    """Inputs of `native.topk_pq` whose float32 arithmetic is exact, and the exact scores they give.

    ex is one-hot on token 0's code(s) and no other token shares them (its duplicates are re-coded in place), so
    every denominator is exactly 1 and the factors fa = e1 / z are the integers e1; e32 holds integers in
    [1, high), so every table entry is an exact integer sum >= 1 (never below the kernel's float32 guards). For
    K = 1 every token has the one code (z = n): all scores are equal, only the positions are meaningful.
    codes: [rows, n, m] uint8 (written to). Returns (ex [rows, m, G, K] float64, e32 [rows, m, G, K] float32,
    scores [rows, n] float64)."""
    rows, n, m = codes.shape
    ex = torch.zeros(rows, m, g, kc, dtype=torch.float64)
    for r in range(rows):
        first = codes[r, 0].long().tolist()
        if kc > 1:
            same = (codes[r, 1:].long() == torch.tensor(first)).all(-1)
            codes[r, 1:, m - 1][same] = (first[m - 1] + 1) % kc
        for j in range(m):
            ex[r, j, :, first[j]] = 1.0
    e32 = torch.randint(1, high, (rows, m, g, kc), generator=gen).float()
    c0 = codes[..., 0].long()
    scores = torch.stack([e32[r, 0][:, c0[r]].double().sum(0) if m == 1 else
                          (e32[r, 0][:, c0[r]] * e32[r, 1][:, codes[r, :, 1].long()]).double().sum(0)
                          for r in range(rows)])
    return ex, e32, scores


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("kc", [1, 16, 64, 256])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("n", [17, 1000])
def test_topk_pq_scores_tokens_through_their_codes(m, kc, g, n):
    """native.topk_pq: token i scores sum_g fa[c1, g] * fb[g, c0]. Exact integer factors (`_exact_pq`), so the
    result must equal the sort rule on the exact scores (ties included: few distinct values), joined with extra
    positions, also for codes read with a stride (a slice of a longer code buffer)."""
    gen = _gen(m * 1000 + kc + g + n)
    rows = 3
    codes = torch.randint(0, kc, (rows, n + 9, m), generator=gen, dtype=torch.uint8)[:, 5:5 + n]
    ex, e32, scores = _exact_pq(codes, kc, g, gen)
    kk = max(1, n // 5)
    extra = torch.randint(-1, n, (rows, 4), generator=gen)
    pos, z = native.topk_pq(ex, e32, codes, kk, extra, 1e-20, 1e-30)
    assert _rows(pos) == _select_ref(scores, kk, extra)
    torch.testing.assert_close(z, torch.full_like(z, 1.0 if kc > 1 else float(n)), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["packed", "every_other_token"])
@pytest.mark.parametrize("n", [256, 1000, 4133])
@pytest.mark.parametrize("kc,g", [(64, 4), (256, 8), (256, 1)])
def test_topk_pq_long_rows(layout, n, kc, g):
    """Rows long enough for the blocked loops (256 tokens per block, 16 per vector, ragged tails): packed code
    pairs take the gather path of an AVX-512 build, codes of every other token the scalar one; both equal the sort
    rule on the exact scores (`_exact_pq`), ties included, with and without extra positions, and for kk = n."""
    gen = _gen(n + kc + g)
    rows = 2
    full = torch.randint(0, kc, (rows, 2 * n, 2), generator=gen, dtype=torch.uint8)
    codes = full[:, :n] if layout == "packed" else full[:, ::2]
    ex, e32, scores = _exact_pq(codes, kc, g, gen)
    for kk, extra in ((n // 5, None), (n // 10, torch.randint(-1, n, (rows, 9), generator=gen)), (n, None)):
        pos, _ = native.topk_pq(ex, e32, codes, kk, extra, 1e-20, 1e-30)
        assert _rows(pos) == _select_ref(scores, kk, extra)


@pytest.mark.parametrize("where", ["block", "tail"])
@pytest.mark.parametrize("which", ["c0", "c1", "nan"])
def test_topk_pq_reports_bad_codes_and_nan_anywhere(where, which):
    """A code beyond the centroids (in either byte) or a NaN factor is reported whether the token falls in a
    blocked (vector) stretch or in the ragged tail: never a silent out-of-table read."""
    n, kc, g = 1000, 16, 4
    codes = torch.randint(0, kc, (2, n, 2), generator=_gen(3), dtype=torch.uint8)
    ex, e32, _ = _exact_pq(codes, kc, g, _gen(1))
    i = 300 if where == "block" else n - 3
    if which == "nan":
        e32[1, 0, 2, codes[1, i, 0]] = float("nan")
        with pytest.raises(RuntimeError, match="NaN or negative"):
            native.topk_pq(ex, e32, codes, 50, None, 1e-20, 1e-30)
        return
    codes[1, i, 0 if which == "c0" else 1] = 200
    with pytest.raises(ValueError, match="beyond the centroids"):
        native.topk_pq(ex, e32, codes, 50, None, 1e-20, 1e-30)


_BUILDS = """
import sys, torch
from pqpatch.kernels import native
print("avx512", native.has_avx512())
g = torch.Generator().manual_seed(7)
out = {}
for n, kc, gg in ((1000, 64, 4), (4133, 256, 8)):
    codes = torch.randint(0, kc, (3, n, 2), generator=g, dtype=torch.uint8)
    scores = torch.rand(3, n, generator=g)
    extra = torch.randint(-1, n, (3, 5), generator=g)
    ex = torch.rand(3, 2, gg, kc, generator=g, dtype=torch.float64)
    out[n] = (native.select_top(3, n, n // 3, scores, extra=extra), native.code_z(ex, codes))
    e32 = torch.rand(3, 2, gg, kc, generator=g)
    out[("topk_pq", n)] = native.topk_pq(ex, e32, codes, n // 7, extra, 1e-20, 1e-30)
# the row loops (runs and scattered rows) and the lookup table: integer-valued inputs, so every build's sums are
# exact and must agree bit for bit
src = torch.randint(-3, 4, (3000, 128), generator=g).float()
rows = torch.cat([torch.arange(0, 40), torch.randperm(2900, generator=g)[:300].sort().values + 50,
                  torch.tensor([-1, -1]), torch.arange(2960, 3000)]).view(1, -1).expand(4, -1).contiguous()
q = torch.randint(-2, 3, (4, 4, 128), generator=g).float()
p = torch.randint(0, 3, (4, 4, rows.shape[1]), generator=g).float()
out["gather"] = (native.gather_logits(q, src, rows, scale=0.5, fill=-1.0), native.gather_values(p, src, rows))
out["lut"] = native.lut(torch.randint(-2, 3, (1, 2, 4, 128), generator=g).float(),
                        torch.randint(-2, 3, (1, 2, 2, 256, 64), generator=g).float(), 0.5)
raw = torch.randint(-6, 3, (2, 4, 500), generator=g).float()
out["pick"] = native.rerank_pick(raw, torch.randn(2, 4, generator=g), torch.arange(1000).view(2, 500), 10 ** 6,
                                 200, 250)
torch.save(out, sys.argv[1])
"""


def test_portable_build_selects_the_same(tmp_path):
    """The portable build (PQPATCH_NATIVE_MARCH=0: scalar loops, no AVX-512) and this process's build give the
    same selections, thresholds and denominators on the same inputs (float32 table entries may differ in the last
    bit between builds, so the inputs are random floats and the comparison of positions is exact only because no
    two distinct codes score within an ulp of the threshold; the denominators agree to float64 rounding), and the
    same row-loop, lookup-table and re-ranking results on integer-valued inputs (exact sums in any order)."""
    env = dict(os.environ, PQPATCH_NATIVE_MARCH="0", PQPATCH_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _BUILDS, str(tmp_path / "portable.pt")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0 and "avx512 False" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-c", _BUILDS, str(tmp_path / "here.pt")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    portable, here = torch.load(tmp_path / "portable.pt"), torch.load(tmp_path / "here.pt")
    for n in (1000, 4133):
        (sp, st), pz = portable[n]
        (sh, sth), hz = here[n]
        assert torch.equal(sp, sh) and torch.equal(st, sth)
        torch.testing.assert_close(pz, hz, rtol=1e-12, atol=0)
        (tp, zp), (th, zh) = portable[("topk_pq", n)], here[("topk_pq", n)]
        assert torch.equal(tp, th)
        torch.testing.assert_close(zp, zh, rtol=1e-12, atol=0)
    for key in ("gather", "lut", "pick"):  # exact sums: equal bits
        for a, b in zip(portable[key], here[key]):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("s,kk,k", [(1, 1, 1), (17, 5, 8), (97, 40, 40), (1000, 333, 400), (5000, 2500, 2500)])
@pytest.mark.parametrize("g", [1, 4, 8])
def test_rerank_pick_matches_the_aten_rule(s, kk, k, g):
    """native.rerank_pick against the rule of the ATen path: scores sum_g exp(raw - log_z - max), the kk best (ties
    to the earliest: small integer logits make many), empty entries (ix = n, at the tail, -inf logits) never kept
    unless taken as ties (then -1 / -inf), infinite log-partitions counted as 0; positions and logits per slot."""
    gen = _gen(s + kk + g)
    t, n = 3, 10 ** 6
    raw = torch.randint(-6, 3, (t, g, s), generator=gen).float()
    ix = torch.randint(0, n, (t, s), generator=gen).sort(-1).values
    empty = torch.zeros(t, s, dtype=torch.bool)
    empty[1, s - s // 3:] = True  # row 1 ends with empty entries
    if s > 1:
        empty[2, 1:] = True  # row 2 has one valid entry only
    ix[empty] = n
    raw.masked_fill_(empty[:, None, :], float("-inf"))
    log_z = torch.randn(t, g, generator=gen)
    log_z[0, 0] = float("-inf")
    top, sel = native.rerank_pick(raw, log_z, ix, n, kk, k)
    lz = torch.where(torch.isfinite(log_z), log_z, 0.0)
    x = raw - lz[:, :, None]
    mx = x.amax(dim=(1, 2), keepdim=True)
    score = (x - torch.where(torch.isfinite(mx), mx, 0.0)).exp().sum(dim=1).masked_fill(empty, 0.0)
    for r in range(t):
        order = sorted(range(s), key=lambda i: (-float(score[r, i]), i))[:kk]
        cols = sorted(order)
        want_top = [int(ix[r, c]) if not empty[r, c] else -1 for c in cols] + [-1] * (k - kk)
        assert top[r].tolist() == want_top
        want_sel = torch.full((g, k), float("-inf"))
        for j, c in enumerate(cols):
            if not empty[r, c]:
                want_sel[:, j] = raw[r, :, c]
        assert torch.equal(sel[r], want_sel)


@pytest.mark.parametrize("m,kc", [(1, 16), (2, 16), (2, 64), (2, 256)])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("n,layout", [(17, "packed"), (97, "strided"), (1000, "packed"), (5000, "strided")])
def test_topk_pq_equals_the_separate_calls(m, kc, g, n, layout):
    """native.topk_pq (one call per sequence) on realistic factors: code_z's denominators bit for bit (the
    shortlist's log-partition and `pq_log_partition` must agree), positions obeying the rule on the scores of the
    same float32 factors (checked with a float32-rounding slack at the threshold); and None, not a wrong answer,
    where a float32 denominator would underflow. Exact-arithmetic checks of the positions: the tests above."""
    from pqpatch.kernels.log_partition import log_z_factors

    gen = _gen(m * 7 + kc + g * 3 + n)
    rows = 3
    lut = torch.randn(rows, m, g, kc, generator=gen) * 2
    full = torch.randint(0, kc, (rows, 2 * n, m), generator=gen, dtype=torch.uint8)
    codes = full[:, :n] if layout == "packed" else full[:, ::2]
    kk, extra = max(1, n // 5), torch.randint(-1, n, (rows, 5), generator=gen)
    ex = log_z_factors(lut[None])[0][0].contiguous()
    e32 = (lut - lut.amax(dim=-1, keepdim=True)).exp_()
    pos, z = native.topk_pq(ex, e32, codes, kk, extra, 1e-20, 1e-30)
    want_z = native.code_z(ex, codes)
    assert torch.equal(z, want_z)
    zf = want_z.float()  # the kernel's factors: fa = e1 / z in float32, fb = e0
    c0, c1 = codes[..., 0].long(), (codes[..., 1].long() if m == 2 else torch.zeros_like(codes[..., 0]).long())
    fa = (e32[:, 1] if m == 2 else torch.ones(rows, g, kc)) / zf[:, :, None]  # [rows, G, R]
    score = torch.stack([(fa[r][:, c1[r]].double() * e32[r, 0][:, c0[r]].double()).sum(0) for r in range(rows)])
    for r in range(rows):
        sel = pos[r][pos[r] >= 0]
        sel = sel[~torch.isin(sel, extra[r])]  # the top-k part (an extra position may also be a top-k one)
        thr = score[r].topk(kk).values[-1]
        assert len(set(pos[r][pos[r] >= 0].tolist())) == len(pos[r][pos[r] >= 0])  # each position once
        assert bool((score[r][sel] >= thr * (1 - 1e-6)).all())  # nothing below the k-th score kept...
        outside = torch.ones(n, dtype=torch.bool)
        outside[pos[r][pos[r] >= 0]] = False
        assert bool((score[r][outside] <= thr * (1 + 1e-6)).all())  # ...and nothing above it left out
    peaked = lut.clone()
    peaked[1, :, :, 0] = 300.0  # one code far above the rest: the others' factors underflow float32...
    peaked[1, :, :, 1:] = -300.0
    codes_no0 = codes.clone()
    codes_no0[1][codes_no0[1] == 0] = 1  # ...and no token has it: the denominators underflow
    ex_p = log_z_factors(peaked[None])[0][0].contiguous()
    e32_p = (peaked - peaked.amax(dim=-1, keepdim=True)).exp_()
    assert native.topk_pq(ex_p, e32_p, codes_no0, kk, None, 1e-20, 1e-30) is None


@pytest.mark.parametrize("m,ds", [(1, 64), (2, 64), (2, 48), (4, 32), (8, 16)])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("kc", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lut_matches_torch(m, ds, g, kc, dtype):
    """native.lut: scaling * (query sub-vector . centroid) for every head, sub-space and centroid, against float64
    torch (a bfloat16 input is read as float32)."""
    gen = _gen(m * ds + g + kc)
    b, h = 2, 3
    q = torch.randn(b, h, g, m * ds, generator=gen).to(dtype)
    c = torch.randn(b, h, m, kc, ds, generator=gen).to(dtype)
    want = torch.einsum("bhgmd,bhmkd->bhmgk", q.double().view(b, h, g, m, ds), c.double()) * 0.3
    torch.testing.assert_close(native.lut(q, c, 0.3).double(), want, rtol=1e-5, atol=1e-5)


def test_launchers_reject_tensors_off_the_cpu():
    """A tensor the C code cannot read (here on the meta device: no data) is a clear ValueError, never a pointer
    handed to the kernel."""
    ex, e32 = torch.rand(2, 2, 4, 16, dtype=torch.float64), torch.rand(2, 2, 4, 16)
    codes = torch.randint(0, 16, (2, 50, 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match="on CPU"):
        native.topk_pq(ex.to("meta"), e32, codes, 5, None, 1e-20, 1e-30)
    with pytest.raises(ValueError, match="on CPU"):
        native.topk_pq(ex, e32.to("meta"), codes, 5, None, 1e-20, 1e-30)
    with pytest.raises(ValueError, match="on CPU"):
        native.topk_pq(ex, e32, codes, 5, torch.zeros(2, 3, dtype=torch.int64, device="meta"), 1e-20, 1e-30)
    raw, lz, ix = torch.rand(2, 4, 30), torch.rand(2, 4), torch.arange(60).view(2, 30)
    with pytest.raises(ValueError, match="on CPU"):
        native.rerank_pick(raw, lz, ix.to("meta"), 100, 5, 5)
    with pytest.raises(ValueError, match="on CPU"):
        native.rerank_pick(raw, lz.to("meta"), ix, 100, 5, 5)
    q, src, rows = torch.randn(2, 1, 8), torch.randn(10, 8), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="on CPU"):
        native.gather_logits(q, src, rows, out=torch.empty(2, 1, 3, device="meta"))


def test_select_top_rejects_nan_and_bad_arguments():
    s = torch.rand(2, 10)
    s[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or negative"):
        native.select_top(2, 10, 3, s)
    with pytest.raises(RuntimeError, match="NaN or negative"):
        native.select_top(2, 10, 3, -torch.rand(2, 10))
    with pytest.raises(ValueError, match="0 < kk <= n"):
        native.select_top(2, 10, 11, torch.rand(2, 10))
    codes = torch.full((2, 10, 2), 9, dtype=torch.uint8)  # codes beyond 8 centroids
    ex, e32 = torch.rand(2, 2, 4, 8, dtype=torch.float64), torch.rand(2, 2, 4, 8)
    with pytest.raises(ValueError, match="beyond the centroids"):
        native.topk_pq(ex, e32, codes, 3, None, 1e-20, 1e-30)


@pytest.mark.parametrize("layout", ["slice", "permuted"])
def test_attention_over_a_slice_reads_the_buffer_in_place(layout):
    """A cache that is a slice of a longer buffer (a PQ layer's preallocated K/V) is read through `native_rows`
    without a copy; a layout whose rows are not evenly spaced takes the ATen path. Both equal the reference."""
    gen = _gen(5)
    b, h, g, d, n = 2, 3, 4, 64, 57
    if layout == "slice":
        big_k = torch.randn(b, h, 100, d, generator=gen)
        big_v = torch.randn(b, h, 100, d, generator=gen)
        keys, values = big_k[:, :, :n], big_v[:, :, :n]
        src, base = cpu_attention.native_rows(keys)
        assert src.data_ptr() == big_k.data_ptr() and base.tolist() == [i * 100 for i in range(b * h)]
    else:
        keys = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)  # rows of one head are h * d apart
        values = torch.randn(b, n, h, d, generator=gen).transpose(1, 2)
        assert cpu_attention.native_rows(keys) is None
    q = torch.randn(b, h, g, d, generator=gen)
    idx = torch.stack([torch.randperm(n, generator=gen)[:20] for _ in range(b * h)]).view(b, h, 20)
    idx[0, 0, 3] = -1
    out, lse = kernels.sparse_decode_attention(q, keys, values, idx, d ** -0.5, backend="cpu")
    out_r, lse_r = ref.sparse_decode_attention_ref(q, keys, values, idx, d ** -0.5)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)


_PROBE = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from pqpatch import kernels
from pqpatch.kernels import native, reference as ref
print("available", native.available())
print("reason", native.unavailable_reason)
q, k, v = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
idx = torch.randint(0, 50, (1, 2, 9))
out, lse = kernels.sparse_decode_attention(q, k, v, idx, 0.125, backend="cpu")
out_r, lse_r = ref.sparse_decode_attention_ref(q, k, v, idx, 0.125)
torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("how", ["disabled", "no_compiler"])
def test_fallback_is_logged_and_correct(how, tmp_path):
    """Without the kernels (PQPATCH_NATIVE=0, or a compiler that fails) the CPU backend runs its ATen path with the
    same results; the reason is kept in `native.unavailable_reason` and logged once."""
    env = dict(os.environ, PQPATCH_CACHE_DIR=str(tmp_path))
    if how == "disabled":
        env["PQPATCH_NATIVE"] = "0"
    else:
        env["CC"] = str(tmp_path / "no-such-cc")
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "available False" in res.stdout and "ok" in res.stdout
    want = "PQPATCH_NATIVE=0" if how == "disabled" else "could not be compiled"
    assert want in res.stdout and want in res.stderr  # recorded, and logged


def test_compiled_library_is_cached_per_source(tmp_path):
    """A fresh cache directory gets one shared object, built once and reused by the next process."""
    env = dict(os.environ, PQPATCH_CACHE_DIR=str(tmp_path))
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0 and "available True" in res.stdout, res.stderr[-2000:]
    files = list((tmp_path / "native").iterdir())  # the one object, and no temporary file left behind
    assert len(files) == 1 and files[0].name.startswith("pq_cpu-") and files[0].suffix == ".so"


_PATCH_BUILDS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import pqpatch
from conftest import tiny_model
model = tiny_model("llama", layers=1, heads=4, kv_heads=2, head_dim=64)
cache = os.path.join(os.environ["PQPATCH_CACHE_DIR"], "native")
print("before", len(os.listdir(cache)) if os.path.isdir(cache) else 0)
pqpatch.patch_model(model, pqpatch.PQCacheConfig())
print("after", len(os.listdir(cache)))
"""


def test_patch_model_builds_the_kernels_before_the_first_step(tmp_path):
    """The first build compiles C sources (~2 s): patch_model does it for a CPU model, so it never lands inside a
    (timed) decode step."""
    env = dict(os.environ, PQPATCH_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _PATCH_BUILDS, os.path.dirname(__file__)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "before 0" in res.stdout and "after 1" in res.stdout, res.stdout


def test_patched_model_decodes_the_same_through_both_paths():
    """A patched model's greedy decode (PQ selection, re-ranking, sparse attention on the CPU backend) gives the
    same tokens through the native kernels and through the ATen path."""
    import pqpatch
    from conftest import tiny_model

    model = tiny_model("llama", layers=2, heads=8, kv_heads=2, head_dim=64)
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.3, min_context=16, sink_tokens=2,
                                                     local_tokens=0.25, kmeans_iters=3, bits=4))
    ids = torch.randint(1, 96, (1, 200), generator=_gen(3))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    native_out = model.generate(ids, **kw)
    with native.disabled():
        aten_out = model.generate(ids, **kw)
    pqpatch.unpatch_model(model)
    assert torch.equal(native_out, aten_out)


def test_attention_rejects_a_position_past_the_cache():
    """A position >= N would read the next head's rows through the flattened cache: a clear error instead."""
    q, k, v = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 50, 64), torch.randn(1, 2, 50, 64)
    idx = torch.tensor([[[0, 3, 50]], [[1, 2, 4]]]).view(1, 2, 3)
    with pytest.raises(ValueError, match="must be < N = 50"):
        kernels.sparse_decode_attention(q, k, v, idx, 0.125, backend="cpu")


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("kc", [16, 256])
@pytest.mark.parametrize("n", [1, 17, 97, 1000])
def test_code_z_equals_the_histogram_route(m, g, kc, n):
    """native.code_z (one pass over the codes) against the joint-code histogram and its bilinear form, in float64,
    for codes read with a stride (a slice of a longer buffer)."""
    from pqpatch.kernels.cpu_select import joint_codes
    from pqpatch.kernels.log_partition import z_from_counts

    gen = _gen(m * 100 + g * 10 + kc + n)
    ex = torch.rand(3, m, g, kc, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, kc, (3, n + 7, m), generator=gen, dtype=torch.uint8)[:, 3:3 + n]
    want = z_from_counts(ex, joint_codes(codes, kc).counts(torch.float64))
    torch.testing.assert_close(native.code_z(ex, codes), want, rtol=1e-12, atol=0)
    if kc < 256:  # a code beyond the centroids (uint8 cannot hold one for K = 256)
        with pytest.raises(ValueError, match="is >= K"):
            native.code_z(ex, torch.full((3, n, m), kc, dtype=torch.uint8))
