"""`kernels.cpu_np` (numpy selection primitives of the CPU top-k paths) against the torch calls they replace, on
fresh random inputs (odd lengths, ties, -inf, strided views), and the torch fallback without numpy."""

from __future__ import annotations

import os
import random

import pytest
import torch

from pqpatch.kernels import cpu_np

SEED = int(os.environ.get("PQPATCH_SEED", random.randrange(2 ** 31)))


def _scores(kind: str, r: int, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "spread":
        return (torch.randn(r, n, generator=gen) * 6).exp()
    if kind == "ties":  # few distinct values
        return torch.randint(0, 4, (r, n), generator=gen).float()
    x = torch.rand(r, n, generator=gen)  # "neg_inf": the empty entries of the re-ranking
    x[torch.rand(r, n, generator=gen) < 0.3] = float("-inf")
    return x


@pytest.mark.parametrize("numpy", [True, False])
@pytest.mark.parametrize("kind", ["spread", "ties", "neg_inf"])
@pytest.mark.parametrize("n", [1, 17, 97, 1000, 29458])
def test_kth_largest_equals_topk(kind, n, numpy, monkeypatch):
    monkeypatch.setattr(cpu_np, "HAS_NUMPY", numpy and cpu_np.HAS_NUMPY)
    gen = torch.Generator().manual_seed(n)
    for r in (1, 3, 8):
        x = _scores(kind, r, n, gen)
        for k in sorted({1, max(1, n // 5), max(1, n // 2), n}):
            got = cpu_np.kth_largest(x, k)
            want = torch.topk(x, k, dim=-1).values.amin(dim=-1, keepdim=True)
            assert got.shape == (r, 1) and got.dtype == torch.float32
            assert torch.equal(got, want), (kind, n, r, k)


@pytest.mark.parametrize("numpy", [True, False])
@pytest.mark.parametrize("n", [1, 17, 97, 1000, 29458])
def test_row_positions_equal_nonzero(n, numpy, monkeypatch):
    monkeypatch.setattr(cpu_np, "HAS_NUMPY", numpy and cpu_np.HAS_NUMPY)
    gen = torch.Generator().manual_seed(n + 1)
    for r, p in ((1, 0.5), (3, 0.0), (8, 0.23), (5, 1.0)):
        mask = torch.rand(r, n, generator=gen) < p
        rows, cols = cpu_np.row_positions(mask)
        want_r, want_c = mask.nonzero(as_tuple=True)
        assert rows.dtype == cols.dtype == torch.int64
        assert torch.equal(rows, want_r) and torch.equal(cols, want_c)


@pytest.mark.parametrize("seed", [0, pytest.param(SEED, id="fresh")])
def test_random_strided_case(seed):
    rng = random.Random(seed)
    n, r = rng.randint(1, 5000), rng.randint(1, 9)
    print(f"PQPATCH_SEED={seed} n={n} r={r}")
    gen = torch.Generator().manual_seed(seed)
    x = _scores(rng.choice(["spread", "ties", "neg_inf"]), n, r, gen).t()  # [r, n], not contiguous
    k = rng.randint(1, n)
    assert torch.equal(cpu_np.kth_largest(x, k), torch.topk(x, k, dim=-1).values.amin(dim=-1, keepdim=True))
    mask = (x > 0.5).t().contiguous().t()
    assert all(torch.equal(a, b) for a, b in zip(cpu_np.row_positions(mask), mask.nonzero(as_tuple=True)))
