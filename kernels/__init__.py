"""pqpatch tensor ops with backend dispatch.

`backend="torch"` runs the PyTorch reference (`kernels.reference`, `kernels.quality`), `backend="cpu"` the CPU fast
paths (`kernels.cpu_select`, `kernels.cpu_attention`, `kernels.cpu_rerank`), `backend="triton"` the Triton kernels,
and `backend="auto"` picks "cpu" for CPU tensors, Triton for CUDA tensors when triton is installed, and the reference
elsewhere. When "auto" has to fall back to the reference on CUDA (triton missing) it logs a warning once and records
it in `kernels.last_fallback`, so a slow GPU run can be explained after the fact.
Shapes are documented in `kernels.reference`. Nothing here imports transformers or triton at import time.

pq_topk, pq_assign, sparse_decode_attention, rerank_topk, rerank_attention, pq_log_partition and pq_shortlist call
the torch.library ops `torch.ops.pqpatch.*` (`kernels.ops`), so torch.compile(fullgraph=True) keeps them in one
graph on every backend.
"""

from __future__ import annotations

import logging

import torch

# Absolute, not relative: a source checkout on sys.path also exposes this folder as a top-level `kernels` package
# (transformers imports `kernels` to probe for Hugging Face's package of that name). A relative import would then
# run ops.py a second time as `kernels.ops`, registering the torch.library ops again, which tears down the first
# registration and leaves every caller holding dangling operator handles (seen as random segfaults). Imported
# absolutely, ops.py runs once, as pqpatch.kernels.ops, whichever name this package was imported under.
from pqpatch.kernels import ops as _ops  # noqa: E402
from . import reference as ref

__all__ = ["pq_topk", "exact_topk", "pq_assign", "sparse_decode_attention", "rerank_topk", "rerank_attention",
           "pq_log_partition", "pq_shortlist", "resolve_backend", "last_fallback"]

_BACKENDS = ("auto", "torch", "cpu", "triton")
_log = logging.getLogger(__name__)

# None, or why the last "auto" resolution on CUDA ran the PyTorch reference instead of the Triton kernels
last_fallback: str | None = None
_fallback_warned = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for tensors on `device`; raise for unknown names.

    "auto": "cpu" on CPU, "triton" on CUDA when triton imports, else "torch" (on CUDA: warned once, and recorded in
    `last_fallback`).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type != "cuda":
            return "torch"
        if _triton_importable():
            return "triton"
        _note_fallback("backend='auto' on CUDA ran the PyTorch reference ops: triton cannot be imported "
                       "(pip install triton for the GPU kernels)")
        return "torch"
    return backend


def _note_fallback(reason: str) -> None:
    global last_fallback, _fallback_warned
    last_fallback = reason
    # under torch.compile the warning waits for an eager call (logging inside a traced region breaks the graph)
    if not _fallback_warned and not torch.compiler.is_compiling():
        _fallback_warned = True
        _log.warning(reason)


def _triton_importable() -> bool:
    # traceable by dynamo (an import of a module dynamo itself has loaded); no torch.compiler decorator here:
    # that would import torch._dynamo, and with it triton, whenever `kernels` is imported
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _checked(backend: str, device: torch.device) -> str:
    """resolve_backend, plus a clear error when "triton" is asked for and triton cannot be imported."""
    backend = resolve_backend(backend, device)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors only, got tensors on {device}; use 'auto'")
    if backend == "triton" and not _triton_importable():
        raise ImportError(
            "backend='triton' needs the `triton` package (pip install triton); "
            "use backend='torch' to run the PyTorch reference instead"
        )
    return backend


def pq_topk(query, centroids, codes, lo, hi, k: int, scaling: float, backend: str = "auto",
            k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k candidate tokens by PQ score: [B, Hkv, k] int64, -1 = empty slot. See `reference.pq_topk_ref`.
    k_valid: optional 1-element integer tensor, the number of slots to fill with the best tokens (<= k)."""
    return _ops.pq_topk_op(query, centroids, codes, lo, hi, int(k), float(scaling),
                           _checked(backend, query.device), k_valid)


def exact_topk(query, keys, lo, hi, k: int, scaling: float, backend: str = "auto",
               k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Oracle top-k with exact keys (evaluation only; reference on every backend)."""
    return ref.exact_topk_ref(query, keys, lo, hi, k, scaling, k_valid)


def pq_assign(keys, centroids, backend: str = "auto") -> torch.Tensor:
    """Nearest-centroid codes [B, Hkv, T, m] uint8. See `reference.pq_assign_ref`."""
    return _ops.pq_assign_op(keys, centroids, _checked(backend, keys.device))


def sparse_decode_attention(query, keys, values, idx, scaling: float, backend: str = "auto"):
    """Exact attention over listed tokens: (out [B, Hkv, G, Dv], lse [B, Hkv, G]). See the reference."""
    return _ops.sparse_decode_attention_op(query, keys, values, idx, float(scaling), _checked(backend, query.device))


def rerank_topk(query, keys, shortlist, k: int, scaling: float, *, backend: str = "auto",
                k_valid: torch.Tensor | None = None, log_z: torch.Tensor | None = None) -> torch.Tensor:
    """Exact re-ranking of a shortlist: the best min(k, k_valid) of its positions by exact GQA group score.

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D] (float32/bfloat16/float16, any strides, e.g. the preallocated
    cache); shortlist: [B, Hkv, R] int32/int64 positions in [0, N), negative = empty, each position at most once
    per row (a PQ shortlist, R = r * k); k_valid: optional 1-element integer tensor on the query's device (a runtime
    count: the slots stay k).

    Score of an entry n, with l_g(n) the exact scaled logit of query head g (`quality.rerank_exact_ref`):
      * log_z given ([B, Hkv, G] float32 on the query's device, each head's log-partition over *all* candidates,
        `pq_log_partition`): sum_g exp(l_g(n) - log_z[g]), head g's probability under the full-candidate softmax
        (not renormalised over the shortlist): the selection rule of every selector, with the partition estimated
        through the PQ codes. Computed as sum_g exp(t_g(n) - max_{g', n'} t), t = l - log_z (a per-row factor,
        so no overflow when exact logits exceed the estimate, and the ranking is unchanged); a non-finite log_z
        entry counts as 0. This is what `selection.select` passes.
      * log_z None: sum_g of head g's softmax over the row's shortlist entries only. This re-weights the heads (a
        head whose mass lies mostly outside the shortlist is inflated) and on planted GQA keys agreed less with
        the oracle than the codes alone (`log_partition` module doc); kept for callers without codes.

    Returns [B, Hkv, k] int64: min(k, k_valid, entries of the row) distinct positions, then -1. Order: best first
    for "torch" and "triton", ascending positions for "cpu" (what the CPU sparse attention reads fastest); compare
    as sets. Ties: every entry scoring strictly above the lowest selected score is selected; which of the entries
    equal to it are taken is the backend's choice ("cpu": the lowest positions).

    Bytes read per step (re-ranking alone): R rows of keys per KV head, i.e. B * Hkv * R * D * elem, plus
    B * Hkv * R * 8 of shortlist. Llama-3-8B layer (Hkv = 8, D = 128, bf16) at N = 128K, k = N/10, r = 2
    (R = 26214): 53.7 MB of keys, as much as the sparse attention reads for the k selected tokens' K and V
    (k * (D + Dv) * 2 per KV head), so r = 2 about doubles the selected-token reads of a decode step; in general
    re-ranking reads r/2 times the attention's K/V bytes (D = Dv). The Triton path also writes and re-reads
    B * Hkv * (G + 1) * R * 4 bytes of logits and scores (L2-resident at this size). CPU, one thread, float32,
    the same shape (`benchmarks/bench_rerank.py`): 8.2 ms at N = 32K and 33 ms at 128K (reference: 31 / 170 ms).
    """
    return _ops.rerank_topk_op(query, keys, shortlist, int(k), float(scaling), _checked(backend, query.device),
                               k_valid, log_z)


def rerank_attention(query, keys, values, shortlist, fixed, k: int, scaling: float, *, backend: str = "auto",
                     k_valid: torch.Tensor | None = None, log_z: torch.Tensor | None = None):
    """`rerank_topk` of the shortlist, then exact attention over fixed ∪ the selected tokens, as one op.

    query: [B, Hkv, G, D]; keys/values: [B, Hkv, N, D/Dv]; shortlist, k, k_valid, log_z: as `rerank_topk`; fixed:
    [B, Hkv, F] integer positions always attended (sink and window), -1 = skip, disjoint from the shortlist.
    Returns (out [B, Hkv, G, Dv] query.dtype, lse [B, Hkv, G] float32, top [B, Hkv, k] int64; the order of top as
    `rerank_topk`'s on that backend). On "cpu" the two steps are fused: the selected tokens' exact logits from the
    re-ranking are reused, so their keys are read once (k fewer key rows per KV head and step than the two ops);
    "torch" and "triton" call `rerank_topk` then `sparse_decode_attention`.
    """
    return _ops.rerank_attention_op(query, keys, values, shortlist, fixed, int(k), float(scaling),
                                    _checked(backend, query.device), k_valid, log_z)


def pq_log_partition(query, centroids, codes, lo, hi, scaling: float, backend: str = "auto") -> torch.Tensor:
    """Per-head log-partition of the PQ logits over the candidates: [B, Hkv, G] float32,
    log_z[b, h, g] = log sum_{lo[b] <= n < hi[b]} exp(scaling * q_g . reconstructed key_n), -inf for a sequence
    without candidates. What `rerank_topk(..., log_z=...)` normalises the exact logits by.

    query: [B, Hkv, G, D] float; centroids: [B, Hkv, m, K, Ds] float, K <= 256, m * Ds = D (residual stages: pass
    `quality.residual_query(query, stages)`, as for `pq_topk`); codes: [B, Hkv, N, m] uint8 (a preallocated buffer:
    only [lo, hi) is read); lo, hi: [B] int32/int64 on the query's device. Shapes, dtypes and devices are checked
    (ValueError) on every backend.

    Backends: "torch" the reference (`log_partition.log_partition_ref`: per-token logits through the LUT);
    "cpu" `log_partition.log_partition_cpu` (a histogram of the joint codes, no per-token float work, m <= 2;
    Llama-3-8B layer, one thread: ~1.5 / 2.8 ms at 32K / 128K candidates, 20-23% / 15% of the CPU `pq_topk` of the
    rerank=2 shortlist, `benchmarks/bench_log_partition.py`); "triton" the PQ
    top-k's LUT and per-head softmax-statistics kernels and a merge kernel (`kernels._triton.log_partition`;
    no host sync, CUDA-graph safe). Accuracy: float32 online sums on Triton, float64 sums on CPU. With the top-k
    of the same candidates (a re-ranked decode step), call `pq_shortlist`: both from one pass over the codes.
    """
    return _ops.pq_log_partition_op(query, centroids, codes, lo, hi, float(scaling), _checked(backend, query.device))


def pq_shortlist(query, centroids, codes, lo, hi, k: int, scaling: float, backend: str = "auto",
                 k_valid: torch.Tensor | None = None,
                 outliers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`pq_topk` and `pq_log_partition` of the same inputs as one op: what a decode step with exact re-ranking needs
    (the shortlist, and each head's log-partition to normalise its exact logits by; `selection.pq_shortlist`).

    Arguments as `pq_topk` (k: the shortlist's slots, k_valid: how many of them to fill); outliers: optional
    [B, Hkv, X] int64 positions (ascending, -1 = empty first; `PQCacheConfig.rerank_outliers`) that join the top-k,
    each position once, those outside [lo, hi) dropped. Returns (idx [B, Hkv, k (+ X)] int64, as `pq_topk` on this
    backend, order included, then the outliers it lacks as `quality.with_outliers` appends them ("cpu": the union
    in ascending order, then -1: merged into the selection mask, so the re-ranking gets sorted rows); log_z
    [B, Hkv, G] float32, as `pq_log_partition`, -inf for a sequence without candidates). Shapes, dtypes and devices are checked (ValueError) on every backend.

    Why one op: both run over every candidate's codes, and the per-token pass is shared. "cpu"
    (`cpu_shortlist.pq_shortlist_cpu`): one lookup table and one joint-code histogram per sequence feed the top-k's
    code table and the log-partition's bilinear form; results equal the two "cpu" ops bit for bit. "triton": the
    top-k's per-head (max, sum) partials are merged into log_z (one extra one-program-per-row launch instead of the
    log-partition's LUT and statistics passes); equal to the two "triton" ops with the same geometry. "torch": the two
    references. CPU, one thread, float32, Llama-3-8B layer (Hkv = 8, G = 4, D = 128, m = 2, b = 8), k = 2 N / 10
    at N = 32K: 6.5-6.9 ms against 7.8-8.5 ms for the two ops (0.80-0.83x; at 128K 0.84-0.87x), the
    log-partition now ~0.5 ms on top of the top-k (`benchmarks/bench_log_partition.py`, shared 2-core machine).
    """
    return _ops.pq_shortlist_op(query, centroids, codes, lo, hi, int(k), float(scaling),
                                _checked(backend, query.device), k_valid, outliers)
