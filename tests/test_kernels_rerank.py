"""`kernels.rerank_topk` (exact re-ranking of a PQ shortlist) on every backend against its reference
(`quality.rerank_exact_ref`): "torch" is the reference itself, "cpu" the CPU fast path, "triton" the Triton kernels
(in the interpreter on a machine without CUDA, see tests/conftest.py).

Both score rules are covered: with `log_z` (each head's probability under its softmax over all candidates, the
normaliser given; what `selection.select` passes) and without (each head's softmax over the shortlist alone).
A selection is checked by its rule, on float64 scores of the same inputs, not by index equality (float rounding may
order near-ties differently): min(k, k_valid, entries) distinct shortlist positions then -1 (as many -1 as the
reference), and every entry scoring strictly above the lowest selected score is selected. Orders: "torch" and
"triton" best first, "cpu" ascending positions. Fixed cases, a fixed seed set of random draws, and one fresh seed per
run (PQPATCH_SEED=<seed> replays it).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from pqpatch import kernels
from pqpatch.kernels.quality import rerank_exact_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
_REL, _ABS = 1e-4, 1e-30  # "strictly above": float32 arithmetic vs the float64 scores, and float32's underflow


def _backends():
    out = [pytest.param("cpu", id="cpu")] if DEV == "cpu" else []
    return out + [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]


def _run(backend, query, keys, shortlist, k, scaling, k_valid=None, block=None, progs=None, log_z=None):
    if backend == "triton":
        pytest.importorskip("triton")
        if block is not None or progs is not None:
            from pqpatch.kernels import triton_ops

            return triton_ops.rerank_topk_triton(query, keys, shortlist, k, scaling, k_valid=k_valid, log_z=log_z,
                                                 block=block, programs_per_row=progs)
    return kernels.rerank_topk(query, keys, shortlist, k, scaling, backend=backend, k_valid=k_valid, log_z=log_z)


def _logits64(query, keys, shortlist, scaling):
    b, h, g, d = query.shape
    valid = shortlist >= 0
    kk = torch.gather(keys.double(), 2, shortlist.clamp_min(0).long()[..., None].expand(b, h, shortlist.shape[-1], d))
    logits = torch.einsum("bhgd,bhrd->bhgr", query.double(), kk) * scaling
    return logits.masked_fill(~valid[:, :, None, :], float("-inf")), valid


def scores64(query, keys, shortlist, scaling, log_z=None):
    """float64 group scores [B, Hkv, R] of the shortlist entries (-inf on empty ones): the rule, computed exactly.
    With log_z: sum_g exp(l_g - log_z_g) (non-finite log_z counts as 0), divided by the row's largest
    exp(l_g - log_z_g), the same per-row factor the backends use, so an underflow threshold means the same thing
    here and there."""
    logits, valid = _logits64(query, keys, shortlist, scaling)
    if log_z is None:
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row without entries: nothing
    else:
        lz = log_z.double()
        t = logits - torch.where(torch.isfinite(lz), lz, 0.0)[..., None]
        mx = t.amax(dim=(2, 3), keepdim=True)
        p = torch.exp(t - torch.where(torch.isfinite(mx), mx, 0.0))
    return p.sum(2).masked_fill(~valid, float("-inf"))


def make_log_z(query, keys, shortlist, scaling, seed):
    """A log-partition per head as re-ranking gets it: the shortlist's log-sum-exp plus a random amount of mass
    outside it (0.5 to 5 nats, differing across heads, so the full-candidate rule weights the heads differently
    from the shortlist softmax), sometimes below it (-1 nat: exact logits above the PQ estimate); the first row
    gets -inf (a sequence without PQ candidates) and, where there are >= 2 rows, the second a NaN head."""
    gen = torch.Generator().manual_seed(seed)
    logits, _ = _logits64(query.cpu(), keys.cpu(), shortlist.cpu(), scaling)
    lse = logits.logsumexp(-1)  # [B, Hkv, G]
    extra = torch.rand(lse.shape, generator=gen, dtype=torch.float64) * 6.0 - 1.0
    lz = torch.where(torch.isfinite(lse), lse + extra, 0.0).float()
    lz[0, 0] = float("-inf")
    if lz.shape[0] * lz.shape[1] > 1:
        lz.view(-1, lz.shape[2])[1, 0] = float("nan")
    return lz.to(query.device)


def check_rerank(out, query, keys, shortlist, k, scaling, k_valid=None, order="best", log_z=None):
    """out [B, Hkv, k] of a backend obeys the rule of `rerank_exact_ref` (see the module docstring)."""
    b, h = query.shape[:2]
    assert out.shape == (b, h, k) and out.dtype == torch.int64 and out.is_contiguous()
    log_z = None if log_z is None else log_z.cpu()
    out, shortlist = out.cpu(), shortlist.cpu()
    sc = scores64(query.cpu(), keys.cpu(), shortlist, scaling, log_z)
    want = rerank_exact_ref(query.cpu(), keys.cpu(), shortlist, k, scaling, None if k_valid is None else k_valid.cpu(),
                            log_z)
    kv = k if k_valid is None else max(0, min(int(k_valid), k))
    for bi in range(b):
        for hi in range(h):
            row, sl, s = out[bi, hi], shortlist[bi, hi].long(), sc[bi, hi]
            entries = sl[sl >= 0]
            n_sel = min(kv, entries.numel())
            chosen = row[:n_sel]
            assert bool((row[n_sel:] == -1).all()) and bool((chosen >= 0).all()), (
                f"({bi}, {hi}): want {n_sel} positions then -1, got {row.tolist()}")
            assert int((row == -1).sum()) == int((want[bi, hi] == -1).sum()), "-1 count differs from the reference"
            assert chosen.unique().numel() == n_sel, "duplicate positions"
            assert bool(torch.isin(chosen, entries).all()), "selected a position that is not a shortlist entry"
            if n_sel == 0:
                continue
            slot = {int(p): j for j, p in enumerate(sl.tolist()) if p >= 0}
            got = s[torch.tensor([slot[int(p)] for p in chosen])]  # float64 scores of the chosen, in output order
            kth = float(got.min())
            above = sl[(s > kth * (1 + _REL) + _ABS) & (sl >= 0)]
            missed = above[~torch.isin(above, chosen)]
            assert missed.numel() == 0, (
                f"({bi}, {hi}): {missed.numel()} of {above.numel()} entries scoring above the k-th ({kth:.4g}) not "
                f"selected, e.g. position {int(missed[0])} with {float(s[slot[int(missed[0])]]):.4g}")
            if order == "ascending":
                assert bool((chosen[1:] > chosen[:-1]).all()), "cpu: positions must be ascending"
            else:  # best first, up to float32 rounding
                assert bool((got[1:] <= got[:-1] * (1 + _REL) + _ABS).all()), "positions must be best first"


def _order(backend):
    return "ascending" if backend == "cpu" else "best"


def make_case(b, hkv, g, d, n, r, dtype, seed, holes=0.0, layout="shuffled", sl_dtype=torch.int64, peaked=False,
              strided=False, device=DEV):
    """query, keys, shortlist. Shortlist rows: min(r, n) distinct positions, -1 for the rest (r > n: more slots
    than candidates), a fraction `holes` of the entries emptied; layout "shuffled" (any order), "ascending" (the
    CPU pq_topk format: ascending positions, then -1) or "descending". peaked: one listed key per row dominates
    every head of its group (the others' scores underflow)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hkv, g, d, generator=gen)
    if strided:  # a [B, Nmax, Hkv, D] buffer seen as [B, Hkv, N, D]: nothing is contiguous
        keys = torch.randn(b, n + 3, hkv, d, generator=gen).transpose(1, 2)[:, :, :n]
    else:
        keys = torch.randn(b, hkv, n, d, generator=gen)
    rows = []
    for _ in range(b * hkv):
        row = torch.full((r,), -1, dtype=torch.int64)
        m = min(r, n)
        row[:m] = torch.randperm(n, generator=gen)[:m]
        if holes:
            row[torch.rand(r, generator=gen) < holes] = -1
        if layout == "shuffled":
            row = row[torch.randperm(r, generator=gen)]
        else:
            key = torch.where(row < 0, n, row)
            row = row[key.argsort(descending=layout == "descending")]
        rows.append(row)
    shortlist = torch.stack(rows).view(b, hkv, r)
    if peaked:
        for bi in range(b):
            for hi in range(hkv):
                listed = shortlist[bi, hi][shortlist[bi, hi] >= 0]
                if listed.numel():
                    keys[bi, hi, int(listed[0])] = query[bi, hi].sum(0) * (8.0 / math.sqrt(d))
    return query.to(device, dtype), keys.to(device, dtype), shortlist.to(device, sl_dtype)


CASES = [
    # B, Hkv, G, D, N, R, k, dtype, holes, layout, shortlist dtype, k_valid, scale factor, peaked, strided
    (1, 2, 4, 128, 1000, 400, 200, F32, 0.0, "ascending", torch.int64, None, 1.0, False, False),  # rerank = 2
    (1, 2, 4, 128, 1000, 400, 200, BF16, 0.2, "shuffled", torch.int64, 150, 1.0, False, True),
    (3, 1, 1, 256, 97, 120, 50, BF16, 0.0, "shuffled", torch.int32, None, 1.0, False, False),  # R > candidates
    (1, 2, 8, 64, 17, 32, 40, F32, 0.3, "descending", torch.int64, None, 1.0, False, False),  # k > R
    (1, 1, 4, 128, 1, 3, 2, BF16, 0.0, "ascending", torch.int64, None, 1.0, False, False),  # N = 1
    (2, 2, 4, 64, 1000, 300, 100, F16, 0.1, "shuffled", torch.int64, 60, 1.0, False, False),
    (2, 2, 4, 64, 1000, 300, 100, F32, 0.0, "shuffled", torch.int64, None, 40.0, True, False),  # peaked
    (1, 2, 8, 256, 97, 64, 32, F32, 0.5, "ascending", torch.int32, 0, 1.0, False, True),  # k_valid = 0
    (3, 2, 1, 64, 1000, 600, 300, BF16, 0.0, "ascending", torch.int64, 400, 1.0, False, False),  # k_valid > k
]


def _case_id(c):
    return f"B{c[0]}G{c[2]}D{c[3]}N{c[4]}R{c[5]}k{c[6]}{str(c[7])[6:]}{c[9][:3]}{'-peaked' if c[13] else ''}"


def _check_case(backend, case, seed, block=None, progs=None, with_log_z=False):
    b, hkv, g, d, n, r, k, dtype, holes, layout, sl_dtype, kv, sfac, peaked, strided = case
    query, keys, shortlist = make_case(b, hkv, g, d, n, r, dtype, seed, holes, layout, sl_dtype, peaked, strided)
    k_valid = None if kv is None else torch.tensor([kv], device=DEV)
    scaling = sfac / math.sqrt(d)
    log_z = make_log_z(query, keys, shortlist, scaling, seed) if with_log_z else None
    out = _run(backend, query, keys, shortlist, k, scaling, k_valid, block, progs, log_z)
    check_rerank(out, query, keys, shortlist, k, scaling, k_valid, _order(backend), log_z)
    return out, query, keys, shortlist, scaling


LOG_Z = [pytest.param(False, id="shortlist-softmax"), pytest.param(True, id="log_z")]


@pytest.mark.parametrize("with_log_z", LOG_Z)
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rerank_topk_matches_reference(backend, case, with_log_z):
    out, query, keys, shortlist, scaling = _check_case(backend, case, seed=case[4] + case[5] + case[2],
                                                        block=16 if backend == "triton" else None,
                                                        progs=3 if backend == "triton" else None,
                                                        with_log_z=with_log_z)
    if case[13]:  # peaked: the dominant entry of every row is selected (under both rules: it dominates every head)
        for bi in range(out.shape[0]):
            for hi in range(out.shape[1]):
                listed = shortlist[bi, hi][shortlist[bi, hi] >= 0]
                assert int(listed[0]) in out[bi, hi].tolist()


SEED = int(os.environ.get("PQPATCH_SEED", random.randrange(2**31)))
SEEDS = [0, 1, 2, pytest.param(SEED, id="fresh")]


def _draw_case(rng: random.Random):
    n = rng.choice([1, 17, 97, 1000])
    r = rng.randint(1, min(n, 600) + 20)
    k = rng.randint(0, r + 5)
    return (rng.choice([1, 3]), rng.choice([1, 2]), rng.choice([1, 4, 8]), rng.choice([64, 128, 256]), n, r, k,
            rng.choice([F32, BF16, F16]), rng.choice([0.0, 0.0, 0.3]), rng.choice(["shuffled", "ascending"]),
            rng.choice([torch.int32, torch.int64]), rng.choice([None, None, rng.randint(0, k + 3)]),
            rng.choice([1.0, 1.0, 10.0]), rng.choice([False, False, True]), rng.choice([False, True]))


@pytest.mark.parametrize("with_log_z", LOG_Z)
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("draw", range(2))
@pytest.mark.parametrize("seed", SEEDS)
def test_rerank_topk_random_case(backend, seed, draw, with_log_z):
    rng = random.Random(seed * 100 + 70 + draw)
    case = _draw_case(rng)
    block, progs = (rng.choice([None, 16, 32]), rng.choice([None, 1, 2, 5])) if backend == "triton" else (None, None)
    print(f"PQPATCH_SEED={seed} draw={draw} case={case} block={block} progs={progs} log_z={with_log_z}")
    _check_case(backend, case, seed=seed * 7 + draw, block=block, progs=progs, with_log_z=with_log_z)


def test_check_rejects_a_ranking_bug():
    """The rule check fails a selection that swaps one selected entry for a worse one, also where the k-th score
    has underflowed (peaked scores), and passes the reference."""
    query, keys, shortlist = make_case(1, 2, 4, 64, 1000, 300, F32, seed=3, peaked=True, device="cpu")
    scaling, k = 40.0 / 8, 100
    good = rerank_exact_ref(query, keys, shortlist, k, scaling)
    check_rerank(good, query, keys, shortlist, k, scaling)
    sc = scores64(query, keys, shortlist, scaling)
    order = sc.argsort(-1, descending=True)
    bad = good.clone()
    outside = shortlist[0, 0][~torch.isin(shortlist[0, 0], good[0, 0])]
    best = shortlist[0, 0, order[0, 0, 0]]
    bad[0, 0][bad[0, 0] == best] = outside[0]  # the best entry swapped for one the reference left out
    with pytest.raises(AssertionError, match="above the k-th"):
        check_rerank(bad, query, keys, shortlist, k, scaling)
    worst = torch.gather(shortlist, -1, order[..., -k:].flip(-1))  # the k worst entries
    with pytest.raises(AssertionError, match="above the k-th"):
        check_rerank(worst, query, keys, shortlist, k, scaling)


def test_check_rejects_the_shortlist_softmax_under_log_z():
    """The log_z cases can fail: the shortlist-softmax selection (log_z ignored) breaks the log_z rule on a G = 4
    case, while the log_z reference passes it."""
    b, hkv, g, d, n, r, k, dtype, holes, layout, sl_dtype, kv, sfac, peaked, strided = CASES[0]
    seed = n + r + g
    query, keys, shortlist = make_case(b, hkv, g, d, n, r, dtype, seed, holes, layout, sl_dtype, peaked, strided,
                                       device="cpu")
    scaling = sfac / math.sqrt(d)
    log_z = make_log_z(query, keys, shortlist, scaling, seed)
    check_rerank(rerank_exact_ref(query, keys, shortlist, k, scaling, log_z=log_z), query, keys, shortlist, k,
                 scaling, log_z=log_z)
    with pytest.raises(AssertionError, match="above the k-th"):
        check_rerank(rerank_exact_ref(query, keys, shortlist, k, scaling), query, keys, shortlist, k, scaling,
                     log_z=log_z)


@pytest.mark.parametrize("backend", _backends())
def test_log_z_weights_heads_by_their_full_partition(backend):
    """G = 2, hand-built: head 0 has one large logit (10) in the shortlist but most of its mass outside it
    (log_z = 20), head 1 all of its mass inside (log_z = its shortlist log-sum-exp). The shortlist softmax gives
    head 0's entry ~1 and takes it (top-2 {0, 1}); with log_z its probability is e^-10 and head 1's two best win
    (top-2 {1, 3})."""
    q = torch.tensor([[[[10.0, 0.0], [0.0, 1.0]]]])  # [1, 1, G=2, D=2]
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [0.0, 1.5], [0.0, 1.8], [-5.0, -5.0]]]])
    shortlist = torch.tensor([[[4, 3, 2, 1, 0]]])
    lse1 = (q[0, 0, 1] @ keys[0, 0].T).logsumexp(0)
    log_z = torch.stack([torch.tensor(20.0), lse1]).view(1, 1, 2)
    q, keys, shortlist, log_z = q.to(DEV), keys.to(DEV), shortlist.to(DEV), log_z.to(DEV)
    assert set(_run(backend, q, keys, shortlist, 2, 1.0)[0, 0].tolist()) == {0, 1}
    out = _run(backend, q, keys, shortlist, 2, 1.0, log_z=log_z)
    assert set(out[0, 0].tolist()) == {1, 3}
    check_rerank(out, q, keys, shortlist, 2, 1.0, order=_order(backend), log_z=log_z)


@pytest.mark.parametrize("backend", _backends())
def test_log_z_far_below_the_exact_logits_does_not_overflow(backend):
    """exp(l - log_z) with log_z = -1000 overflows float32 (and float64) without the per-row shift; with it the
    selection follows the rule (the same constant for every head: the ranking of log_z = 0, the plain sum of
    exp(l_g), which is what the float64 check computes after its own per-row shift)."""
    query, keys, shortlist = make_case(2, 2, 4, 64, 300, 120, F32, seed=9, holes=0.2, device=DEV)
    low = torch.full((2, 2, 4), -1000.0, device=DEV)
    out = _run(backend, query, keys, shortlist, 40, 0.125, log_z=low)
    check_rerank(out, query, keys, shortlist, 40, 0.125, order=_order(backend), log_z=low)
    check_rerank(out, query, keys, shortlist, 40, 0.125, order=_order(backend), log_z=torch.zeros_like(low))


@pytest.mark.parametrize("backend", _backends())
def test_group_rule_is_the_sum_of_per_head_softmaxes(backend):
    """GQA rule on a hand-built row where simpler rules choose differently: head 0 has a large logit on entry 0
    and head 1 moderate ones on entries 1-3. Sum of per-head softmaxes, top-2: entry 0 (~1 from head 0) and entry 1
    (the best of head 1). A sum of logits would take entries 0 and 2 (head 0's runner-up), a max-logit rule too."""
    q = torch.tensor([[[[10.0, 0.0], [0.0, 1.0]]]])  # [1, 1, G=2, D=2]
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [0.9, 0.5], [0.0, 1.5], [-5.0, -5.0]]]])  # [1, 1, 5, 2]
    shortlist = torch.tensor([[[4, 3, 2, 1, 0]]])
    sc = scores64(q, keys, shortlist, 1.0)[0, 0]
    logit_sum = (q[0, 0].sum(0) @ keys[0, 0].T)[shortlist[0, 0]]
    assert set(shortlist[0, 0][sc.topk(2).indices].tolist()) == {0, 1}
    assert set(shortlist[0, 0][logit_sum.topk(2).indices].tolist()) == {0, 2}  # the rule a bug might use
    q, keys, shortlist = q.to(DEV), keys.to(DEV), shortlist.to(DEV)
    out = _run(backend, q, keys, shortlist, 2, 1.0)
    assert set(out[0, 0].tolist()) == {0, 1}
    check_rerank(out, q, keys, shortlist, 2, 1.0, order=_order(backend))


@pytest.mark.parametrize("backend", _backends())
def test_ties_every_entry_above_the_kth_is_selected(backend):
    """Exact ties (the same key at many positions): exactly k distinct positions, all the strictly better ones;
    the CPU path takes the lowest positions among the tied."""
    gen = torch.Generator().manual_seed(0)
    # small integers: every logit is exact in float32, so equal keys give bit-equal scores on every backend
    q = torch.randint(-3, 4, (1, 1, 4, 64), generator=gen).float()
    keys = torch.randint(-2, 3, (1, 1, 200, 64), generator=gen).float()
    keys[0, 0, 100:160] = keys[0, 0, 5]  # 60 copies of one key
    shortlist = torch.arange(40, 180).view(1, 1, -1)  # 100..159 tied; 5 is not listed
    sc = scores64(q, keys, shortlist, 0.125)[0, 0]
    tied = sc[60]  # position 100
    n_above = int((sc > tied * (1 + 1e-9)).sum())
    assert float(tied) > 1e-6 and int((sc == tied).sum()) == 60  # a real score, tied only within the block
    k = n_above + 7  # the k-th falls inside the tied block
    q, keys, shortlist = q.to(DEV), keys.to(DEV), shortlist.to(DEV)
    out = _run(backend, q, keys, shortlist, k, 0.125)
    check_rerank(out, q, keys, shortlist, k, 0.125, order=_order(backend))
    chosen = set(out[0, 0].tolist())
    assert len(chosen & set(range(100, 160))) == 7
    if backend == "cpu":
        assert chosen & set(range(100, 160)) == set(range(100, 107))


@pytest.mark.parametrize("backend", _backends())
def test_empty_rows_and_degenerate_sizes(backend):
    query, keys, shortlist = make_case(2, 2, 4, 64, 50, 20, F32, seed=1, device=DEV)
    shortlist[1, 0] = -1  # a row listing nothing
    out = _run(backend, query, keys, shortlist, 8, 0.125)
    assert bool((out[1, 0] == -1).all())
    check_rerank(out, query, keys, shortlist, 8, 0.125, order=_order(backend))
    assert _run(backend, query, keys, shortlist, 0, 0.125).shape == (2, 2, 0)
    empty = _run(backend, query, keys, shortlist[:, :, :0], 5, 0.125)
    assert empty.shape == (2, 2, 5) and bool((empty == -1).all())
    out = _run(backend, query, keys, shortlist, 8, 0.125, k_valid=torch.tensor([3], device=DEV, dtype=torch.int32))
    check_rerank(out, query, keys, shortlist, 8, 0.125, torch.tensor([3]), order=_order(backend))


@pytest.mark.parametrize("backend", _backends())
def test_bad_inputs_raise_clear_value_errors(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    q, keys, sl = make_case(1, 2, 4, 64, 50, 20, F32, seed=2, device=DEV)
    bad = [
        ((q, keys[:, :1], sl, 5), "keys"),  # Hkv mismatch
        ((q, keys[..., :32], sl, 5), "keys"),  # D mismatch
        ((q, keys.int(), sl, 5), "keys must be a float"),
        ((q[0], keys, sl, 5), "query must be"),
        ((q, keys, sl.float(), 5), "shortlist must be an int32/int64"),
        ((q, keys, sl[:, :1], 5), "shortlist must be"),
        ((q, keys, sl, -1), "k must be a non-negative"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            _run(backend, *args, 0.125)
    with pytest.raises(ValueError, match="k_valid"):
        _run(backend, q, keys, sl, 5, 0.125, k_valid=torch.tensor([1.0, 2.0], device=DEV))
    for lz in (torch.zeros(1, 2, 3, device=DEV), torch.zeros(1, 2, 4, device=DEV, dtype=torch.float64),
               torch.zeros(1, 2, 4, device=DEV, dtype=torch.int32)):
        with pytest.raises(ValueError, match="log_z must be a float32 tensor"):
            _run(backend, q, keys, sl, 5, 0.125, log_z=lz)
    if backend == "cpu":
        with pytest.raises(ValueError, match="< N = 50"):
            _run(backend, q, keys, torch.where(sl == sl[0, 0, 0], 50, sl), 5, 0.125)
        with pytest.raises(ValueError, match="CPU tensors"):
            kernels.rerank_topk(q.to("meta"), keys.to("meta"), sl.to("meta"), 5, 0.1, backend="cpu")


def test_rerank_feeds_sparse_attention_and_auto_picks_cpu():
    """On CPU "auto" is the fast path; its output (ascending positions) goes straight into the sparse attention."""
    query, keys, sl = make_case(1, 2, 4, 128, 1000, 400, F32, seed=4, layout="ascending", device="cpu")
    out = kernels.rerank_topk(query, keys, sl, 200, 0.09)
    assert torch.equal(out, kernels.rerank_topk(query, keys, sl, 200, 0.09, backend="cpu"))
    assert bool((out[..., 1:] > out[..., :-1]).all())
    ref_out = rerank_exact_ref(query, keys, sl, 200, 0.09)
    assert torch.equal(out.sort(-1).values, ref_out.sort(-1).values)  # no near-ties on these inputs
    att = kernels.sparse_decode_attention(query, keys, keys, out, 0.09, backend="cpu")
    att_ref = kernels.sparse_decode_attention(query, keys, keys, ref_out, 0.09, backend="torch")
    torch.testing.assert_close(att, att_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [32768, 131072])
def test_gpu_llama_shape_rerank(n):
    """Llama-3-8B layer shape on the GPU (bf16 cache, k = N/10, R = 2k), "auto" = Triton."""
    k = n // 10
    query, keys, sl = make_case(1, 8, 4, 128, n, 2 * k, BF16, seed=n, layout="ascending", device="cuda")
    assert kernels.resolve_backend("auto", query.device) == "triton"
    out = kernels.rerank_topk(query, keys, sl, k, 128 ** -0.5, k_valid=torch.tensor([k - 5], device="cuda"))
    check_rerank(out, query, keys, sl, k, 128 ** -0.5, torch.tensor([k - 5]))
