"""`pq_log_partition` (the per-head normaliser exact re-ranking divides by) against an independent float64 loop, on
fresh random inputs and a fixed seed set, every backend ("triton" in the interpreter on a machine without CUDA);
its argument checks. The planted-key property it exists for is tested end to end in
tests/test_cache.py::test_pq_recall_on_planted_structure."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pqpatch import kernels
from pqpatch.kernels.log_partition import check_log_partition_inputs, log_partition_cpu, log_partition_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (b, hkv, g, d, m, bits, n)
    (1, 2, 4, 64, 2, 6, 1),
    (1, 2, 4, 64, 2, 8, 17),
    (3, 2, 8, 128, 2, 8, 97),
    (1, 1, 1, 256, 1, 5, 1000),
    (2, 2, 4, 256, 2, 8, 1000),
    (1, 3, 4, 128, 4, 6, 97),  # m > 2: the CPU path is the reference
]
SEEDS = [0, 1, random.randrange(1 << 30)]  # a fixed pair for reproducible CI, plus a fresh one


def _brute(q, c, codes, lo, hi, scaling):
    """float64 loop over (b, h, g, n): the definition, independent of the vectorised code."""
    b, h, g, d = q.shape
    m, _, ds = c.shape[2:]
    out = torch.full((b, h, g), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for hi_ in range(h):
            rec = torch.cat([c[bi, hi_, j, codes[bi, hi_, :, j].long()] for j in range(m)], -1).double()  # [N, D]
            for gi in range(g):
                a, e = max(0, int(lo[bi])), min(codes.shape[2], int(hi[bi]))
                if e > a:
                    out[bi, hi_, gi] = torch.logsumexp(rec[a:e] @ q[bi, hi_, gi].double() * scaling, 0)
    return out


def _run(backend, q, c, codes, lo, hi, scaling, **geometry):
    """The op on `backend`; "triton" runs on CUDA tensors when there is a GPU (the interpreter otherwise, see
    tests/conftest.py) and its result comes back to the CPU."""
    if backend == "triton":
        pytest.importorskip("triton")
        q, c, codes, lo, hi = (t.to(DEV) for t in (q, c, codes, lo, hi))
        if geometry:
            from pqpatch.kernels import triton_ops

            return triton_ops.pq_log_partition_triton(q, c, codes, lo, hi, scaling, **geometry).cpu()
        return kernels.pq_log_partition(q, c, codes, lo, hi, scaling, backend=backend).cpu()
    return kernels.pq_log_partition(q, c, codes, lo, hi, scaling, backend=backend)


def _inputs(seed, b, h, g, d, m, bits, n):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, g, d, generator=gen)
    c = torch.randn(b, h, m, 2**bits, d // m, generator=gen)
    codes = torch.randint(0, 2**bits, (b, h, n, m), generator=gen, dtype=torch.uint8)
    lo = torch.randint(0, max(1, n // 3), (b,), generator=gen)
    hi = torch.clamp(lo + torch.randint(0, n + 1, (b,), generator=gen), max=n)
    return q, c, codes, lo, hi


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}d{}m{}bits{}n{}".format(*c))
@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_log_partition_matches_brute_force(case, seed, backend):
    q, c, codes, lo, hi = _inputs(seed + hash(case) % 997, *case)
    scaling = 1 / math.sqrt(case[3])
    want = _brute(q, c, codes, lo, hi, scaling)
    got = _run(backend, q, c, codes, lo, hi, scaling)
    assert got.shape == want.shape and got.dtype == torch.float32
    empty = torch.isinf(want)
    assert torch.equal(torch.isinf(got), empty)  # -inf exactly where a row has no candidate
    torch.testing.assert_close(got[~empty].double(), want[~empty], rtol=1e-5, atol=1e-4)


def test_log_partition_cpu_survives_large_logits():
    """Logits around 1e3: exp overflows float32 and float64 without the max shift; the shifted sum stays exact."""
    q, c, codes, lo, hi = _inputs(5, 1, 2, 4, 64, 2, 8, 500)
    hi[:] = 500
    lo[:] = 0
    got = log_partition_cpu(q * 40, c, codes, lo, hi, 1.0)
    want = _brute(q * 40, c, codes, lo, hi, 1.0)
    assert bool(torch.isfinite(got).all()) and float(want.abs().max()) > 200
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.triton
@pytest.mark.parametrize("block_n,progs", [(16, 3), (32, 1), (16, 64)])
def test_log_partition_triton_multi_block(block_n, progs):
    """Several blocks per program and several programs per row (more programs than blocks in the last case): the
    online (max, sum) and the merge of the partials."""
    q, c, codes, lo, hi = _inputs(11, 2, 2, 4, 64, 2, 6, 300)
    lo[:] = torch.tensor([5, 0])
    hi[:] = torch.tensor([300, 0])  # the second sequence has no candidates
    got = _run("triton", q, c, codes, lo, hi, 0.125, block_n=block_n, programs_per_row=progs)
    want = _brute(q, c, codes, lo, hi, 0.125)
    assert bool(torch.isinf(got[1]).all()) and bool(torch.isfinite(got[0]).all())
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-4)


def test_log_partition_cpu_strided_codes():
    """Codes that cannot be read as uint16 pairs (every other token of a buffer) take the arithmetic path."""
    q, c, codes, lo, hi = _inputs(3, 1, 2, 4, 64, 2, 8, 400)
    lo[:], hi[:] = 3, 200
    strided = codes[:, :, ::2]
    want = _brute(q, c, strided, lo, hi, 0.125)
    torch.testing.assert_close(log_partition_cpu(q, c, strided, lo, hi, 0.125).double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_log_partition_bad_inputs_raise_clear_value_errors(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    q, c, codes, lo, hi = _inputs(0, 2, 2, 4, 64, 2, 6, 50)
    bad = [
        ((q[0], c, codes, lo, hi), "query must be"),
        ((q.int(), c, codes, lo, hi), "query must be"),
        ((q, c[:, :1], codes, lo, hi), "centroids"),
        ((q, c[..., :16], codes, lo, hi), "sub-spaces"),
        ((q, c, codes.int(), lo, hi), "codes must be a uint8"),
        ((q, c, codes[..., :1], lo, hi), "codes must be"),
        ((q, c, codes, lo[:1], hi), "lo must be"),
        ((q, c, codes, lo, hi.float()), "hi must be"),
        ((q, torch.randn(2, 2, 2, 300, 32), codes, lo, hi), "at most 256 centroids"),
    ]
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            _run(backend, *args, 0.125)
    if backend == "cpu":
        with pytest.raises(ValueError, match="CPU tensors"):
            kernels.pq_log_partition(*(t.to("meta") for t in (q, c, codes, lo, hi)), 0.1, backend="cpu")
    # a meta tensor among the arguments sends the op to its fake implementation, so the device check is called
    with pytest.raises(ValueError, match="centroids is on meta"):
        check_log_partition_inputs(q, c.to("meta"), codes, lo, hi)


def test_joint_histogram_counts_code_pairs():
    """The CPU path's histogram counts the code pairs (m = 2: read as uint16 where the buffer allows, by arithmetic
    where it does not) and the codes (m = 1); an odd start (storage offset) and reuse of the workspace are fine."""
    from pqpatch.kernels.log_partition import _joint_histogram

    gen = torch.Generator().manual_seed(1)
    c = torch.randint(0, 200, (3, 500, 2), generator=gen, dtype=torch.uint8)
    got = _joint_histogram(c, 200).clone()  # a workspace view: the next call overwrites it
    want = torch.zeros(3, 200, 200, dtype=torch.float64)
    for h in range(3):
        for c0, c1 in c[h].tolist():
            want[h, c1, c0] += 1
    assert torch.equal(got, want)
    strided = _joint_histogram(c[:, ::3], 200).clone()  # every third token: no uint16 view, the arithmetic path
    assert torch.equal(strided, _joint_histogram(c[:, ::3].contiguous(), 200))
    first = _joint_histogram(c[:, :1], 200).clone()
    assert torch.equal(_joint_histogram(c[:, 1:], 200), want - first)  # c[:, 1:]: a non-zero storage offset
    one = _joint_histogram(c[..., :1].contiguous(), 200)  # m = 1
    assert one.shape == (3, 1, 200) and torch.equal(one[:, 0], want.sum(1))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [32768, 131072])
def test_gpu_llama_shape_log_partition(n):
    """Llama-3-8B layer shape on the GPU (m = 2, 256 centroids, bf16 query): "auto" is Triton, and it agrees with
    the CPU path (float64 sums) on the same inputs."""
    q, c, codes, lo, hi = _inputs(n, 1, 8, 4, 128, 2, 8, n)
    lo[:], hi[:] = 16, n - 64
    q = q.bfloat16()
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"
    got = kernels.pq_log_partition(*(t.cuda() for t in (q, c, codes, lo, hi)), 128 ** -0.5)
    assert got.device.type == "cuda"
    want = log_partition_cpu(q.float(), c, codes, lo, hi, 128 ** -0.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
