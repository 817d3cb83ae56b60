"""pq_topk / exact_topk with a runtime count (k_valid): k slots, the best min(k_valid, k) filled, the rest -1.
This is what lets one compiled decode step serve every real context length of a shape bucket."""

import pytest
import torch

from pqpatch import kernels


def _case(seed: int, b=2, hkv=2, g=4, d=32, m=2, bits=6, n=300):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv, g, d, generator=gen)
    cent = torch.randn(b, hkv, m, 1 << bits, d // m, generator=gen)
    codes = torch.randint(0, 1 << bits, (b, hkv, n, m), generator=gen, dtype=torch.uint8)
    lo = torch.tensor([3, 40])[:b]
    hi = torch.tensor([n - 10, n - 50])[:b]
    return q, cent, codes, lo, hi


def _sets(idx: torch.Tensor) -> list[set]:
    return [set(row[row >= 0].tolist()) for row in idx.flatten(0, 1)]


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("k,k_valid", [(40, 25), (40, 40), (40, 0), (40, 60), (300, 120)])
def test_pq_topk_k_valid_selects_the_best_k_valid(backend, k, k_valid):
    if backend == "triton":
        pytest.importorskip("triton")
    q, cent, codes, lo, hi = _case(k + k_valid)
    kv = torch.tensor([k_valid])
    got = kernels.pq_topk(q, cent, codes, lo, hi, k, 0.2, backend=backend, k_valid=kv)
    assert got.shape == (2, 2, k)
    kk = min(k_valid, k)
    want = kernels.pq_topk(q, cent, codes, lo, hi, kk, 0.2, backend="torch") if kk else got[..., :0]
    # the filled slots are exactly the best kk (scores are distinct with random codes up to rare ties)
    assert [len(s) for s in _sets(got)] == [len(s) for s in _sets(want)]
    assert _sets(got) == _sets(want)
    assert int((got >= 0).sum(-1).max()) <= kk


def test_exact_topk_k_valid_is_a_prefix_of_the_ranking():
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, 2, 4, 16, generator=gen), torch.randn(1, 2, 200, 16, generator=gen)
    lo, hi = torch.tensor([5]), torch.tensor([190])
    got = kernels.exact_topk(q, keys, lo, hi, 50, 0.25, k_valid=torch.tensor([17]))
    want = kernels.exact_topk(q, keys, lo, hi, 17, 0.25)
    assert _sets(got) == _sets(want) and int((got >= 0).sum(-1).max()) == 17


def test_k_valid_compiles_without_graph_break():
    q, cent, codes, lo, hi = _case(1)

    def step(kv):
        return kernels.pq_topk(q, cent, codes, lo, hi, 40, 0.2, backend="cpu", k_valid=kv)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="eager")
    for v in (10, 25, 40):  # the count changes, the graph does not
        torch.testing.assert_close(compiled(torch.tensor([v])), step(torch.tensor([v])))
