"""pqpatch tensor ops with backend dispatch.

`backend="torch"` runs the PyTorch reference (`kernels.reference`), `backend="triton"` the Triton kernels, and
`backend="auto"` picks Triton for CUDA tensors when triton is installed and the reference elsewhere.
Shapes are documented in `kernels.reference`. Nothing here imports transformers or triton at import time.
"""

from __future__ import annotations

import torch

from . import reference as ref

__all__ = ["pq_topk", "exact_topk", "pq_assign", "sparse_decode_attention", "resolve_backend"]

_BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend for tensors on `device`; raise for unknown names."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return backend


def _triton_ops():
    try:
        from . import triton_ops
    except ImportError as e:  # triton missing or broken
        raise ImportError(
            "backend='triton' needs the `triton` package (pip install triton); "
            "use backend='torch' to run the PyTorch reference instead"
        ) from e
    return triton_ops


def pq_topk(query, centroids, codes, lo, hi, k: int, scaling: float, backend: str = "auto") -> torch.Tensor:
    """Top-k candidate tokens by PQ score: [B, Hkv, k] int64, -1 = empty slot. See `reference.pq_topk_ref`."""
    if resolve_backend(backend, query.device) == "triton":
        return _triton_ops().pq_topk_triton(query, centroids, codes, lo, hi, k, scaling)
    return ref.pq_topk_ref(query, centroids, codes, lo, hi, k, scaling)


def exact_topk(query, keys, lo, hi, k: int, scaling: float, backend: str = "auto") -> torch.Tensor:
    """Oracle top-k with exact keys (evaluation only; reference on every backend)."""
    return ref.exact_topk_ref(query, keys, lo, hi, k, scaling)


def pq_assign(keys, centroids, backend: str = "auto") -> torch.Tensor:
    """Nearest-centroid codes [B, Hkv, T, m] uint8. See `reference.pq_assign_ref`."""
    if resolve_backend(backend, keys.device) == "triton":
        return _triton_ops().pq_assign_triton(keys, centroids)
    return ref.pq_assign_ref(keys, centroids)


def sparse_decode_attention(query, keys, values, idx, scaling: float, backend: str = "auto"):
    """Exact attention over listed tokens: (out [B, Hkv, G, Dv], lse [B, Hkv, G]). See the reference."""
    if resolve_backend(backend, query.device) == "triton":
        return _triton_ops().sparse_decode_attention_triton(query, keys, values, idx, scaling)
    return ref.sparse_decode_attention_ref(query, keys, values, idx, scaling)
