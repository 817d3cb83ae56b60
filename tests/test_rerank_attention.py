"""`kernels.rerank_attention` (re-ranking fused with the sparse attention it feeds) against the two-op composition of
the references, on fresh random inputs and a fixed seed set; and the fused CPU path's key reads."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pqpatch import kernels
from pqpatch.kernels import cpu_attention
from pqpatch.kernels.log_partition import log_partition_ref

# every test runs through the native kernels and through the ATen fallback (`conftest.cpu_path`)
pytestmark = pytest.mark.usefixtures("cpu_path")

CASES = [  # (b, hkv, g, d, n, k, r, dtype)
    (1, 2, 1, 64, 1, 1, 2, torch.float32),
    (1, 2, 4, 64, 17, 4, 2, torch.float32),
    (2, 2, 8, 128, 97, 20, 3, torch.float32),
    (1, 1, 4, 256, 1000, 100, 2, torch.float32),
    (2, 3, 4, 128, 1000, 64, 4, torch.bfloat16),
]
SEEDS = [0, 1, random.randrange(1 << 30)]


def _case(seed, b, h, g, d, n, k, r, dtype, with_log_z):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, g, d, generator=gen).to(dtype)
    keys = torch.randn(b, h, n, d, generator=gen).to(dtype)
    values = torch.randn(b, h, n, d, generator=gen).to(dtype)
    # fixed: the first few and the last few positions (sink and window); the shortlist: a random subset of the
    # middle in ascending order, -1 tail (what pq_topk's cpu path emits)
    nf = min(n, 6)
    fixed_pos = sorted(set(list(range(min(2, n))) + list(range(max(0, n - (nf - 2)), n))))
    mid = [p for p in range(n) if p not in fixed_pos]
    fixed = torch.full((b, h, nf), -1, dtype=torch.int64)
    fixed[..., : len(fixed_pos)] = torch.tensor(fixed_pos, dtype=torch.int64)
    short = torch.full((b, h, r * k), -1, dtype=torch.int64)
    for bi in range(b):
        for hi in range(h):
            pick = torch.randperm(len(mid), generator=gen)[: min(len(mid), r * k - 1)].sort().values
            short[bi, hi, : pick.numel()] = torch.tensor(mid, dtype=torch.int64)[pick] if mid else pick
    log_z = None
    if with_log_z:
        cent = torch.randn(b, h, 2, 16, d // 2, generator=gen)
        codes = torch.randint(0, 16, (b, h, n, 2), generator=gen, dtype=torch.uint8)
        log_z = log_partition_ref(q.float(), cent, codes, torch.zeros(b, dtype=torch.long),
                                  torch.full((b,), n, dtype=torch.long), 1 / math.sqrt(d))
    return q, keys, values, short, fixed, log_z


@pytest.mark.parametrize("with_log_z", [False, True])
@pytest.mark.parametrize("k_valid", [None, 3])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}d{}n{}k{}r{}-{}".format(*c[:7], str(c[7])[6:]))
def test_fused_cpu_equals_the_reference_composition(case, seed, k_valid, with_log_z):
    q, keys, values, short, fixed, log_z = _case(seed + case[4], *case, with_log_z)
    k, scaling = case[5], 1 / math.sqrt(case[3])
    kv = None if k_valid is None else torch.tensor([k_valid])
    out, lse, top = kernels.rerank_attention(q, keys, values, short, fixed, k, scaling, backend="cpu", k_valid=kv,
                                             log_z=log_z)
    want_top = kernels.rerank_topk(q, keys, short, k, scaling, backend="torch", k_valid=kv, log_z=log_z)
    for a, w in zip(top.view(-1, k), want_top.view(-1, k)):
        assert set(a[a >= 0].tolist()) == set(w[w >= 0].tolist())
        assert int((a < 0).sum()) == int((w < 0).sum())
    want_out, want_lse = kernels.sparse_decode_attention(q, keys, values, torch.cat([fixed, want_top], -1), scaling,
                                                         backend="torch")
    tol = dict(rtol=2e-2, atol=2e-2) if q.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-4)
    # the torch backend of the fused op is the composition itself
    t_out, t_lse, t_top = kernels.rerank_attention(q, keys, values, short, fixed, k, scaling, backend="torch",
                                                   k_valid=kv, log_z=log_z)
    assert torch.equal(t_top, want_top)
    torch.testing.assert_close(t_out, want_out, rtol=0, atol=0)


def test_fused_cpu_reads_each_selected_key_once(monkeypatch, cpu_path):
    """The fused path reads R shortlist key rows + F fixed key rows per head; the two ops read k more. Counted at
    the key-row reader of each path: `_gather_logits` (ATen) or `native.gather_logits`, which skips -1 entries."""
    q, keys, values, short, fixed, log_z = _case(3, 1, 2, 4, 64, 1000, 100, 2, torch.float32, True)
    key_rows = []
    import pqpatch.kernels.cpu_rerank as cr
    from pqpatch.kernels import native

    if cpu_path == "native":
        real_native = native.gather_logits

        def spy_native(qf, src, rows, **kw):
            key_rows.append(int((rows >= 0).sum(-1).max()))
            return real_native(qf, src, rows, **kw)

        monkeypatch.setattr(native, "gather_logits", spy_native)
    else:
        real = cpu_attention._gather_logits

        def spy(qf, src, rows, chunk):
            key_rows.append(rows.shape[1])
            return real(qf, src, rows, chunk)

        monkeypatch.setattr(cpu_attention, "_gather_logits", spy)
        monkeypatch.setattr(cr, "_gather_logits", spy)
    kernels.rerank_attention(q, keys, values, short, fixed, 100, 0.125, backend="cpu", log_z=log_z)
    fused = sum(key_rows)
    key_rows.clear()
    top = kernels.rerank_topk(q, keys, short, 100, 0.125, backend="cpu", log_z=log_z)
    kernels.sparse_decode_attention(q, keys, values, torch.cat([fixed, top], -1), 0.125, backend="cpu")
    two_ops = sum(key_rows)
    assert (fixed >= 0).all()
    assert fused == int((short >= 0).sum(-1).max()) + fixed.shape[-1]  # the -1 tail of the shortlist is not read
    assert two_ops == fused + 100


def test_known_logits_are_checked():
    q = torch.randn(1, 2, 4, 64)
    kv = torch.randn(1, 2, 50, 64)
    idx = torch.arange(10).expand(1, 2, 10)
    with pytest.raises(ValueError, match="known_logits"):
        cpu_attention.sparse_decode_attention_cpu(q, kv, kv, idx, 0.1, known_logits=torch.zeros(1, 2, 3, 4))


def test_fixed_slots_are_checked():
    q = torch.randn(1, 2, 4, 64)
    kv = torch.randn(1, 2, 50, 64)
    short = torch.arange(10, 20).expand(1, 2, 10)
    for bad in (torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, 2, 4), torch.zeros(2, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="fixed"):
            kernels.rerank_attention(q, kv, kv, short, bad, 5, 0.1, backend="cpu")
