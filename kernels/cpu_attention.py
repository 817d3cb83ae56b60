"""CPU fast path of `sparse_decode_attention` (backend "cpu"): exact softmax attention of one decode query over the
K/V rows listed in idx, read in ascending row order through a small reusable workspace.

Why it is fast on CPU (plain ATen ops):
  * Rows are read in ascending position order, or in a few ascending runs: idx is sorted only when its valid entries
    step back more than `_MAX_DESCENTS` times in a row. A decode step's [sink | top-k | window] slots are three
    ascending runs with -1 gaps (`pq_topk_cpu` emits ascending positions), which the prefetchers follow as well as
    one run, so the step does not pay for a sort (~1 ms per layer at 32K, Llama-3-8B layer).
  * The rows of all B * Hkv heads are gathered chunk by chunk (one `index_select` per chunk over the flattened
    [B * Hkv * N, D] cache) into a per-thread workspace that is reused across calls, so no fresh pages are
    faulted in on every step and a chunk is still in cache when the batched matmul reads it.
  * Two passes, keys then values, with the logits of all slots kept (they are small: [B * Hkv, G, S] floats), so
    the softmax is computed once and exactly instead of merged chunk by chunk.
  * bfloat16/float16 caches are gathered in their own dtype (half the bytes) and widened to float32 in the cached
    chunk; the matmuls run in float32 as the reference does.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["sparse_decode_attention_cpu"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_BYTES = 1 << 21  # float32 bytes of one gathered chunk (all heads): fits the L2 + L3 share of one core
_MAX_DESCENTS = 16  # per row: more steps back than this and the rows are sorted before they are read
_local = threading.local()


def _workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread flat buffer of at least `numel` elements, reused across calls (grown when too small)."""
    key = (name, dtype)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_inputs(query, keys, values, idx) -> None:
    for name, t in (("query", query), ("keys", keys), ("values", values), ("idx", idx)):
        _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
        _check(t.device.type == "cpu", f"backend 'cpu' needs CPU tensors, {name} is on {t.device}")
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        _check(t.dim() == 4 and t.dtype in _FLOATS, f"{name} must be a 4-d float32/bfloat16/float16 tensor, got "
               f"{t.dtype} {tuple(t.shape)}")
    b, h, _, d = query.shape
    _check(tuple(keys.shape[:2]) == (b, h) and keys.shape[3] == d,
           f"keys {tuple(keys.shape)} do not match query {tuple(query.shape)} ([B, Hkv, N, D])")
    _check(tuple(values.shape[:3]) == tuple(keys.shape[:3]),
           f"values {tuple(values.shape)} do not match keys {tuple(keys.shape)} ([B, Hkv, N, Dv])")
    _check(keys.dtype == values.dtype, f"keys are {keys.dtype} but values are {values.dtype}")
    _check(idx.dim() == 3 and tuple(idx.shape[:2]) == (b, h) and not idx.is_floating_point()
           and idx.dtype != torch.bool, f"idx must be an integer [B, Hkv, S] tensor, got {idx.dtype} "
           f"{tuple(idx.shape)}")


def _descents(ix: torch.Tensor) -> int:
    """The most steps back to a valid (>= 0) entry in any row of ix [R, S] int64 (-1 = empty, skipped over)."""
    prev = torch.cummax(ix, dim=-1).values[:, :-1]  # the largest position read so far in the row
    return int(((ix[:, 1:] < prev) & (ix[:, 1:] >= 0)).sum(-1).max())


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, N, D] -> a [B * Hkv * N, D] view (row r = (b * Hkv + h) * N + n); copies only a non-viewable x."""
    b, h, n, d = x.shape
    if x.stride(3) == 1 and x.stride(2) == d and x.stride(1) == n * d and x.stride(0) == h * n * d:
        return x.view(b * h * n, d)
    return x.reshape(b * h * n, d)


def _chunks(src: torch.Tensor, rows: torch.Tensor, chunk: int):
    """Yield (c0, c1, rows c0..c1 of every head as float32 [BH, c1 - c0, dim]), read chunk by chunk in the given
    order into a per-thread workspace (the view is overwritten by the next chunk). src: [R, dim] rows of the
    flattened cache; rows: [BH, S] int64 row numbers."""
    bh, s = rows.shape
    dim = src.shape[1]
    widen = src.dtype != torch.float32
    gat = _workspace("gather", bh * chunk * dim, src.dtype)
    wide = _workspace("wide", bh * chunk * dim, torch.float32) if widen else None
    for c0 in range(0, s, chunk):
        c1 = min(s, c0 + chunk)
        m = bh * (c1 - c0)
        buf = gat[: m * dim].view(m, dim)
        torch.index_select(src, 0, rows[:, c0:c1].reshape(m), out=buf)
        if widen:
            buf = wide[: m * dim].view(m, dim).copy_(buf)
        yield c0, c1, buf.view(bh, c1 - c0, dim)


def _gather_logits(qf: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits of the listed rows, read chunk by chunk in the given order. qf: [BH, G, D] float32; src: [R, D] rows
    of the flattened cache; rows: [BH, S] int64 row numbers. Returns [BH, G, S] float32 (unscaled)."""
    logits = torch.empty(qf.shape[0], qf.shape[1], rows.shape[1])
    for c0, c1, k in _chunks(src, rows, chunk):
        torch.bmm(qf, k.transpose(1, 2), out=logits[:, :, c0:c1])
    return logits


def _gather_values(p: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_s p[:, :, s] * row[s], rows read chunk by chunk. p: [BH, G, S] float32; src: [R, Dv]; rows: [BH, S].
    Returns [BH, G, Dv] float32."""
    out = torch.zeros(p.shape[0], p.shape[1], src.shape[1])
    for c0, c1, v in _chunks(src, rows, chunk):
        out.baddbmm_(p[:, :, c0:c1], v)
    return out


def sparse_decode_attention_cpu(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor,
                                scaling: float, known_logits: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one decode query over the listed tokens, the semantics of the reference.

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D]; values: [B, Hkv, N, Dv] (same dtype as keys); idx: [B, Hkv, S]
    integer, -1 = skip, each position at most once per (b, h). Returns (out [B, Hkv, G, Dv] in query.dtype,
    lse [B, Hkv, G] float32; -inf and a zero output where a row lists no token).
    known_logits: optional [B, Hkv, G, T] float32, the scaled logits of the last T slots of idx, already computed
    by the caller (exact re-ranking read those keys): their keys are not read again, only their values. With it,
    the slots are read in the given order (no sort), since the logits are tied to the slot order.
    """
    _check_inputs(query, keys, values, idx)
    b, h, g, d = query.shape
    n, dv, s = keys.shape[2], values.shape[3], idx.shape[2]
    t = 0 if known_logits is None else known_logits.shape[-1]
    if known_logits is not None:
        _check(tuple(known_logits.shape) == (b, h, g, t) and t <= s,
               f"known_logits must be [B, Hkv, G, T] with T <= S = {s}, got {tuple(known_logits.shape)}")
    bh = b * h
    if s == 0 or n == 0:
        return query.new_zeros(b, h, g, dv), torch.full((b, h, g), float("-inf"))
    ix = idx.reshape(bh, s).to(torch.int64)
    if t == 0 and s > 1 and _descents(ix) > _MAX_DESCENTS:
        ix = ix.sort(dim=-1).values  # ascending rows; the order of slots does not change the result
    valid = ix >= 0
    rows = ix.clamp_min(0) + torch.arange(0, bh * n, n).view(bh, 1)  # skipped slots read a real row, masked
    chunk = max(16, min(s, _CHUNK_BYTES // (4 * bh * max(d, dv))))
    qf = query.reshape(bh, g, d).float()
    logits = _gather_logits(qf, _rows(keys), rows[:, : s - t], chunk).mul_(scaling)
    if t:
        logits = torch.cat([logits, known_logits.reshape(bh, g, t).float()], dim=-1)
    logits.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [BH, G]
    p = (logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).exp_()
    out = _gather_values(p, _rows(values), rows, chunk)
    return out.to(query.dtype).view(b, h, g, dv), lse.view(b, h, g)
