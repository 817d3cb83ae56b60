"""The public ops are torch.library ops (torch.ops.pqpatch.*): torch.compile(fullgraph=True) keeps them in one graph,
their fake implementations give the right shapes, and importing `kernels` does not import triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pqpatch import kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(device=DEV):
    gen = torch.Generator().manual_seed(0)
    b, hkv, g, d, m, kc, n = 2, 2, 4, 64, 2, 16, 120
    return dict(
        q=torch.randn(b, hkv, g, d, generator=gen).to(device),
        c=torch.randn(b, hkv, m, kc, d // m, generator=gen).to(device),
        codes=torch.randint(0, kc, (b, hkv, n, m), generator=gen, dtype=torch.uint8).to(device),
        keys=torch.randn(b, hkv, n, d, generator=gen).to(device),
        values=torch.randn(b, hkv, n, d, generator=gen).to(device),
        lo=torch.tensor([0, 7], device=device),
        hi=torch.tensor([120, 90], dtype=torch.int32, device=device),
        kv=torch.tensor([20], device=device),
    )


def _decode_step(q, c, codes, keys, values, lo, hi, kv, backend="torch"):
    """What the integration does per layer and decode step: select (also with exact re-ranking of a 2x shortlist,
    the top-k count a device tensor, normalised by the PQ log-partition as `selection.select` does, and without
    it), attend, encode the new key."""
    idx = kernels.pq_topk(q, c, codes, lo, hi, 24, 0.125, backend=backend)
    short = kernels.pq_topk(q, c, codes, lo, hi, 48, 0.125, backend=backend, k_valid=kv * 2)
    log_z = kernels.pq_log_partition(q, c, codes, lo, hi, 0.125, backend=backend)
    top = kernels.rerank_topk(q, keys, short, 24, 0.125, backend=backend, k_valid=kv, log_z=log_z)
    top_sl = kernels.rerank_topk(q, keys, short, 24, 0.125, backend=backend, k_valid=kv)
    out, lse = kernels.sparse_decode_attention(q, keys, values, idx, 0.125, backend=backend)
    new_codes = kernels.pq_assign(keys[:, :, -1:], c, backend=backend)
    fixed = torch.arange(4, device=q.device).expand(*q.shape[:2], 4).contiguous()  # sink-like positions 0..3
    f_out, f_lse, f_top = kernels.rerank_attention(q, keys, values, short.masked_fill(short < 4, -1), fixed, 24,
                                                   0.125, backend=backend, k_valid=kv, log_z=log_z)
    return (idx.sort(-1).values, log_z, top.sort(-1).values, top_sl.sort(-1).values, out, lse, new_codes, f_out,
            f_lse, f_top.sort(-1).values)


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.allclose(x.float(), y.float(), atol=1e-5, equal_nan=True)


def test_import_kernels_does_not_import_triton():
    code = "import sys, pqpatch.kernels; assert 'triton' not in sys.modules, 'pqpatch.kernels imported triton'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
def test_no_graph_break_reference_backend(backend):
    x = _inputs("cpu")
    explanation = torch._dynamo.explain(_decode_step)(**x, backend=backend)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(**x, backend=backend), _decode_step(**x, backend=backend))
    torch._dynamo.reset()


def test_resolve_backend_traces_as_constant():
    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1 if kernels.resolve_backend("auto", torch.device("cuda")) == "triton" else 2)

    assert f(torch.zeros(1)).item() in (1.0, 2.0)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck_reference_and_cpu_backends(backend):
    x = _inputs("cpu")
    ops = torch.ops.pqpatch
    torch.library.opcheck(ops.pq_topk.default, (x["q"], x["c"], x["codes"], x["lo"], x["hi"], 24, 0.125, backend))
    idx = kernels.pq_topk(x["q"], x["c"], x["codes"], x["lo"], x["hi"], 24, 0.125, backend=backend)
    torch.library.opcheck(ops.sparse_decode_attention.default, (x["q"], x["keys"], x["values"], idx, 0.125, backend))
    torch.library.opcheck(ops.pq_assign.default, (x["keys"][:, :, :5], x["c"], backend))
    log_z = kernels.pq_log_partition(x["q"], x["c"], x["codes"], x["lo"], x["hi"], 0.125, backend=backend)
    torch.library.opcheck(ops.pq_log_partition.default, (x["q"], x["c"], x["codes"], x["lo"], x["hi"], 0.125, backend))
    for kv in (None, x["kv"]):
        for lz in (None, log_z):
            torch.library.opcheck(ops.rerank_topk.default, (x["q"], x["keys"], idx, 12, 0.125, backend, kv, lz))
            fixed = torch.full_like(idx[..., :3], -1)
            torch.library.opcheck(ops.rerank_attention.default,
                                  (x["q"], x["keys"], x["values"], idx, fixed, 12, 0.125, backend, kv, lz))


def test_unknown_backend_is_rejected():
    x = _inputs("cpu")
    with pytest.raises(ValueError):
        kernels.pq_topk(x["q"], x["c"], x["codes"], x["lo"], x["hi"], 4, 0.1, backend="cuda")
    with pytest.raises(ValueError):
        torch.ops.pqpatch.pq_assign(x["keys"], x["c"], "auto")  # the op takes a resolved backend only


@pytest.mark.triton
def test_no_graph_break_triton_backend():
    pytest.importorskip("triton")
    x = _inputs()
    explanation = torch._dynamo.explain(_decode_step)(**x, backend="triton")
    assert explanation.graph_break_count == 0
    compiled = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(**x, backend="triton"), _decode_step(**x, backend="torch"))
    torch._dynamo.reset()


@pytest.mark.gpu
def test_inductor_compile_on_gpu():
    pytest.importorskip("triton")
    x = _inputs("cuda")
    compiled = torch.compile(_decode_step, fullgraph=True)
    _assert_same(compiled(**x, backend="auto"), _decode_step(**x, backend="torch"))
    torch._dynamo.reset()
