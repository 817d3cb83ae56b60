"""pqpatch tensor ops with backend dispatch.

`backend="torch"` runs the PyTorch reference (`kernels.reference`), `backend="cpu"` the CPU fast paths
(`kernels.cpu_select`, `kernels.cpu_attention`), `backend="triton"` the Triton kernels, and `backend="auto"` picks
"cpu" for CPU tensors, Triton for CUDA tensors when triton is installed, and the reference elsewhere. When "auto"
has to fall back to the reference on CUDA (triton missing) it logs a warning once and records it in
`kernels.last_fallback`, so a slow GPU run can be explained after the fact.
Shapes are documented in `kernels.reference`. Nothing here imports transformers or triton at import time.

pq_topk, pq_assign and sparse_decode_attention call the torch.library ops `torch.ops.pqpatch.*` (`kernels.ops`), so
torch.compile(fullgraph=True) keeps them in one graph on every backend.
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

__all__ = ["pq_topk", "exact_topk", "pq_assign", "sparse_decode_attention", "resolve_backend", "last_fallback"]

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
