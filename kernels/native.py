"""Loader of the native CPU kernels (`kernels/csrc/pq_cpu.c`), compiled on first use with the system C compiler and
called through ctypes; and their launchers, which check shapes, dtypes and devices before handing over pointers.

Why ctypes and plain C: the kernels are a few loops over row and code lists (`pq_cpu.c` says why they beat ATen);
plain C compiles in ~0.3 s with `cc` (compile and load into a fresh cache on the 2-core CI VM) and needs neither
torch headers nor a build step at install time. The shared object is cached under `$PQPATCH_CACHE_DIR` (default
`~/.cache/pqpatch`), keyed by the source's hash, the compiler and the machine, and written atomically (safe with
several processes). ctypes releases the GIL during a call, so the k-means pool keeps running beside a decode step.

Fallback: without a working compiler (or with `PQPATCH_NATIVE=0`) `available()` is False, the reason is logged once
and kept in `unavailable_reason`, and the CPU backend runs its ATen path (same results, slower).

Builds: with `-march=native` where the compiler takes it, else portable. The selection loops have AVX-512 forms
(`has_avx512()`); `PQPATCH_NATIVE_MARCH=0` forces the portable build (scalar loops), which the tests use to check
that both builds select the same tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "disabled", "unavailable_reason", "code_z", "gather_logits", "gather_values", "has_avx512",
           "lut", "rerank_pick", "select_top", "supports", "topk_pq"]

_log = logging.getLogger("pqpatch")
_SRC = Path(__file__).resolve().parent / "csrc" / "pq_cpu.c"
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_DIM = 1024  # MAX_DIM of pq_cpu.c: the widest row a kernel takes
# -O3 vectorises the dot products; the reduction needs reassociation (not -ffast-math: infinities stay meaningful)
_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-fopenmp-simd", "-std=c11"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_off = 0  # > 0 inside `disabled()`
unavailable_reason: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("PQPATCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pqpatch")
    return Path(root) / "native"


def _compile(cc: str, out: Path, march: bool) -> str | None:
    """Compile the source into `out` (atomically); returns None, or the compiler's complaint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *_FLAGS, *(["-march=native"] if march else []), str(_SRC), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        return f"{' '.join(cmd)}: {e}"
    if res.returncode != 0:
        os.unlink(tmp)
        return f"{' '.join(cmd)} failed: {res.stderr.strip()[-400:]}"
    os.replace(tmp, out)
    return None


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, unavailable_reason
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = _build()
        except OSError as e:  # an unloadable object (a cache on a noexec mount, say)
            unavailable_reason = f"native CPU kernels could not be loaded: {e}"
        _tried = True
        if _lib is None:
            _log.warning("%s; the CPU backend runs its ATen path (same results, slower)", unavailable_reason)
    return _lib


def _build() -> ctypes.CDLL | None:
    global unavailable_reason
    if os.environ.get("PQPATCH_NATIVE", "1") == "0":
        unavailable_reason = "native CPU kernels disabled by PQPATCH_NATIVE=0"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        unavailable_reason = "native CPU kernels need a C compiler (cc, gcc or clang on PATH; or set CC)"
        return None
    src = _SRC.read_bytes()
    march = os.environ.get("PQPATCH_NATIVE_MARCH", "1") != "0"
    key = hashlib.sha256(src + cc.encode() + platform.machine().encode() + platform.node().encode()
                         + " ".join(_FLAGS).encode() + (b"" if march else b" portable")).hexdigest()[:16]
    so = _cache_dir() / f"pq_cpu-{key}.so"
    if not so.exists():
        err = _compile(cc, so, march=True) if march else "portable build asked for (PQPATCH_NATIVE_MARCH=0)"
        if err is not None:  # a compiler without -march=native (or for another target): portable code
            err = _compile(cc, so, march=False)
        if err is not None:
            unavailable_reason = f"native CPU kernels could not be compiled: {err}"
            return None
    lib = ctypes.CDLL(str(so))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    f32 = ctypes.c_float
    lib.pq_gather_logits.argtypes = [p, p, i32, p, i64, i64, i64, i64, p, i64, f32, f32]
    lib.pq_gather_values.argtypes = [p, p, i32, p, i64, i64, i64, i64, p]
    for name in ("pq_gather_logits", "pq_gather_values"):
        getattr(lib, name).restype = i32
    lib.pq_has_dtype.argtypes = [i32]
    lib.pq_has_dtype.restype = i32
    lib.pq_select_top.argtypes = [p, i64, i64, i64, p, i64, p, p, p, p, p]
    lib.pq_select_top.restype = i32
    lib.pq_select_top_pq.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, i64, p, i64, p, p, p, p, p, p]
    lib.pq_select_top_pq.restype = i32
    lib.pq_code_z.argtypes = [p, p, i64, i64, i64, i64, i64, i64, i64, p, p]
    lib.pq_code_z.restype = i32
    lib.pq_rerank_prep.argtypes = [p, p, i64, i64, i64, p]
    lib.pq_rerank_prep.restype = i32
    lib.pq_rerank_pick.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, p, p, p, p, p]
    lib.pq_rerank_pick.restype = i32
    lib.pq_topk_pq.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, p, i64, p, p, p, f32, f32, p, p, p,
                               p, p, p]
    lib.pq_topk_pq.restype = i32
    lib.pq_lut.argtypes = [p, p, i64, i64, i64, i64, i64, f32, p, p]
    lib.pq_lut.restype = i32
    lib.pq_has_avx512.argtypes = []
    lib.pq_has_avx512.restype = i32
    return lib


def available() -> bool:
    """Whether the native kernels are compiled and loaded here (compiling them on the first call), and not turned
    off by `disabled()`."""
    return _off == 0 and _load() is not None


def has_avx512() -> bool:
    """Whether the loaded build runs the selection loops with AVX-512 (16 tokens per instruction; `pq_cpu.c`)."""
    lib = _load()
    return lib is not None and bool(lib.pq_has_avx512())


@contextlib.contextmanager
def disabled():
    """Within the block the CPU backend runs its ATen paths, as without a compiler (tests of the fallback, and A/B
    timings of the two paths in one process). Not thread-scoped: meant for tests and benchmarks."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def supports(src: torch.Tensor) -> bool:
    """Whether the native kernels take rows of this cache: CPU, float32/bfloat16/float16 (float16 when the compiler
    has _Float16), rows of at most 1024 elements, and the library is available."""
    lib = _load() if _off == 0 else None
    return (lib is not None and src.device.type == "cpu" and src.dtype in _DTYPES and src.shape[-1] <= _MAX_DIM
            and bool(lib.pq_has_dtype(_DTYPES[src.dtype])))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_common(a: torch.Tensor, a_name: str, src: torch.Tensor, rows: torch.Tensor) -> tuple[int, int, int]:
    _check(supports(src), f"native kernels do not take src {src.dtype} {tuple(src.shape)} on {src.device} "
           f"({unavailable_reason or 'needs CPU float32/bfloat16/float16 rows of <= 1024 elements'})")
    _check(src.dim() == 2 and src.is_contiguous(), f"src must be contiguous [R, D] rows, got {tuple(src.shape)}")
    _check(rows.dim() == 2 and rows.dtype == torch.int64 and rows.is_contiguous() and rows.device.type == "cpu",
           f"rows must be contiguous int64 [T, S] on CPU, got {rows.dtype} {tuple(rows.shape)}")
    _check(a.dim() == 3 and a.dtype == torch.float32 and a.is_contiguous() and a.device.type == "cpu"
           and a.shape[0] == rows.shape[0], f"{a_name} must be contiguous float32 [T, G, *] on CPU with "
           f"T = {rows.shape[0]}, got {a.dtype} {tuple(a.shape)}")
    if rows.numel():
        _check(int(rows.max()) < src.shape[0], f"rows must be < R = {src.shape[0]} (negative = skip)")
    return rows.shape[0], a.shape[1], rows.shape[1]


def gather_logits(q: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, scale: float = 1.0, fill: float = 0.0,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * (q . row) for every listed row. q: [T, G, D] float32; src: [R, D] float32/bfloat16/float16 rows;
    rows: [T, S] int64 row numbers, negative = skipped (`fill` is written, the row is not read). out: optional
    [T, G, S'] float32 buffer with S' >= S, contiguous, whose first S slots of every row are written (the caller
    keeps other slots after them, e.g. logits it already has). Returns [T, G, S] float32 (a view of out)."""
    t, g, s = _check_common(q, "q", src, rows)
    _check(q.shape[2] == src.shape[1], f"q has D = {q.shape[2]} but src rows have {src.shape[1]}")
    if out is None:
        out = torch.empty(t, g, s)
    _check(out.dtype == torch.float32 and out.is_contiguous() and out.dim() == 3
           and tuple(out.shape[:2]) == (t, g) and out.shape[2] >= s,
           f"out must be contiguous float32 [{t}, {g}, >= {s}], got {out.dtype} {tuple(out.shape)}")
    rc = _load().pq_gather_logits(q.data_ptr(), src.data_ptr(), _DTYPES[src.dtype], rows.data_ptr(), t, g, s,
                                  src.shape[1], out.data_ptr(), out.shape[2], scale, fill)
    _check(rc == 0, "pq_gather_logits rejected its arguments")
    return out[:, :, :s]


def gather_values(p: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """sum_s p[:, :, s] * row_s. p: [T, G, S] float32 weights; src: [R, Dv] rows; rows: [T, S] int64, negative =
    skipped. out: optional [T, G, Dv] float32 accumulated into (else zeros). Returns out [T, G, Dv] float32."""
    t, g, s = _check_common(p, "p", src, rows)
    _check(p.shape[2] == s, f"p has S = {p.shape[2]} but rows have {s}")
    dv = src.shape[1]
    if out is None:
        out = torch.zeros(t, g, dv)
    _check(out.dtype == torch.float32 and out.is_contiguous() and tuple(out.shape) == (t, g, dv),
           f"out must be contiguous float32 [{t}, {g}, {dv}], got {out.dtype} {tuple(out.shape)}")
    rc = _load().pq_gather_values(p.data_ptr(), src.data_ptr(), _DTYPES[src.dtype], rows.data_ptr(), t, g, s, dv,
                                  out.data_ptr())
    _check(rc == 0, "pq_gather_values rejected its arguments")
    return out


_local = threading.local()


def _scratch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-thread scratch of `pq_select_top` for n scores: two [n] int32 buffers and an [n] zeroed byte flag array
    (the kernel leaves it zeroed), reused across calls."""
    buf = getattr(_local, "select", None)
    if buf is None or buf[0].numel() < n:
        buf = _local.select = (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32),
                               torch.zeros(n, dtype=torch.uint8))
    return buf


def _table() -> torch.Tensor:
    """Per-thread float32 scratch for one row's code table (`pq_select_top_pq`: 256 x 256 entries, so that any
    pair of code bytes indexes inside it), reused across calls."""
    buf = getattr(_local, "table", None)
    if buf is None:
        buf = _local.table = torch.empty(256 * 256)
    return buf


def select_top(rows: int, n: int, kk: int, scores: torch.Tensor | None = None,
               factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kk best of each row's n non-negative scores, ties at the kk-th score to the earliest positions, joined
    with extra positions; the rule of `cpu_select._select_tokens` and `_emit`.

    The scores are either scores [rows, n] float32, or factors = (fa [rows, R, G] float32, fb [rows, G, K] float32,
    codes [rows, n, m] uint8, m = 1 or 2, unit stride in m): the PQ group score of token i is
    sum_g fa[c1, g] * fb[g, c0] (R = 1 and c1 = 0 for m = 1; see `pq_select_top_pq` in pq_cpu.c). extra: optional
    [rows, X] int64 positions (-1 or out of [0, n) = none). 0 < kk <= n. Returns (pos [rows, kk + X] int64: each
    row's selected positions ascending, then -1; thr [rows] float32: each row's kk-th largest score). Raises
    RuntimeError for a NaN or negative score (the ATen path's count of selected tokens then goes wrong too).
    """
    _check(0 < kk <= n, f"need 0 < kk <= n, got kk = {kk}, n = {n}")
    x = 0
    if extra is not None:
        _check(extra.dtype == torch.int64 and extra.dim() == 2 and extra.shape[0] == rows,
               f"extra must be int64 [{rows}, X], got {extra.dtype} {tuple(extra.shape)}")
        extra = extra.contiguous()
        x = extra.shape[1]
    out = torch.empty(rows, kk + x, dtype=torch.int64)
    thr = torch.empty(rows, dtype=torch.float32)
    work, cand, flag = _scratch(n)
    tail = (None if extra is None else extra.data_ptr(), x, out.data_ptr(), thr.data_ptr(), work.data_ptr(),
            cand.data_ptr(), flag.data_ptr())
    if scores is not None:
        _check(scores.dtype == torch.float32 and scores.is_contiguous() and tuple(scores.shape) == (rows, n)
               and scores.device.type == "cpu", f"scores must be contiguous float32 [{rows}, {n}] on CPU, got "
               f"{scores.dtype} {tuple(scores.shape)}")
        rc = _load().pq_select_top(scores.data_ptr(), rows, n, kk, *tail)
    else:
        _check(factors is not None, "select_top needs scores or factors")
        fa, fb, codes = factors
        _check(codes.dtype == torch.uint8 and codes.dim() == 3 and tuple(codes.shape[:2]) == (rows, n)
               and codes.shape[2] in (1, 2) and codes.stride(2) == 1 and codes.device.type == "cpu",
               f"codes must be uint8 [{rows}, {n}, 1 or 2] on CPU with unit stride in m, got {codes.dtype} "
               f"{tuple(codes.shape)}")
        m = codes.shape[2]
        for name, t in (("fa", fa), ("fb", fb)):
            _check(t.dtype == torch.float32 and t.is_contiguous() and t.dim() == 3 and t.shape[0] == rows
                   and t.device.type == "cpu", f"{name} must be contiguous float32 [{rows}, *, G] on CPU, got "
                   f"{t.dtype} {tuple(t.shape)}")
        g, kc = fb.shape[1], fb.shape[2]
        _check(fa.shape[2] == g and (m == 2 or fa.shape[1] == 1) and kc <= 256 and fa.shape[1] <= 256,
               f"fa {tuple(fa.shape)} / fb {tuple(fb.shape)} do not fit m = {m}")
        tab = _table()
        rc = _load().pq_select_top_pq(fa.data_ptr(), fb.data_ptr(), codes.data_ptr(), codes.stride(0),
                                      codes.stride(1), m, g, fa.shape[1], kc, rows, n, kk, *tail, tab.data_ptr())
    if rc == -2:
        raise RuntimeError("pq_topk_cpu got a NaN or negative token score (NaN in the query or the centroids?)")
    _check(rc == 0, "native select_top rejected its arguments (a code beyond the centroids?)")
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
    _check(tuple(log_z.shape) == (t, g) and log_z.dtype == torch.float32,
           f"log_z must be float32 [{t}, {g}], got {log_z.dtype} {tuple(log_z.shape)}")
    _check(tuple(ix.shape) == (t, s) and ix.dtype == torch.int64 and ix.is_contiguous(),
           f"ix must be contiguous int64 [{t}, {s}], got {ix.dtype} {tuple(ix.shape)}")
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
    tables, the code table, the scores and the radix select of `select_top(factors=...)`.

    ex: [rows, m, G, K] float64 (`log_partition.log_z_factors`); e32: [rows, m, G, K] float32, exp(lut - max over
    K) in float32; codes: [rows, n, m] uint8, unit stride in m; 0 < kk <= n; extra: optional [rows, X] int64.
    Returns (pos [rows, kk + X] int64 as `select_top`, z [rows, G] float64), or None when a denominator is <= tiny
    or a threshold < low in float32 (the caller redoes the selection with float64 factors)."""
    rows, m, g, kc = ex.shape
    _check(ex.dtype == torch.float64 and ex.is_contiguous() and m in (1, 2) and kc <= 256 and g <= 256,
           f"ex must be contiguous float64 [rows, m <= 2, G, K <= 256], got {ex.dtype} {tuple(ex.shape)}")
    _check(e32.dtype == torch.float32 and e32.is_contiguous() and e32.shape == ex.shape,
           f"e32 must be contiguous float32 {tuple(ex.shape)}, got {e32.dtype} {tuple(e32.shape)}")
    _check(codes.dtype == torch.uint8 and codes.dim() == 3 and codes.shape[0] == rows and codes.shape[2] == m
           and codes.stride(2) == 1 and codes.device.type == "cpu",
           f"codes must be uint8 [{rows}, n, {m}] on CPU with unit stride in m, got {codes.dtype} {tuple(codes.shape)}")
    n = codes.shape[1]
    _check(0 < kk <= n, f"need 0 < kk <= n, got kk = {kk}, n = {n}")
    x = 0
    if extra is not None:
        _check(extra.dtype == torch.int64 and extra.dim() == 2 and extra.shape[0] == rows,
               f"extra must be int64 [{rows}, X], got {extra.dtype} {tuple(extra.shape)}")
        extra = extra.contiguous()
        x = extra.shape[1]
    out = torch.empty(rows, kk + x, dtype=torch.int64)
    thr = torch.empty(rows, dtype=torch.float32)
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
    """The PQ lookup table (`pq_lut` in pq_cpu.c): [B, Hkv, m, G, K] float32, scaling * (query sub-vector .
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
