"""Launchers of the native selection kernels (`csrc/pq_select.c`, `csrc/pq_codes.c`, the lookup table of
`csrc/pq_logits.c`): shape, dtype and device checks, per-thread scratch, and the translation of the kernels' return
codes into clear errors (or None where the caller has a fallback). Loaded and re-exported by `native.py`; callers
use `native.select_top` etc. Every tensor's shape is in its function's docstring.
"""

from __future__ import annotations

import threading

import torch

from .native import _MAX_DIM, _check, _load

__all__ = ["code_z", "lut", "rerank_pick", "select_top", "topk_pq"]

_local = threading.local()


def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-thread scratch of the radix select (`pq_select_top`, `pq_topk_pq`, `pq_rerank_pick`) for n scores: two
    [n] int32 buffers and an [n] zeroed byte flag array (the kernel leaves it zeroed), reused across calls."""
    buf = getattr(_local, "select", None)
    if buf is None or buf[0].numel() < n:
        buf = _local.select = (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32),
                               torch.zeros(n, dtype=torch.uint8))
    return buf


def _table() -> torch.Tensor:
    """Per-thread float32 scratch for one row's code table (`pq_topk_pq`: 256 x 256 entries, so that any pair of
    code bytes indexes inside it), reused across calls."""
    buf = getattr(_local, "table", None)
    if buf is None:
        buf = _local.table = torch.empty(256 * 256)
    return buf


def _selection_outputs(rows: int, n: int, kk: int, extra: torch.Tensor | None
                       ) -> tuple[torch.Tensor | None, int, torch.Tensor, torch.Tensor]:
    """Checks shared by the radix-select launchers, and their outputs: (extra contiguous or None, X, pos
    [rows, kk + X] int64, thr [rows] float32), both uninitialised."""
    _check(0 < kk <= n, f"need 0 < kk <= n, got kk = {kk}, n = {n}")
    x = 0
    if extra is not None:
        _check(extra.dtype == torch.int64 and extra.dim() == 2 and extra.shape[0] == rows
               and extra.device.type == "cpu", f"extra must be int64 [{rows}, X] on CPU, got {extra.dtype} "
               f"{tuple(extra.shape)} on {extra.device}")
        extra = extra.contiguous()
        x = extra.shape[1]
    return extra, x, torch.empty(rows, kk + x, dtype=torch.int64), torch.empty(rows, dtype=torch.float32)


def select_top(rows: int, n: int, kk: int, scores: torch.Tensor, extra: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk best of each row's n non-negative scores [rows, n] float32, ties at the kk-th score to the earliest
    positions, joined with extra positions; the rule of `cpu_select._select_tokens` and `_emit`. extra: optional
    [rows, X] int64 positions (-1 or out of [0, n) = none). 0 < kk <= n. Returns (pos [rows, kk + X] int64: each
    row's selected positions ascending, then -1; thr [rows] float32: each row's kk-th largest score). Raises
    RuntimeError for a NaN or negative score (the ATen path's count of selected tokens then goes wrong too). The PQ
    top-k scores tokens through their codes in the same kernel instead: `topk_pq`.
    """
    extra, x, out, thr = _selection_outputs(rows, n, kk, extra)
    work, cand, flag = _scratch(n)
    _check(scores.dtype == torch.float32 and scores.is_contiguous() and tuple(scores.shape) == (rows, n)
           and scores.device.type == "cpu", f"scores must be contiguous float32 [{rows}, {n}] on CPU, got "
           f"{scores.dtype} {tuple(scores.shape)}")
    rc = _load().pq_select_top(scores.data_ptr(), rows, n, kk, None if extra is None else extra.data_ptr(), x,
                               out.data_ptr(), thr.data_ptr(), work.data_ptr(), cand.data_ptr(), flag.data_ptr())
    if rc == -2:
        raise RuntimeError("pq_topk_cpu got a NaN or negative token score (NaN in the query or the centroids?)")
    _check(rc == 0, "native select_top rejected its arguments")
    return out, thr


def code_z(ex: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Softmax denominators of PQ logits over one sequence's candidates, accumulated in float64:
    z[r, g] = sum over tokens of ex[r, 0, g, c0] * ex[r, 1, g, c1] (m = 2; m = 1: of ex[r, 0, g, c0]).

    ex: [rows, m, G, K] float64 (`log_partition.log_z_factors`: exp(lut - max over K)); codes: [rows, n, m] uint8
    (m = 1 or 2, unit stride in m, codes < K <= 256). Returns [rows, G] float64 (what the joint-code histogram gives
    through `log_partition.z_from_counts`, up to float64 rounding)."""
    _check(ex.dtype == torch.float64 and ex.dim() == 4 and ex.shape[1] in (1, 2) and ex.shape[3] <= 256
           and ex.device.type == "cpu",
           f"ex must be float64 [rows, m <= 2, G, K <= 256] on CPU, got {ex.dtype} {tuple(ex.shape)}")
    rows, m, g, kc = ex.shape
    _check(codes.dtype == torch.uint8 and codes.dim() == 3 and codes.shape[0] == rows and codes.shape[2] == m
           and codes.stride(2) == 1 and codes.device.type == "cpu",
           f"codes must be uint8 [{rows}, n, {m}] on CPU with unit stride in m, got {codes.dtype} {tuple(codes.shape)}")
    # [rows, m, 256, G]: a token's G factors side by side; rows K..255 zero, so no code byte indexes outside
    ext = torch.zeros(rows, m, 256, g, dtype=torch.float64)
    ext[:, :, :kc] = ex.transpose(2, 3)
    z = torch.empty(rows, g, dtype=torch.float64)
    part = torch.empty(2 * 256 * g, dtype=torch.float64)
    rc = _load().pq_code_z(ext.data_ptr(), codes.data_ptr(), codes.stride(0), codes.stride(1), m, g, kc, rows,
                           codes.shape[1], z.data_ptr(), part.data_ptr())
    _check(rc == 0, f"a code is >= K = {kc}")
    return z


def rerank_pick(raw: torch.Tensor, log_z: torch.Tensor, ix: torch.Tensor, n: int, kk: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The selection of exact re-ranking with per-head log-partitions (`cpu_rerank.rerank_topk_cpu`): entry s of row
    t scores sum_g exp(raw[t, g, s] - log_z[t, g] - mx[t]), mx[t] its row's largest raw - log_z; the kk best per
    row are kept, ties to the earliest entries.

    raw: [T, G, S] float32 exact scaled logits (-inf for an empty entry); log_z: [T, G] float32 (an infinite entry
    counts as 0); ix: [T, S] int64 positions, ascending, empty entries = n (sorted to the tail); 0 < kk <= min(S, k).
    Returns (top [T, k] int64: the kept positions ascending, then -1; logits [T, G, k] float32: their raw logits,
    -inf after), or None when a score is NaN (the caller's ATen path then decides). The exp runs in torch, so the
    scores have the ATen path's bits; the arithmetic around it and the pick are `pq_rerank_prep` / `pq_rerank_pick`.
    """
    _check(raw.dtype == torch.float32 and raw.dim() == 3 and raw.is_contiguous() and raw.device.type == "cpu",
           f"raw must be contiguous float32 [T, G, S] on CPU, got {raw.dtype} {tuple(raw.shape)}")
    t, g, s = raw.shape
    _check(tuple(log_z.shape) == (t, g) and log_z.dtype == torch.float32 and log_z.device.type == "cpu",
           f"log_z must be float32 [{t}, {g}] on CPU, got {log_z.dtype} {tuple(log_z.shape)} on {log_z.device}")
    _check(tuple(ix.shape) == (t, s) and ix.dtype == torch.int64 and ix.is_contiguous() and ix.device.type == "cpu",
           f"ix must be contiguous int64 [{t}, {s}] on CPU, got {ix.dtype} {tuple(ix.shape)} on {ix.device}")
    _check(0 < kk <= min(s, k), f"need 0 < kk <= min(S, k), got kk = {kk}, S = {s}, k = {k}")
    lib = _load()
    lz = torch.where(torch.isfinite(log_z), log_z, 0.0).contiguous()
    ws = torch.empty(t, g, s)
    _check(lib.pq_rerank_prep(raw.data_ptr(), lz.data_ptr(), t, g, s, ws.data_ptr()) == 0,
           "pq_rerank_prep rejected its arguments")
    ws.exp_()
    top = torch.empty(t, k, dtype=torch.int64)
    sel = torch.empty(t, g, k)
    work, cand, flag = _scratch(s)
    rc = lib.pq_rerank_pick(ws.data_ptr(), raw.data_ptr(), ix.data_ptr(), n, t, g, s, kk, k, top.data_ptr(),
                            sel.data_ptr(), work.data_ptr(), cand.data_ptr(), flag.data_ptr())
    if rc == -2:
        return None
    _check(rc == 0, "pq_rerank_pick rejected its arguments")
    return top, sel


def topk_pq(ex: torch.Tensor, e32: torch.Tensor, codes: torch.Tensor, kk: int, extra: torch.Tensor | None,
            tiny: float, low: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One sequence's PQ top-k in one call (`pq_topk_pq`): the denominators (the bits of `code_z`), the factor
    tables, the code table, each token's score through its codes and the radix select of `select_top`.

    ex: [rows, m, G, K] float64 (`log_partition.log_z_factors`); e32: [rows, m, G, K] float32, exp(lut - max over
    K) in float32; codes: [rows, n, m] uint8, unit stride in m; 0 < kk <= n; extra: optional [rows, X] int64.
    Returns (pos [rows, kk + X] int64 as `select_top`, z [rows, G] float64), or None when a denominator is <= tiny
    or a threshold < low in float32 (the caller redoes the selection with float64 factors)."""
    _check(ex.dim() == 4 and ex.dtype == torch.float64 and ex.is_contiguous() and ex.device.type == "cpu"
           and ex.shape[1] in (1, 2) and 1 <= ex.shape[3] <= 256 and 1 <= ex.shape[2] <= 256,
           f"ex must be contiguous float64 [rows, m <= 2, G <= 256, K <= 256] on CPU, got {ex.dtype} "
           f"{tuple(ex.shape)} on {ex.device}")
    rows, m, g, kc = ex.shape
    _check(e32.dtype == torch.float32 and e32.is_contiguous() and e32.shape == ex.shape and e32.device.type == "cpu",
           f"e32 must be contiguous float32 {tuple(ex.shape)} on CPU, got {e32.dtype} {tuple(e32.shape)} on "
           f"{e32.device}")
    _check(codes.dtype == torch.uint8 and codes.dim() == 3 and codes.shape[0] == rows and codes.shape[2] == m
           and codes.stride(2) == 1 and codes.device.type == "cpu",
           f"codes must be uint8 [{rows}, n, {m}] on CPU with unit stride in m, got {codes.dtype} {tuple(codes.shape)}")
    n = codes.shape[1]
    extra, x, out, thr = _selection_outputs(rows, n, kk, extra)
    z = torch.empty(rows, g, dtype=torch.float64)
    work, cand, flag = _scratch(n)
    scratch = torch.empty(4 * 256 * g, dtype=torch.float64)
    fscratch = torch.empty(256 * g)
    rc = _load().pq_topk_pq(ex.data_ptr(), e32.data_ptr(), codes.data_ptr(), codes.stride(0), codes.stride(1), m,
                            g, kc, rows, n, kk, None if extra is None else extra.data_ptr(), x, out.data_ptr(),
                            thr.data_ptr(), z.data_ptr(), tiny, low, work.data_ptr(), cand.data_ptr(),
                            flag.data_ptr(), _table().data_ptr(), scratch.data_ptr(), fscratch.data_ptr())
    if rc == -3:
        return None
    if rc == -2:
        raise RuntimeError("pq_topk_cpu got a NaN or negative token score (NaN in the query or the centroids?)")
    _check(rc == 0, "native topk_pq rejected its arguments (a code beyond the centroids?)")
    return out, z


def lut(query: torch.Tensor, centroids: torch.Tensor, scaling: float) -> torch.Tensor:
    """The PQ lookup table (`pq_lut` in pq_logits.c): [B, Hkv, m, G, K] float32, scaling * (query sub-vector .
    centroid). query: [B, Hkv, G, D]; centroids: [B, Hkv, m, K, Ds] (m * Ds = D), both on CPU (read as float32)."""
    b, h, g, d = query.shape
    m, kc, ds = centroids.shape[2:]
    _check(query.device.type == "cpu" and centroids.device.type == "cpu" and m * ds == d
           and tuple(centroids.shape[:2]) == (b, h) and ds <= _MAX_DIM,
           f"lut needs CPU query [B, Hkv, G, D] and centroids [B, Hkv, m, K, Ds] with m * Ds = D, got "
           f"{tuple(query.shape)} and {tuple(centroids.shape)}")
    q = query.float().contiguous()
    c = centroids.float().contiguous()
    out = torch.empty(b, h, m, g, kc)
    qs = torch.empty(g * ds)
    rc = _load().pq_lut(q.data_ptr(), c.data_ptr(), b * h, m, g, kc, ds, scaling, out.data_ptr(), qs.data_ptr())
    _check(rc == 0, "pq_lut rejected its arguments")
    return out
