"""Launchers of the Triton kernels: argument checks (ValueError with the offending shape/dtype/device), workspace
allocation, launch geometry. Imports triton; `kernels` imports this module only when a Triton backend is used.

Nothing here synchronises with the host (no .item(), no data-dependent shapes or grids), so every launcher can be
captured in a CUDA graph. Shapes follow `kernels.reference`.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
import triton

from . import quality as _quality
from .log_partition import check_log_partition_inputs
from ._triton import log_partition as _logz
from ._triton import pq_assign as _assign
from ._triton import pq_topk as _topk
from ._triton import rerank as _rerank
from ._triton import sparse_attn as _attn

__all__ = ["pq_topk_triton", "pq_assign_triton", "sparse_decode_attention_triton", "rerank_topk_triton",
           "pq_log_partition_triton", "pq_shortlist_triton"]


def _fix_interpreter_loop_bounds() -> None:
    """CPU runs only (TRITON_INTERPRET=1). Triton <= 3.6's interpreter holds scalars as 1-element arrays and turns a
    loop bound into an int with int(array), which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted
    to Python scalars"), so every `for i in range(runtime_value)` fails. Upstream fixed it (triton-lang/triton issue
    9171, PR 9172) by reading the single element; install the same conversion when this numpy needs it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 1.25-2.3 only warn
            int(np.ones(1, dtype=np.int32))
        return  # numpy < 2.4: nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_pqpatch_fixed", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _patch_lang_tensor._pqpatch_fixed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_interpreter_loop_bounds()

_LOG2E = 1.4426950408889634
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _interpreted(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs a launch should have to keep every SM busy (~4 resident per SM); few under the interpreter,
    where programs run one after the other."""
    if _interpreted(device):
        return 4
    return 4 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _pow2(x: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, x)))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    _check(t.dtype in _FLOATS, f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def _on_tensor_device(launcher):
    """Run `launcher` under the CUDA device of its first argument (the query, or the keys of `pq_assign`).

    Triton launches a kernel on `torch.cuda.current_device()` and that device's current stream. With a device map
    over several GPUs, accelerate moves a layer's inputs to the layer's GPU but leaves the current device alone,
    so without this guard a layer on cuda:1 would launch on cuda:0 (an invalid-pointer error, or unordered with
    cuda:1's work where peer access lets it run). Switching to the device the process is already on is free,
    and a device switch is a host-side call, so the guard is also safe while a CUDA graph is being captured.
    """

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        device = getattr(first, "device", None)
        if device is None or device.type != "cuda":
            return launcher(first, *args, **kwargs)  # CPU under TRITON_INTERPRET, or a bad argument it reports
        with torch.cuda.device(device):
            return launcher(first, *args, **kwargs)

    launch._pqpatch_device_guard = True  # tests check every public launcher has it
    return launch


def _check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        _check(t.device == device, f"{name} is on {t.device} but the query is on {device}")
    _check(device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1",
           f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device}")


def _check_select_inputs(query, centroids, codes, lo, hi, k, k_valid) -> torch.Tensor:
    """Argument checks of the PQ top-k launchers (ValueError naming the shape, dtype or device); returns k_valid as
    a device tensor (k when None)."""
    _check_float("query", query, 4)
    _check_float("centroids", centroids, 5)
    _check(isinstance(codes, torch.Tensor) and codes.dim() == 4 and codes.dtype == torch.uint8,
           f"codes must be a uint8 tensor [B, Hkv, N, m], got {getattr(codes, 'dtype', type(codes))} "
           f"{tuple(getattr(codes, 'shape', ()))}")
    b, hkv, g, d = query.shape
    m, kc, ds = centroids.shape[2:]
    n = codes.shape[2]
    _check(tuple(centroids.shape[:2]) == (b, hkv), f"centroids {tuple(centroids.shape)} do not match query "
           f"{tuple(query.shape)} in [B, Hkv]")
    _check(m * ds == d, f"centroids describe {m} sub-spaces of {ds} dims but the query has head dim {d}")
    _check(1 <= kc <= 256, f"uint8 codes address at most 256 centroids per sub-space, got K = {kc}")
    _check(tuple(codes.shape) == (b, hkv, n, m), f"codes must be [B, Hkv, N, m] = [{b}, {hkv}, N, {m}], "
           f"got {tuple(codes.shape)}")
    for name, t in (("lo", lo), ("hi", hi)):
        _check(isinstance(t, torch.Tensor) and t.dtype in _INTS and tuple(t.shape) == (b,),
               f"{name} must be an int32/int64 tensor of shape [{b}], got "
               f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    _check(isinstance(k, int) and k >= 0, f"k must be a non-negative int, got {k!r}")
    _check_device(query.device, centroids=centroids, codes=codes, lo=lo, hi=hi)
    if k_valid is None:
        k_valid = torch.full((1,), k, dtype=torch.int64, device=query.device)
    _check(k_valid.numel() == 1 and k_valid.dtype in _INTS,
           f"k_valid must be one integer, got {k_valid.dtype} {tuple(k_valid.shape)}")
    _check_device(query.device, k_valid=k_valid)
    return k_valid


@_on_tensor_device
def pq_topk_triton(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                   hi: torch.Tensor, k: int, scaling: float, *, block_n: int | None = None,
                   programs_per_row: int | None = None, k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k tokens by PQ group score (see `kernels._triton.pq_topk` for the algorithm).

    query: [B, Hkv, G, D] float; centroids: [B, Hkv, m, K, Ds] float, K <= 256, m * Ds = D; codes: [B, Hkv, N, m]
    uint8 (a preallocated buffer: only [lo, hi) is read); lo, hi: [B] int32/int64. Returns [B, Hkv, k] int64
    token positions in no particular order, -1 in slots beyond the number of candidates.
    k_valid: optional 1-element integer tensor: select only min(k_valid, k) tokens, the other slots -1 (a runtime
    count, read on the device: a compiled step keeps k slots while the budget of the real context varies).
    block_n / programs_per_row override the launch geometry (tests use them to exercise multi-block loops).

    Bytes per row (N candidates): 2 * N * m code bytes + 4 * N key bytes written and 3 * 4 * N re-read (L2-resident)
    + 8 * k index bytes. N = 128K, Hkv = 8, m = 2, k = N/5: ~23 MB, mostly L2 traffic; bound by the 6 launches
    (~2 us each under a CUDA graph) and the LUT gathers: ~15 us expected on an H100 (target <= 25 us).
    """
    k_valid = _check_select_inputs(query, centroids, codes, lo, hi, k, k_valid)
    return _select_launch(query, centroids, codes, lo, hi, k, scaling, k_valid, block_n, programs_per_row, False)[0]


@_on_tensor_device
def pq_shortlist_triton(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor, k: int, scaling: float, *, block_n: int | None = None,
                        programs_per_row: int | None = None,
                        k_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`pq_topk_triton` and `pq_log_partition_triton` of the same inputs in one launch sequence: the top-k's
    per-head (max, sum) partials (its `_stats_kernel` pass) are merged into log_z by the log-partition's
    `_merge_kernel` (one program per row) instead of a second LUT and statistics pass over the codes.

    Arguments as `pq_topk_triton`. Returns (idx [B, Hkv, k] int64 as `pq_topk_triton`; log_z [B, Hkv, G] float32,
    natural log, -inf for a sequence without candidates, equal to `pq_log_partition_triton`'s with the same
    geometry: the same kernels on the same partials). Bytes saved per row: m * N code bytes and one LUT build.
    """
    k_valid = _check_select_inputs(query, centroids, codes, lo, hi, k, k_valid)
    return _select_launch(query, centroids, codes, lo, hi, k, scaling, k_valid, block_n, programs_per_row, True)


def _select_launch(query, centroids, codes, lo, hi, k: int, scaling: float, k_valid: torch.Tensor,
                   block_n: int | None, programs_per_row: int | None,
                   want_log_z: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The launches of the PQ top-k (checked inputs; k = 0 with want_log_z: the log-partition alone). Returns
    (idx [B, Hkv, k] int64, log_z [B, Hkv, G] float32 or None)."""
    b, hkv, g, d = query.shape
    m, kc, ds = centroids.shape[2:]
    n = codes.shape[2]
    out = torch.empty((b, hkv, k), dtype=torch.int64, device=query.device)
    log_z = torch.empty((b, hkv, g), dtype=torch.float32, device=query.device) if want_log_z else None
    rows = b * hkv
    if rows == 0 or (k == 0 and not want_log_z):
        return out, log_z
    if n == 0:
        return out.fill_(-1), None if log_z is None else log_z.fill_(float("-inf"))
    gp = _pow2(g)
    dsp = _pow2(ds, 16)
    block_c = min(_pow2(kc, 16), max(16, 8192 // dsp))
    bn_score = block_n or (1024 if gp <= 8 else 512)
    bn_sel = block_n or 2048
    p_score = max(1, min(triton.cdiv(n, bn_score), programs_per_row or triton.cdiv(_target_programs(query.device),
                                                                                     rows)))
    p_sel = max(1, min(triton.cdiv(n, bn_sel), programs_per_row or triton.cdiv(_target_programs(query.device), rows)))

    lut = torch.empty((rows, m, kc, gp), dtype=torch.float32, device=query.device)  # [R, m, K, GP]
    ws = torch.empty((rows, _topk.WS_SIZE), dtype=torch.int32, device=query.device)  # zeroed by _lut_kernel
    part = torch.empty((rows, p_score, 2, gp), dtype=torch.float32, device=query.device)  # [R, P, (max, sum), GP]
    cs = codes.stride()

    _topk._lut_kernel[(rows, m, triton.cdiv(kc, block_c))](
        query, centroids, lut, ws, hkv, float(scaling) * _LOG2E, *query.stride(), *centroids.stride(),
        M=m, KC=kc, DS=ds, G=g, GP=gp, GD=_pow2(gp, 16), DSP=dsp, BLOCK_C=block_c, WS=_topk.WS_SIZE)
    _topk._stats_kernel[(rows, p_score)](
        codes, lut, part, lo, hi, n, hkv, cs[0], cs[1], cs[2], cs[3],
        M=m, KC=kc, GP=gp, BLOCK_N=bn_score, num_warps=8)
    if want_log_z:  # the partials are final here; the merge only reads them
        _logz._merge_kernel[(rows,)](part, log_z, p_score, G=g, GP=gp, PP=_pow2(p_score), num_warps=1)
    if k == 0:
        return out, log_z
    keys = torch.empty((rows, n), dtype=torch.int32, device=query.device)  # [R, N], only [lo, hi) written
    _topk._score_kernel[(rows, p_score)](
        codes, lut, part, keys, ws, lo, hi, n, hkv, cs[0], cs[1], cs[2], cs[3],
        M=m, KC=kc, G=g, GP=gp, PP=_pow2(p_score), BLOCK_N=bn_score, WS=_topk.WS_SIZE, num_warps=8)
    for level in (1, 2):
        _topk._refine_kernel[(rows, p_sel)](
            keys, ws, lo, hi, k_valid, k, n, hkv, LEVEL=level, BLOCK_N=bn_sel, WS=_topk.WS_SIZE, num_warps=8)
    _topk._select_kernel[(rows, p_sel)](
        keys, ws, out, lo, hi, k_valid, k, n, hkv, BLOCK_N=bn_sel, WS=_topk.WS_SIZE, num_warps=8)
    return out, log_z


@_on_tensor_device
def pq_assign_triton(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid codes. keys: [B, Hkv, T, D] float; centroids: [B, Hkv, m, K, Ds] float, K <= 256.
    Returns codes [B, Hkv, T, m] uint8 (see `kernels._triton.pq_assign`)."""
    _check_float("keys", keys, 4)
    _check_float("centroids", centroids, 5)
    b, hkv, t, d = keys.shape
    m, kc, ds = centroids.shape[2:]
    _check(tuple(centroids.shape[:2]) == (b, hkv), f"centroids {tuple(centroids.shape)} do not match keys "
           f"{tuple(keys.shape)} in [B, Hkv]")
    _check(m * ds == d, f"keys have dim {d} but centroids describe {m} sub-spaces of {ds}")
    _check(1 <= kc <= 256, f"uint8 codes address at most 256 centroids per sub-space, got K = {kc}")
    _check_device(keys.device, centroids=centroids)
    codes = torch.empty((b, hkv, t, m), dtype=torch.uint8, device=keys.device)
    if codes.numel() == 0:
        return codes
    dsp = _pow2(ds, 16)
    block_t = 16 if t <= 16 else (64 if dsp <= 64 else 32)
    block_c = min(_pow2(kc, 16), max(16, 8192 // dsp))
    _assign._assign_kernel[(b * hkv, m, triton.cdiv(t, block_t))](
        keys, centroids, codes, t, hkv, *keys.stride(), *centroids.stride(), *codes.stride(),
        KC=kc, DS=ds, DSP=dsp, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return codes


@_on_tensor_device
def sparse_decode_attention_triton(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                   idx: torch.Tensor, scaling: float, *, block_s: int | None = None,
                                   splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the listed tokens (see `kernels._triton.sparse_attn`).

    query: [B, Hkv, G, D]; keys: [B, Hkv, N, D]; values: [B, Hkv, N, Dv] (keys and values of one float dtype, any
    strides, e.g. a preallocated cache; a query of another dtype is cast to it); idx: [B, Hkv, S] int32/int64,
    -1 = skip, each position at most once per row.
    Returns (out [B, Hkv, G, Dv] query.dtype, lse [B, Hkv, G] float32 natural log; -inf and 0 for empty rows).
    block_s / splits override the launch geometry.
    """
    _check_float("query", query, 4)
    _check_float("keys", keys, 4)
    _check_float("values", values, 4)
    b, hkv, g, d = query.shape
    n = keys.shape[2]
    dv = values.shape[3]
    _check(values.dtype == keys.dtype, f"keys and values must share a dtype, got {keys.dtype} and {values.dtype}")
    _check(tuple(keys.shape) == (b, hkv, n, d), f"keys must be [B, Hkv, N, D] = [{b}, {hkv}, N, {d}], got "
           f"{tuple(keys.shape)}")
    _check(tuple(values.shape[:3]) == (b, hkv, n), f"values must be [B, Hkv, N, Dv] = [{b}, {hkv}, {n}, Dv], got "
           f"{tuple(values.shape)}")
    _check(isinstance(idx, torch.Tensor) and idx.dtype in _INTS and idx.dim() == 3
           and tuple(idx.shape[:2]) == (b, hkv),
           f"idx must be an int32/int64 tensor [B, Hkv, S] = [{b}, {hkv}, S], got "
           f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
    _check_device(query.device, keys=keys, values=values, idx=idx)
    s = idx.shape[2]
    rows = b * hkv
    out = torch.empty((b, hkv, g, dv), dtype=query.dtype, device=query.device)  # the reference's output dtype
    if query.dtype != keys.dtype:  # tl.dot needs one operand dtype: the (tiny) query follows the cache
        query = query.to(keys.dtype)
    lse = torch.empty((b, hkv, g), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse
    dp, dvp = _pow2(d, 16), _pow2(dv, 16)
    bs = block_s or (64 if max(dp, dvp) <= 128 else 32)
    # split S so that rows * splits fills the GPU; every split gets whole BLOCK_S blocks
    n_split = splits or max(1, min(triton.cdiv(s, bs), triton.cdiv(_target_programs(query.device), rows)))
    chunk = max(1, triton.cdiv(triton.cdiv(max(s, 1), n_split), bs) * bs)
    n_split = max(1, triton.cdiv(s, chunk))
    o_part = torch.empty((rows, n_split, g, dv), dtype=torch.float32, device=query.device)
    lse_part = torch.empty((rows, n_split, g), dtype=torch.float32, device=query.device)
    _attn._split_kernel[(rows, n_split)](
        query, keys, values, idx, o_part, lse_part, n, s, hkv, chunk, float(scaling) * _LOG2E,
        *query.stride(), *keys.stride(), *values.stride(), *idx.stride(),
        G=g, GP=_pow2(g, 16), D=d, DP=dp, DV=dv, DVP=dvp, BLOCK_S=bs,
        PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        UPCAST=keys.dtype == torch.bfloat16 and _interpreted(query.device),
        SPLIT_P=keys.dtype != torch.float32, num_warps=4)
    spp = _pow2(n_split)
    _attn._merge_kernel[(rows, g)](
        o_part, lse_part, out, lse, n_split, G=g, DV=dv, DVP=dvp, SPP=spp, BLOCK_SP=min(spp, 16),
        ROUND_BF16=out.dtype == torch.bfloat16 and _interpreted(query.device), num_warps=4)
    return out, lse


@_on_tensor_device
def rerank_topk_triton(query: torch.Tensor, keys: torch.Tensor, shortlist: torch.Tensor, k: int, scaling: float, *,
                       k_valid: torch.Tensor | None = None, log_z: torch.Tensor | None = None,
                       block: int | None = None, programs_per_row: int | None = None) -> torch.Tensor:
    """Exact re-ranking of a shortlist (see `kernels._triton.rerank` for the kernels, `quality.rerank_exact_ref`
    for the rule).

    query: [B, Hkv, G, D] float; keys: [B, Hkv, N, D] float32/float16/bfloat16 (any strides, e.g. a preallocated
    cache); shortlist: [B, Hkv, L] int32/int64 positions, negative = empty (a position >= N is treated as empty:
    checking it would need a host sync), each position at most once per row; k_valid: optional 1-element integer
    tensor on the query's device, read there (never on the host); log_z: optional [B, Hkv, G] float32 per-head
    log-partition over all candidates (`pq_log_partition`; the score rule with and without it:
    `quality.rerank_exact_ref`). Returns [B, Hkv, k] int64: the best min(k, k_valid) positions, best first
    (torch.topk over the exact scores), then -1.
    block / programs_per_row override the launch geometry (tests use them to exercise multi-block loops).
    """
    _quality.check_rerank_inputs(query, keys, shortlist, k, k_valid, log_z)
    _check_device(query.device, keys=keys, shortlist=shortlist,
                  **({} if k_valid is None else {"k_valid": k_valid}), **({} if log_z is None else {"log_z": log_z}))
    b, hkv, g, d = query.shape
    n, length = keys.shape[2], shortlist.shape[2]
    rows = b * hkv
    if rows == 0 or length == 0 or k == 0:
        return torch.full((b, hkv, k), -1, dtype=torch.int64, device=query.device)
    gp = _pow2(g, 16)  # tl.dot needs >= 16 rows
    dp = _pow2(d, 16)
    bl = block or (64 if dp <= 128 else 32)
    p = max(1, min(triton.cdiv(length, bl), programs_per_row or triton.cdiv(_target_programs(query.device), rows)))
    logits = torch.empty((rows, g, length), dtype=torch.float32, device=query.device)
    part = torch.empty((rows, p, 2, gp), dtype=torch.float32, device=query.device)
    score = torch.empty((b, hkv, length), dtype=torch.float32, device=query.device)
    _rerank._logits_kernel[(rows, p)](
        query, keys, shortlist, logits, part, n, length, hkv, float(scaling) * _LOG2E,
        *query.stride(), *keys.stride(), *shortlist.stride(),
        G=g, GP=gp, D=d, DP=dp, BLOCK=bl, num_warps=4)
    lz = part if log_z is None else log_z  # without log_z the kernel never reads this pointer
    _rerank._score_kernel[(rows, p)](
        shortlist, logits, part, lz, score, n, length, hkv, *shortlist.stride(),
        *(log_z.stride() if log_z is not None else (0, 0, 0)),
        G=g, GP=gp, PP=_pow2(p), BLOCK=bl, HAS_LZ=log_z is not None, num_warps=4)
    return _quality.rerank_keep_best(score, shortlist, k, k_valid)


@_on_tensor_device
def pq_log_partition_triton(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
                            hi: torch.Tensor, scaling: float, *, block_n: int | None = None,
                            programs_per_row: int | None = None) -> torch.Tensor:
    """Per-head log-sum-exp of the PQ logits over the candidates [lo, hi) (see `kernels._triton.log_partition`).

    query: [B, Hkv, G, D] float; centroids: [B, Hkv, m, K, Ds] float, K <= 256, m * Ds = D; codes: [B, Hkv, N, m]
    uint8 (only [lo, hi) is read); lo, hi: [B] int32/int64. Returns [B, Hkv, G] float32 (natural log), -inf for a
    sequence without candidates. The LUT and statistics kernels are pq_topk's, with its launch geometry (its launch
    sequence stopped after the merge, k = 0); block_n / programs_per_row override it (tests use them to exercise
    multi-block loops). `pq_shortlist_triton` gets the same log_z from the top-k's own partials.
    """
    check_log_partition_inputs(query, centroids, codes, lo, hi)
    _check_device(query.device)
    k_valid = torch.zeros((1,), dtype=torch.int64, device=query.device)  # never read: k = 0 launches no select
    return _select_launch(query, centroids, codes, lo, hi, 0, scaling, k_valid, block_n, programs_per_row, True)[1]
