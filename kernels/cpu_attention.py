"""CPU fast path of `sparse_decode_attention` (backend "cpu"): exact softmax attention of one decode query over the
K/V rows listed in idx, read in ascending row order through a small reusable workspace.

With the native kernels (`native.py`, the default where a C compiler works) each listed row is instead read in place
with software prefetches, its logits or its weighted value computed while it is in L1 (`_native_attention`); the
softmax takes one exp pass. What follows is the ATen path, the fallback without them.

Why it is fast on CPU (plain ATen ops):
  * Rows are read in ascending position order, or in a few ascending runs: idx is sorted only when its valid entries
    step back more than `_MAX_DESCENTS` times in a row. A decode step's [sink | top-k | window] slots are three
    ascending runs with -1 gaps (`pq_topk_cpu` emits ascending positions), which the prefetchers follow as well as
    one run, so the step does not pay for a sort (~1 ms per layer at 32K, Llama-3-8B layer).
  * The rows of all B * Hkv heads are gathered chunk by chunk (one `index_select` per chunk over the flattened
    [B * Hkv * N, D] cache) into a per-thread workspace that is reused across calls, so no fresh pages are
    faulted in on every step and a chunk is still in cache when the batched matmul reads it.
  * bfloat16/float16 caches: a run of consecutive positions that every row lists in the same slots (the recent
    window of a decode step: the same positions for every head) is widened straight from the cache, not gathered
    first (`_common_run`, `_slab`): 3.75 vs 4.2 ms for the 3.3K-token window of a 32K step, Llama-3-8B layer.
  * Two passes, keys then values, with the logits of all slots kept (they are small: [B * Hkv, G, S] floats), so
    the softmax is computed once and exactly instead of merged chunk by chunk.
  * bfloat16/float16 caches are gathered in their own dtype (half the bytes) and widened to float32 in the cached
    chunk; the matmuls run in float32 as the reference does.
"""

from __future__ import annotations

import threading

import torch

from . import native

__all__ = ["sparse_decode_attention_cpu", "use_native", "native_rows"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_BYTES = 1 << 21  # float32 bytes of one gathered chunk (all heads): fits the L2 + L3 share of one core
_MAX_DESCENTS = 16  # per row: more steps back than this and the rows are sorted before they are read
_MIN_RUN = 256  # a run of consecutive positions shared by every row this long is read as a slice (`_common_run`)
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


def _common_run(ix: torch.Tensor) -> tuple[int, int, int] | None:
    """The longest run of columns [c0, c1) of ix [R, F] in which every row holds the same consecutive positions
    p0, p0 + 1, ... (no -1): (c0, c1, p0), or None when it is shorter than _MIN_RUN. A decode step's window slots
    are one: the same positions for every head (and every sequence of a batch, past its padding)."""
    f = ix.shape[1]
    if f < _MIN_RUN:
        return None
    row0 = ix[0]
    ok = (ix == row0).all(0) & (row0 >= 0)  # [F] the same valid position in every row
    joins = torch.zeros(f, dtype=torch.bool)  # column c continues the run of column c - 1
    joins[1:] = ok[1:] & ok[:-1] & (row0[1:] == row0[:-1] + 1)
    seg = torch.where(ok, (ok & ~joins).cumsum(0), 0)  # run number of each column, 0 outside runs
    count = torch.bincount(seg)
    count[0] = 0
    best = int(count.argmax())
    if int(count[best]) < _MIN_RUN:
        return None
    c0 = int((seg == best).nonzero()[0, 0])
    return c0, c0 + int(count[best]), int(row0[c0])


def _slab(src: torch.Tensor, p0: int, length: int, chunk: int):
    """Yield (c0, c1, positions p0 + c0 .. p0 + c1 of every head as float32 [BH, c1 - c0, dim]) of the cache
    src [BH, N, dim] (bfloat16/float16), widened chunk by chunk into a workspace straight from the cache: one copy
    where a gathered chunk takes two (index_select, then the widening)."""
    bh, _, dim = src.shape
    wide = _workspace("wide", bh * chunk * dim, torch.float32)
    for c0 in range(0, length, chunk):
        c1 = min(length, c0 + chunk)
        yield c0, c1, wide[: bh * (c1 - c0) * dim].view(bh, c1 - c0, dim).copy_(src[:, p0 + c0: p0 + c1])


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


def use_native(x: torch.Tensor) -> bool:
    """Whether the rows of cache x [B, Hkv, N, D] go through the native kernels (`native.py`): they are compiled
    here, take x's dtype and width, and x's rows are addressable as one [R, D] array (`native_rows`)."""
    return native.supports(x) and native_rows(x) is not None


def native_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x [B, Hkv, N, D] with unit stride in D and rows D elements apart -> (src [R, D]: a view over x's storage
    from x's first element, base [B * Hkv] int64: the row number of position 0 of each head), without a copy, also
    for a slice of a longer buffer (a cache allocated for more tokens than it holds); None when x's rows are not
    evenly spaced that way."""
    b, h, n, d = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 != 1 or s2 != d or s0 % d or s1 % d or s0 < 0 or s1 < 0:
        return None
    span = (b - 1) * (s0 // d) + (h - 1) * (s1 // d) + n  # rows from x's first element to its last
    src = torch.as_strided(x, (span, d), (d, 1))
    base = (torch.arange(b).view(b, 1) * (s0 // d) + torch.arange(h).view(1, h) * (s1 // d)).reshape(b * h)
    return src, base


def _native_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ix: torch.Tensor,
                      scaling: float, known_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_decode_attention_cpu` through the native kernels: each listed key row read once for its logits,
    each value row once for the output, skipped slots not read. ix: [BH, S] int64 positions (-1 = skip), the
    known_logits' slots last. Shapes as the caller's."""
    b, h, g, d = query.shape
    bh, s = ix.shape
    t = 0 if known_logits is None else known_logits.shape[-1]
    top = int(ix.max())
    _check(top < keys.shape[2], f"idx positions must be < N = {keys.shape[2]} (or -1 to skip), got {top}: a "
           f"position past a head's rows would read the next head's")
    ksrc, kbase = native_rows(keys)
    vsrc, vbase = native_rows(values)
    valid = ix >= 0
    qf = query.reshape(bh, g, d).float().contiguous()
    logits = torch.empty(bh, g, s)  # the read slots' scaled logits (-inf where skipped), then the known ones
    native.gather_logits(qf, ksrc, torch.where(valid[:, : s - t], ix[:, : s - t] + kbase[:, None], -1),
                         scale=scaling, fill=float("-inf"), out=logits)
    if t:  # already scaled; a skipped slot is -inf whatever the caller passed
        tail = logits[:, :, s - t:].copy_(known_logits.reshape(bh, g, t))
        tail.masked_fill_(~valid[:, None, s - t:], float("-inf"))
    # softmax with one exp pass: p = exp(l - max) unnormalised, the output divided by its sum at the end
    mx = logits.amax(dim=-1, keepdim=True)  # [BH, G, 1]
    mx = torch.where(torch.isfinite(mx), mx, 0.0)  # a row without slots: all -inf, p = 0
    p = logits.sub_(mx).exp_()
    z = p.sum(dim=-1)  # [BH, G]
    lse = z.log().add_(mx[..., 0])  # -inf for a row without slots
    out = native.gather_values(p, vsrc, torch.where(valid, ix + vbase[:, None], -1))
    out.div_(torch.where(z > 0, z, 1.0)[..., None])  # zero output for a row without slots
    return out.to(query.dtype).view(b, h, g, values.shape[3]), lse.view(b, h, g)


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
    if use_native(keys) and use_native(values):
        return _native_attention(query, keys, values, ix, scaling, known_logits)
    # float32 rows are gathered even in a run: index_select's copy then the matmul on cached rows measured faster
    # than the matmul reading the slice from memory (Llama-3-8B layer, 32K: 4.2 vs 4.8 ms for a 3.3K window)
    run = _common_run(ix[:, : s - t]) if keys.dtype != torch.float32 else None
    span = 0
    if run is not None:  # the run's columns first (read as a slice), then the others; the known slots stay last
        c0, c1, p0 = run
        span = c1 - c0
        ix = torch.cat([ix[:, c0:c1], ix[:, :c0], ix[:, c1:]], dim=-1)
    valid = ix >= 0
    rows = ix.clamp_min(0) + torch.arange(0, bh * n, n).view(bh, 1)  # skipped slots read a real row, masked
    chunk = max(16, min(s, _CHUNK_BYTES // (4 * bh * max(d, dv))))
    qf = query.reshape(bh, g, d).float()
    parts = []
    if span:
        parts.append(torch.empty(bh, g, span))
        for a, e, k in _slab(_rows(keys).view(bh, n, d), p0, span, chunk):
            torch.bmm(qf, k.transpose(1, 2), out=parts[0][:, :, a:e])
    parts.append(_gather_logits(qf, _rows(keys), rows[:, span: s - t], chunk))
    parts = [x.mul_(scaling) for x in parts]
    if t:
        parts.append(known_logits.reshape(bh, g, t).float())  # already scaled
    logits = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    logits.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [BH, G]
    p = (logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).exp_()
    out = _gather_values(p[:, :, span:], _rows(values), rows[:, span:], chunk)
    if span:
        for a, e, v in _slab(_rows(values).view(bh, n, dv), p0, span, chunk):
            out.baddbmm_(p[:, :, a:e], v)
    return out.to(query.dtype).view(b, h, g, dv), lse.view(b, h, g)
