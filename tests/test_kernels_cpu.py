"""The CPU fast path (backend "cpu", what "auto" picks on CPU) against the PyTorch reference on fresh random inputs.

pq_topk is checked by its rule, not by index equality: the selected set has min(k, candidates) distinct
candidates, and every candidate whose reference score is strictly above the lowest selected reference score is
selected (up to float rounding of the two score computations; ties may be broken differently).
"""

from __future__ import annotations

import logging

import pytest
import torch

from pqpatch import kernels
from pqpatch.kernels import cpu_select
from pqpatch.kernels import reference as ref

# every test runs through the native kernels and through the ATen fallback (`conftest.cpu_path`)
pytestmark = pytest.mark.usefixtures("cpu_path")

# relative slack for "strictly above": the fast path sums exp factors in float64, the reference in float32
_REL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pq_inputs(seed, b, hkv, g, d, m, bits, n, dtype=torch.float32, lo=None, hi=None):
    gen = _gen(seed)
    kc = 2 ** bits
    return dict(
        query=torch.randn(b, hkv, g, d, generator=gen).to(dtype),
        centroids=torch.randn(b, hkv, m, kc, d // m, generator=gen).to(dtype),
        codes=torch.randint(0, kc, (b, hkv, n, m), generator=gen, dtype=torch.uint8),
        lo=torch.tensor(lo if lo is not None else [0] * b, dtype=torch.int64),
        hi=torch.tensor(hi if hi is not None else [n] * b, dtype=torch.int64),
    )


def assert_topk_rule(idx: torch.Tensor, x: dict, k: int, scaling: float) -> None:
    """idx [B, Hkv, k] from the fast path obeys the selection rule on the reference's scores."""
    scores = ref.pq_scores_ref(x["query"], x["centroids"], x["codes"], x["lo"], x["hi"], scaling)  # [B, Hkv, N]
    assert idx.shape == (*scores.shape[:2], k) and idx.dtype == torch.int64
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            row, s = idx[b, h], scores[b, h]
            n_cand = int(torch.isfinite(s).sum())
            chosen = row[row >= 0]
            assert chosen.numel() == min(k, n_cand), (b, h, chosen.numel(), k, n_cand)
            assert bool((row[chosen.numel():] == -1).all()), "empty slots must come last"
            assert chosen.unique().numel() == chosen.numel(), "duplicate positions"
            if chosen.numel() == 0:
                continue
            assert bool(torch.isfinite(s[chosen]).all()), "selected a non-candidate"
            assert bool((chosen[1:] > chosen[:-1]).all()), "positions must be ascending"
            kth = s[chosen].min()
            above = torch.nonzero(s > kth * (1 + _REL))[:, 0]
            missing = above[~torch.isin(above, chosen)]
            assert missing.numel() == 0, f"b={b} h={h}: tokens {missing[:5].tolist()} score above the k-th but are out"


TOPK_CASES = [  # (b, hkv, g, d, m, bits, n, k)
    (1, 2, 1, 64, 2, 6, 1, 1),
    (1, 2, 4, 64, 2, 6, 17, 5),
    (3, 2, 8, 128, 2, 6, 97, 20),
    (1, 1, 4, 128, 2, 4, 1000, 200),  # 256 codes < 1000 tokens: radix over the weighted code table
    (1, 2, 4, 128, 2, 8, 1000, 200),  # 65536 codes >> 1000 tokens: per-token scores
    (1, 1, 4, 64, 2, 8, 10000, 2000),  # code table scores, radix over the tokens (65536 codes > 10000 tokens)
    (3, 2, 4, 256, 2, 7, 1000, 333),
    (1, 2, 4, 64, 1, 5, 1000, 100),
    (3, 1, 8, 64, 1, 8, 97, 30),
    (1, 2, 4, 128, 4, 6, 1000, 200),
    (3, 2, 1, 256, 8, 8, 97, 10),
    (1, 3, 4, 64, 8, 4, 1000, 250),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "b{}h{}g{}d{}m{}bits{}n{}k{}".format(*c))
def test_pq_topk_cpu_rule(case, dtype):
    b, hkv, g, d, m, bits, n, k = case
    x = _pq_inputs(hash(case) % 1000, b, hkv, g, d, m, bits, n, dtype)
    scaling = d ** -0.5
    idx = kernels.pq_topk(**x, k=k, scaling=scaling, backend="cpu")
    assert_topk_rule(idx, x, k, scaling)
    assert torch.equal(idx, kernels.pq_topk(**x, k=k, scaling=scaling, backend="auto")), "auto must pick cpu"


@pytest.mark.parametrize("m,bits", [(2, 6), (2, 8), (1, 4), (4, 5)])
def test_pq_topk_cpu_padding_empty_and_short_ranges(m, bits):
    """Batch 3: left padding (lo > 0), an empty range (lo >= hi) and a range shorter than k; hi past N clamps."""
    n, k = 300, 120
    x = _pq_inputs(7 + bits, 3, 2, 4, 64, m, bits, n, lo=[40, 200, 250], hi=[300, 150, 320])
    idx = kernels.pq_topk(**x, k=k, scaling=0.125, backend="cpu")
    assert_topk_rule(idx, x, k, 0.125)
    assert bool((idx[1] == -1).all())  # empty range: every slot empty
    assert sorted(idx[2, 0][idx[2, 0] >= 0].tolist()) == list(range(250, 300))  # fewer candidates than k: all


def test_pq_topk_cpu_k_zero_and_k_above_n():
    x = _pq_inputs(3, 1, 2, 4, 64, 2, 6, 50)
    assert kernels.pq_topk(**x, k=0, scaling=0.1, backend="cpu").shape == (1, 2, 0)
    idx = kernels.pq_topk(**x, k=80, scaling=0.1, backend="cpu")
    assert_topk_rule(idx, x, 80, 0.1)


def test_pq_topk_cpu_underflowing_code_table_falls_back_to_token_scores(monkeypatch):
    """Huge logits: the per-sub-space softmax factors of the codes present all underflow in float64 (the maxima
    sit on absent centroids), so the code-domain path must give way to per-token scores, which stay exact."""
    x = _pq_inputs(11, 1, 2, 4, 64, 2, 4, 600)  # 600 tokens: enough for the code-table path to be chosen
    x["codes"] = torch.randint(0, 8, x["codes"].shape, generator=_gen(1), dtype=torch.uint8)  # codes 0..7 only
    x["centroids"][..., 8:, :] = x["query"].reshape(1, 2, 4, 2, 32).sum(2)[:, :, :, None, :] * 50  # far maxima
    lut = torch.einsum("bhgmd,bhmkd->bhmgk", x["query"].reshape(1, 2, 4, 2, 32), x["centroids"]) * 30.0
    assert cpu_select._code_scores(lut[0], x["codes"][0]) is None  # the guard does fire on these inputs
    calls, real = [], cpu_select._token_scores
    monkeypatch.setattr(cpu_select, "_token_scores", lambda *a: calls.append(1) or real(*a))
    idx = kernels.pq_topk(**x, k=100, scaling=30.0, backend="cpu")
    assert calls, "the op did not fall back to per-token scores"
    assert_topk_rule(idx, x, 100, 30.0)


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])
def test_pq_topk_cpu_float32_code_table_redoes_peaked_queries_in_float64(monkeypatch, scale):
    """b = 8 over fewer tokens than codes ranks tokens through a float32 code table. A peaked query (large scaling)
    drives the denominators or the k-th score toward float32's underflow: the op must notice (either guard) and
    redo the table in float64, and the selection must obey the rule on the reference's scores either way. Mild
    queries must stay in float32."""
    x = _pq_inputs(int(scale * 10), 1, 2, 4, 64, 2, 8, 9000)
    wide, real = [], cpu_select._code_scores
    monkeypatch.setattr(cpu_select, "_code_scores", lambda lut, codes, wide_=False, **kw: (
        wide.append(kw.get("wide", wide_)) or real(lut, codes, **kw)))
    fused = cpu_select.select_fused  # the native route's float32 try (one kernel call)
    monkeypatch.setattr(cpu_select, "select_fused", lambda *a, **kw: wide.append(False) or fused(*a, **kw))
    idx = kernels.pq_topk(**x, k=1500, scaling=scale, backend="cpu")
    assert_topk_rule(idx, x, 1500, scale)
    assert wide[0] is False  # the float32 table is tried first
    if scale == 0.1:
        assert wide == [False]  # no redo for a mild query
    if scale == 12.0:
        assert True in wide  # the float64 redo did run on this peaked query


def test_pq_topk_cpu_codes_without_unit_stride_in_m(cpu_path):
    """Codes whose two bytes per token are not adjacent (a [B, Hkv, m, N] buffer seen as [B, Hkv, N, m]) take the
    ATen route instead of the native kernels (which read packed pairs), and obey the rule; the shortlist too."""
    x = _pq_inputs(11, 1, 2, 4, 64, 2, 6, 3000)
    x["codes"] = x["codes"].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # stride 3000 between the bytes
    assert x["codes"].stride(3) != 1
    idx = kernels.pq_topk(**x, k=600, scaling=0.125, backend="cpu")
    assert_topk_rule(idx, x, 600, 0.125)
    short, _ = kernels.pq_shortlist(**x, k=600, scaling=0.125, backend="cpu")
    assert_topk_rule(short, x, 600, 0.125)


def test_pq_topk_cpu_ties_are_resolved_by_position():
    """m = 1 with 4 codes: thousands of exact ties; exactly k taken, the earliest ones at the threshold."""
    x = _pq_inputs(5, 1, 1, 2, 32, 1, 2, 2000)
    idx = kernels.pq_topk(**x, k=777, scaling=0.2, backend="cpu")
    assert_topk_rule(idx, x, 777, 0.2)


@pytest.mark.parametrize("weighted", [False, True])
def test_radix_threshold_matches_a_sort(weighted):
    gen = _gen(2)
    keys = torch.randint(0, 2 ** 31 - 1, (4, 3000), generator=gen, dtype=torch.int32)
    keys[:, ::7] = keys[:, :1]  # plenty of equal keys
    w = torch.randint(0, 4, keys.shape, generator=gen).double() if weighted else None
    for kk in (1, 17, 1500, int((w if weighted else torch.ones(1, 3000)).sum(-1).min())):
        thr, need = cpu_select.radix_threshold(keys, w, kk)
        for r in range(4):
            ww = w[r] if weighted else torch.ones(3000, dtype=torch.float64)
            order = torch.sort(keys[r].long(), descending=True, stable=True)
            cum = ww[order.indices].cumsum(0)
            expect = int(order.values[int(torch.searchsorted(cum, torch.tensor([float(kk)]))[0])])
            assert int(thr[r]) == expect
            assert float(ww[keys[r].long() > expect].sum()) + int(need[r]) == kk
            assert 0 < int(need[r]) <= float(ww[keys[r].long() == expect].sum())


ATTN_CASES = [  # (b, hkv, g, d, dv, n, s)
    (1, 2, 1, 64, 64, 1, 1),
    (1, 2, 4, 64, 64, 17, 9),
    (3, 2, 8, 128, 128, 97, 40),
    (1, 1, 4, 256, 256, 1000, 300),
    (3, 2, 4, 128, 64, 1000, 700),
    (1, 8, 4, 128, 128, 1000, 1000),  # every token listed; several chunks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "b{}h{}g{}d{}dv{}n{}s{}".format(*c))
def test_sparse_attention_cpu_matches_reference(case, dtype):
    b, hkv, g, d, dv, n, s = case
    gen = _gen(hash(case) % 1000)
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    keys = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    values = torch.randn(b, hkv, n, dv, generator=gen).to(dtype)
    idx = torch.stack([torch.randperm(n, generator=gen)[:s] for _ in range(b * hkv)]).view(b, hkv, s)
    idx[0, 0, : s // 3] = -1  # empty slots among listed ones (unsorted: the fast path sorts)
    if b > 1:
        idx[1, -1] = -1  # a row listing nothing: lse -inf, zero output
    out, lse = kernels.sparse_decode_attention(q, keys, values, idx, d ** -0.5, backend="cpu")
    out_r, lse_r = ref.sparse_decode_attention_ref(q, keys, values, idx, d ** -0.5)
    assert out.dtype == dtype and out.shape == (b, hkv, g, dv) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), out_r.float(), rtol=1e-5 if dtype == torch.float32 else 1.6e-2,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 8, 4, 128, 128, 4000, 256, 3), (2, 2, 1, 64, 64, 2000, 997, 0),
                                  (3, 2, 8, 256, 128, 2000, 300, 17), (1, 1, 4, 64, 64, 1500, 255, 40)],
                         ids=lambda c: "b{}h{}g{}d{}dv{}n{}run{}gap{}".format(*c))
def test_sparse_attention_cpu_reads_a_shared_window_as_a_slice(case, dtype, monkeypatch, cpu_path):
    """idx laid out as a decode step lays it out: [sink | scattered top-k | window], the window the same
    consecutive positions in every row (with -1 holes before it): on the ATen path a bfloat16 cache reads it as a
    slice (`_common_run`), and every dtype equals the reference; a run shorter than _MIN_RUN (255) or broken in one
    row is gathered like the rest. The native kernels read every listed row directly: no run is looked for."""
    from pqpatch.kernels import cpu_attention

    b, hkv, g, d, dv, n, run, gap = case
    gen = _gen(run + gap)
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    keys = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    values = torch.randn(b, hkv, n, dv, generator=gen).to(dtype)
    w0 = n - run
    sink = torch.arange(4).expand(b * hkv, 4)
    top = torch.stack([torch.randperm(w0 - 4 - gap, generator=gen)[:97] + 4 for _ in range(b * hkv)])
    top[:, 90:] = -1  # the empty top-k slots of a k_valid below the slot count
    window = torch.cat([torch.full((gap,), -1), torch.arange(w0, n)]).expand(b * hkv, -1)
    idx = torch.cat([sink, top, window], dim=-1).view(b, hkv, -1).contiguous()
    seen = []
    real = cpu_attention._common_run
    monkeypatch.setattr(cpu_attention, "_common_run", lambda ix: seen.append(real(ix)) or seen[-1])
    for ix in (idx, idx.clone().index_put_((torch.tensor([b - 1]), torch.tensor([hkv - 1]),
                                            torch.tensor([idx.shape[-1] - 5])), torch.tensor(-1))):
        seen.clear()
        out, lse = kernels.sparse_decode_attention(q, keys, values, ix, d ** -0.5, backend="cpu")
        out_r, lse_r = ref.sparse_decode_attention_ref(q, keys, values, ix, d ** -0.5)
        torch.testing.assert_close(lse, lse_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.float(), out_r.float(), rtol=1e-5 if dtype == torch.float32 else 1.6e-2,
                                   atol=1e-5 if dtype == torch.float32 else 1e-2)
        if dtype == torch.float32 or cpu_path == "native":  # float32 rows are always gathered (measured faster)
            assert seen == []
        elif ix is idx:  # the whole window is one shared run (unless it is too short)
            want = None if run < cpu_attention._MIN_RUN else (4 + 97 + gap, 4 + 97 + gap + run, w0)
            assert seen == [want]
        else:  # one row lost a window slot: the run ends before it (still read as a slice if long enough)
            assert seen[0] is None or seen[0][1] <= idx.shape[-1] - 5


def test_sparse_attention_cpu_strided_cache_and_int32_idx():
    """A cache that is a slice of a larger buffer (not viewable as flat rows) and int32 indices."""
    gen = _gen(4)
    big_k, big_v = torch.randn(2, 2, 300, 64, generator=gen), torch.randn(2, 2, 300, 64, generator=gen)
    keys, values = big_k[:, :, :200], big_v[:, :, :200]
    q = torch.randn(2, 2, 4, 64, generator=gen)
    idx = torch.stack([torch.randperm(200, generator=gen)[:50] for _ in range(4)]).view(2, 2, 50).int()
    out, lse = kernels.sparse_decode_attention(q, keys, values, idx, 0.125, backend="cpu")
    out_r, lse_r = ref.sparse_decode_attention_ref(q, keys, values, idx, 0.125)
    torch.testing.assert_close((out, lse), (out_r, lse_r), rtol=1e-5, atol=1e-5)


def test_pq_topk_feeds_sparse_attention_end_to_end():
    x = _pq_inputs(9, 3, 2, 4, 128, 2, 6, 1000, lo=[0, 100, 990], hi=[1000, 1000, 1000])
    keys = torch.randn(3, 2, 1000, 128, generator=_gen(1))
    values = torch.randn(3, 2, 1000, 128, generator=_gen(2))
    idx = kernels.pq_topk(**x, k=200, scaling=0.09, backend="cpu")
    out, lse = kernels.sparse_decode_attention(x["query"], keys, values, idx, 0.09, backend="cpu")
    out_r, lse_r = ref.sparse_decode_attention_ref(x["query"], keys, values, idx, 0.09)
    torch.testing.assert_close((out, lse), (out_r, lse_r), rtol=1e-5, atol=1e-5)


def test_cpu_backend_rejects_bad_inputs_clearly():
    x = _pq_inputs(1, 1, 2, 4, 64, 2, 6, 50)
    with pytest.raises(ValueError, match="codes must be uint8"):
        kernels.pq_topk(x["query"], x["centroids"], x["codes"].int(), x["lo"], x["hi"], 5, 0.1, backend="cpu")
    with pytest.raises(ValueError, match="do not match"):
        kernels.pq_topk(x["query"][:, :1], x["centroids"], x["codes"], x["lo"], x["hi"], 5, 0.1, backend="cpu")
    q, kv = torch.randn(1, 2, 4, 64), torch.randn(1, 2, 10, 64)
    with pytest.raises(ValueError, match="idx must be an integer"):
        kernels.sparse_decode_attention(q, kv, kv, torch.zeros(1, 2, 3), 0.1, backend="cpu")
    with pytest.raises(ValueError, match="values"):
        kernels.sparse_decode_attention(q, kv, kv[:, :, :5], torch.zeros(1, 2, 3, dtype=torch.long), 0.1,
                                        backend="cpu")


def test_auto_resolution_and_recorded_cuda_fallback(monkeypatch, caplog):
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert kernels.resolve_backend("auto", torch.device("meta")) == "torch"
    monkeypatch.setattr(kernels, "_triton_importable", lambda: False)
    monkeypatch.setattr(kernels, "last_fallback", None)
    monkeypatch.setattr(kernels, "_fallback_warned", False)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.resolve_backend("auto", torch.device("cuda")) == "torch"
        assert kernels.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert "triton" in kernels.last_fallback
    assert sum("triton cannot be imported" in r.getMessage() for r in caplog.records) == 1  # warned once
    with pytest.raises(ValueError, match="CPU tensors only"):
        kernels.pq_topk(*[torch.zeros(1, device="meta")] * 5, k=1, scaling=1.0, backend="cpu")


def _decode_step(q, c, codes, keys, values, lo, hi):
    idx = kernels.pq_topk(q, c, codes, lo, hi, 24, 0.125, backend="cpu")
    out, lse = kernels.sparse_decode_attention(q, keys, values, idx, 0.125, backend="cpu")
    return idx, out, lse


def test_compiled_cpu_backend_has_no_graph_break():
    x = _pq_inputs(2, 2, 2, 4, 64, 2, 4, 120, lo=[0, 7], hi=[120, 90])
    args = (x["query"], x["centroids"], x["codes"], torch.randn(2, 2, 120, 64), torch.randn(2, 2, 120, 64),
            x["lo"], x["hi"])
    explanation = torch._dynamo.explain(_decode_step)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), _decode_step(*args)):
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
