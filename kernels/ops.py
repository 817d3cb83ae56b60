"""torch.library registration of the pqpatch ops (namespace `pqpatch`), so torch.compile(fullgraph=True) sees each
op as one opaque node with a known output shape instead of tracing into Triton launchers or breaking the graph.

    torch.ops.pqpatch.pq_topk(query, centroids, codes, lo, hi, k, scaling, backend) -> idx [B, Hkv, k] int64
    torch.ops.pqpatch.pq_assign(keys, centroids, backend) -> codes [B, Hkv, T, m] uint8
    torch.ops.pqpatch.sparse_decode_attention(query, keys, values, idx, scaling, backend)
        -> (out [B, Hkv, G, Dv] query.dtype, lse [B, Hkv, G] float32)
    torch.ops.pqpatch.rerank_topk(query, keys, shortlist, k, scaling, backend, k_valid, log_z)
        -> idx [B, Hkv, k] int64
    torch.ops.pqpatch.pq_log_partition(query, centroids, codes, lo, hi, scaling, backend) -> log_z [B, Hkv, G] float32
    torch.ops.pqpatch.pq_shortlist(query, centroids, codes, lo, hi, k, scaling, backend, k_valid, outliers)
        -> (idx [B, Hkv, k + X] int64, log_z [B, Hkv, G] float32): pq_topk and pq_log_partition of the same
        inputs, with the X optional outliers joined to the top-k

`backend` is already resolved ("torch", "cpu" or "triton", see `kernels.resolve_backend`); "torch" runs
`kernels.reference` (`kernels.quality` for rerank_topk, `kernels.log_partition` for pq_log_partition), "cpu" the CPU
fast paths (`kernels.cpu_select`, `kernels.cpu_attention`, `kernels.cpu_rerank`, `log_partition.log_partition_cpu`,
`kernels.cpu_shortlist`; `pq_assign` has no separate CPU path: one token per step, the reference is already cheap).
The fake (meta) implementations only build the output shapes. Inference only: no autograd formula is registered.
Importing this module does not import triton.
"""

# No `from __future__ import annotations`: custom_op reads the real annotation objects to infer the schema.
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from . import quality
from .cpu_attention import sparse_decode_attention_cpu
from .cpu_rerank import rerank_attention_cpu, rerank_topk_cpu
from .cpu_select import pq_topk_cpu
from .cpu_shortlist import pq_shortlist_cpu
from .log_partition import check_log_partition_inputs, log_partition_cpu, log_partition_ref

__all__ = ["pq_topk_op", "pq_assign_op", "sparse_decode_attention_op", "rerank_topk_op", "pq_log_partition_op",
           "pq_shortlist_op", "rerank_attention_op"]


def _triton():
    from . import triton_ops  # imported on first Triton call only

    return triton_ops


def _check_backend(backend: str) -> None:
    if backend not in ("torch", "cpu", "triton"):
        raise ValueError(f"resolved backend must be 'torch', 'cpu' or 'triton', got {backend!r}")


@torch.library.custom_op("pqpatch::pq_topk", mutates_args=())
def pq_topk_op(query: Tensor, centroids: Tensor, codes: Tensor, lo: Tensor, hi: Tensor, k: int, scaling: float,
               backend: str, k_valid: Optional[Tensor] = None) -> Tensor:
    """[B, Hkv, k] int64 top-k token positions by PQ group score, -1 = empty. See `reference.pq_topk_ref`.
    k_valid (1-element integer tensor): select only the best min(k_valid, k); the other slots are -1."""
    _check_backend(backend)
    if backend == "triton":
        return _triton().pq_topk_triton(query, centroids, codes, lo, hi, k, scaling, k_valid=k_valid)
    if backend == "cpu":
        if k_valid is None:
            return pq_topk_cpu(query, centroids, codes, lo, hi, k, scaling)
        kk = max(0, min(int(k_valid), k))  # a CPU tensor: reading it costs no device sync
        out = pq_topk_cpu(query, centroids, codes, lo, hi, kk, scaling)
        return torch.nn.functional.pad(out, (0, k - kk), value=-1)
    return ref.pq_topk_ref(query, centroids, codes, lo, hi, k, scaling, k_valid).contiguous()


@pq_topk_op.register_fake
def _(query, centroids, codes, lo, hi, k, scaling, backend, k_valid=None):
    return query.new_empty((query.shape[0], query.shape[1], k), dtype=torch.int64)


@torch.library.custom_op("pqpatch::pq_assign", mutates_args=())
def pq_assign_op(keys: Tensor, centroids: Tensor, backend: str) -> Tensor:
    """[B, Hkv, T, m] uint8 nearest-centroid codes. See `reference.pq_assign_ref`."""
    _check_backend(backend)
    if backend == "triton":
        return _triton().pq_assign_triton(keys, centroids)
    return ref.pq_assign_ref(keys, centroids).contiguous()  # the fake promises contiguous outputs


@pq_assign_op.register_fake
def _(keys, centroids, backend):
    return keys.new_empty((*keys.shape[:3], centroids.shape[2]), dtype=torch.uint8)


@torch.library.custom_op("pqpatch::sparse_decode_attention", mutates_args=())
def sparse_decode_attention_op(query: Tensor, keys: Tensor, values: Tensor, idx: Tensor, scaling: float,
                               backend: str) -> tuple[Tensor, Tensor]:
    """(out [B, Hkv, G, Dv], lse [B, Hkv, G] float32). See `reference.sparse_decode_attention_ref`."""
    _check_backend(backend)
    if backend == "triton":
        return _triton().sparse_decode_attention_triton(query, keys, values, idx, scaling)
    if backend == "cpu":
        return sparse_decode_attention_cpu(query, keys, values, idx, scaling)
    out, lse = ref.sparse_decode_attention_ref(query, keys, values, idx, scaling)
    return out.contiguous(), lse.contiguous()


@sparse_decode_attention_op.register_fake
def _(query, keys, values, idx, scaling, backend):
    b, h, g, _ = query.shape
    return query.new_empty((b, h, g, values.shape[-1])), query.new_empty((b, h, g), dtype=torch.float32)


@torch.library.custom_op("pqpatch::rerank_topk", mutates_args=())
def rerank_topk_op(query: Tensor, keys: Tensor, shortlist: Tensor, k: int, scaling: float, backend: str,
                   k_valid: Optional[Tensor] = None, log_z: Optional[Tensor] = None) -> Tensor:
    """[B, Hkv, k] int64: the best min(k, k_valid) shortlist positions by exact group score, -1 = empty. See
    `quality.rerank_exact_ref` (order: best first for "torch" and "triton", ascending positions for "cpu").
    log_z: optional [B, Hkv, G] float32 per-head log-partition (`pq_log_partition`); None: shortlist softmax."""
    _check_backend(backend)
    if backend == "triton":
        return _triton().rerank_topk_triton(query, keys, shortlist, k, scaling, k_valid=k_valid, log_z=log_z)
    if backend == "cpu":
        return rerank_topk_cpu(query, keys, shortlist, k, scaling, k_valid, log_z)
    quality.check_rerank_inputs(query, keys, shortlist, k, k_valid, log_z)
    return quality.rerank_exact_ref(query, keys, shortlist, k, scaling, k_valid, log_z).contiguous()


@rerank_topk_op.register_fake
def _(query, keys, shortlist, k, scaling, backend, k_valid=None, log_z=None):
    return query.new_empty((query.shape[0], query.shape[1], k), dtype=torch.int64)


@torch.library.custom_op("pqpatch::pq_log_partition", mutates_args=())
def pq_log_partition_op(query: Tensor, centroids: Tensor, codes: Tensor, lo: Tensor, hi: Tensor, scaling: float,
                        backend: str) -> Tensor:
    """[B, Hkv, G] float32: per-head log-sum-exp of the PQ logits over the candidates lo[b] <= n < hi[b], -inf for a
    sequence without candidates. See `log_partition.log_partition_ref`."""
    _check_backend(backend)
    if backend == "triton":
        return _triton().pq_log_partition_triton(query, centroids, codes, lo, hi, scaling)
    check_log_partition_inputs(query, centroids, codes, lo, hi)
    if backend == "cpu":
        if query.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, the query is on {query.device}")
        return log_partition_cpu(query, centroids, codes, lo, hi, scaling).contiguous()
    return log_partition_ref(query, centroids, codes, lo, hi, scaling).contiguous()


@pq_log_partition_op.register_fake
def _(query, centroids, codes, lo, hi, scaling, backend):
    return query.new_empty(query.shape[:3], dtype=torch.float32)


@torch.library.custom_op("pqpatch::pq_shortlist", mutates_args=())
def pq_shortlist_op(query: Tensor, centroids: Tensor, codes: Tensor, lo: Tensor, hi: Tensor, k: int, scaling: float,
                    backend: str, k_valid: Optional[Tensor] = None,
                    outliers: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(idx [B, Hkv, k + X] int64, log_z [B, Hkv, G] float32): `pq_topk_op` and `pq_log_partition_op` of the same
    inputs, sharing their per-token pass over the codes ("cpu": one joint-code histogram, `cpu_shortlist`; "triton":
    the top-k's softmax-statistics partials; "torch": the two references). outliers: optional [B, Hkv, X] positions
    joined to the top-k (`quality.with_outliers`; "cpu" merges them into its selection mask: ascending output)."""
    _check_backend(backend)
    check_log_partition_inputs(query, centroids, codes, lo, hi)  # every backend, as pq_log_partition
    _check_k(k, k_valid, query.device)
    _check_outliers(outliers, query)
    if backend == "cpu":
        return pq_shortlist_cpu(query, centroids, codes, lo, hi, k, scaling, k_valid, outliers)
    if backend == "triton":
        idx, log_z = _triton().pq_shortlist_triton(query, centroids, codes, lo, hi, k, scaling, k_valid=k_valid)
    else:
        idx = ref.pq_topk_ref(query, centroids, codes, lo, hi, k, scaling, k_valid).contiguous()
        log_z = log_partition_ref(query, centroids, codes, lo, hi, scaling).contiguous()
    if outliers is not None:
        idx = quality.with_outliers(idx, outliers, lo, hi)
    return idx, log_z


@pq_shortlist_op.register_fake
def _(query, centroids, codes, lo, hi, k, scaling, backend, k_valid=None, outliers=None):
    b, h, g, _ = query.shape
    x = 0 if outliers is None else outliers.shape[-1]
    return query.new_empty((b, h, k + x), dtype=torch.int64), query.new_empty((b, h, g), dtype=torch.float32)


def _check_outliers(outliers: Optional[Tensor], query: Tensor) -> None:
    """None, or int64 [B, Hkv, X] on the query's device (ValueError; the values are not read)."""
    if outliers is None:
        return
    if (outliers.dim() != 3 or tuple(outliers.shape[:2]) != tuple(query.shape[:2]) or outliers.dtype != torch.int64
            or outliers.device != query.device):
        raise ValueError(f"outliers must be int64 [B, Hkv, X] = [{query.shape[0]}, {query.shape[1]}, X] on "
                         f"{query.device} (ascending, -1 = empty first), got {outliers.dtype} "
                         f"{tuple(outliers.shape)} on {outliers.device}")


def _check_k(k: int, k_valid: Optional[Tensor], device: torch.device) -> None:
    """k >= 0, and k_valid None or one integer on the query's device (ValueError; nothing is read)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k_valid is not None and (k_valid.numel() != 1 or k_valid.dtype not in (torch.int32, torch.int64)
                                or k_valid.device != device):
        raise ValueError(f"k_valid must be one int32/int64 on {device}, got {k_valid.dtype} "
                         f"{tuple(k_valid.shape)} on {k_valid.device}")


@torch.library.custom_op("pqpatch::rerank_attention", mutates_args=())
def rerank_attention_op(query: Tensor, keys: Tensor, values: Tensor, shortlist: Tensor, fixed: Tensor, k: int,
                        scaling: float, backend: str, k_valid: Optional[Tensor] = None,
                        log_z: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, Hkv, G, Dv], lse [B, Hkv, G] float32, top [B, Hkv, k] int64): `rerank_topk` of the shortlist, then
    exact attention over fixed ∪ top. "cpu" fuses the two (`cpu_rerank.rerank_attention_cpu`: the selected keys
    are read once); "torch" and "triton" run the two ops one after the other."""
    _check_backend(backend)
    if backend == "cpu":  # checks its inputs (rerank_topk_cpu's checks, plus `fixed`)
        return rerank_attention_cpu(query, keys, values, shortlist, fixed, k, scaling, k_valid, log_z)
    top = rerank_topk_op(query, keys, shortlist, k, scaling, backend, k_valid, log_z)
    idx = torch.cat([fixed.to(torch.int64), top], dim=-1)
    out, lse = sparse_decode_attention_op(query, keys, values, idx, scaling, backend)
    return out, lse, top


@rerank_attention_op.register_fake
def _(query, keys, values, shortlist, fixed, k, scaling, backend, k_valid=None, log_z=None):
    b, h, g, _ = query.shape
    return (query.new_empty((b, h, g, values.shape[-1])), query.new_empty((b, h, g), dtype=torch.float32),
            query.new_empty((b, h, k), dtype=torch.int64))
