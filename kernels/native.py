"""Loader of the native CPU kernels (`kernels/csrc/`: `pq_logits.c` / `pq_values.c` the row loops of sparse attention
and re-ranking and the lookup table, `pq_select.c` the radix top-k, `pq_codes.c` the scores through the codes, and
their headers), compiled on first use with the system C compiler into one shared object and called through ctypes;
and the row-loop launchers, which check shapes, dtypes and devices before handing over pointers (the selection
launchers: `native_select.py`, re-exported here).

Why ctypes and plain C: the kernels are a few loops over row and code lists (the sources say why they beat ATen);
plain C compiles in ~2 s with `cc` (compile and load into a fresh cache on the 2-core CI VM) and needs neither
torch headers nor a build step at install time. The shared object is cached under `$PQPATCH_CACHE_DIR` (default
`~/.cache/pqpatch`), keyed by the source's hash, the compiler and the machine, and written atomically (safe with
several processes). ctypes releases the GIL during a call, so the k-means pool keeps running beside a decode step.

Fallback: without a working compiler (or with `PQPATCH_NATIVE=0`) `available()` is False, the reason is logged once
and kept in `unavailable_reason`, and the CPU backend runs its ATen path (the same rule, slower; float sums in
another order, so a near-tie may fall the other way).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = ["available", "disabled", "unavailable_reason", "code_z", "gather_logits", "gather_values", "has_avx512",
           "lut", "rerank_pick", "select_top", "supports", "topk_pq"]

_log = logging.getLogger("pqpatch")
_CSRC = Path(__file__).resolve().parent / "csrc"
# compiled together into one shared object; the headers (pq_common.h, pq_rows.h, pq_simd.h) are theirs
_SRCS = ("pq_logits.c", "pq_values.c", "pq_select.c", "pq_codes.c")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_DIM = 1024  # MAX_DIM of pq_common.h: the widest row a kernel takes
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


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{' '.join(cmd)}: {e}"
    return None if res.returncode == 0 else f"{' '.join(cmd)} failed: {res.stderr.strip()[-400:]}"


def _compile(cc: str, out: Path, march: bool) -> str | None:
    """Compile the sources into `out` (atomically); returns None, or the compiler's complaint. The sources compile
    to objects in parallel (one process each: ~1.2 s for the slowest on the CI VM, ~2 s in all on its two cores),
    then one link."""
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = [*_FLAGS, *(["-march=native"] if march else []), "-I", str(_CSRC)]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs = [os.path.join(tmp, f + ".o") for f in _SRCS]
        with ThreadPoolExecutor(max_workers=min(len(_SRCS), os.cpu_count() or 1)) as ex:
            errs = list(ex.map(_run, [[cc, *flags, "-c", str(_CSRC / f), "-o", o] for f, o in zip(_SRCS, objs)]))
        err = next((e for e in errs if e is not None), None)
        if err is None:
            so = os.path.join(tmp, "lib.so")
            err = _run([cc, *flags, *objs, "-o", so])
            if err is None:
                os.replace(so, out)
    return err


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
            _log.warning("%s; the CPU backend runs its ATen path (the same rule, slower)", unavailable_reason)
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
    src = b"".join(p.read_bytes() for p in (*(_CSRC / f for f in _SRCS), *sorted(_CSRC.glob("*.h"))))
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
    """Whether the loaded build runs the selection loops with AVX-512 (16 tokens per instruction; `pq_select.c`,
    `pq_codes.c`)."""
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
    _check(out.dtype == torch.float32 and out.is_contiguous() and out.dim() == 3 and out.device.type == "cpu"
           and tuple(out.shape[:2]) == (t, g) and out.shape[2] >= s,
           f"out must be contiguous float32 [{t}, {g}, >= {s}] on CPU, got {out.dtype} {tuple(out.shape)}")
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
    _check(out.dtype == torch.float32 and out.is_contiguous() and tuple(out.shape) == (t, g, dv)
           and out.device.type == "cpu",
           f"out must be contiguous float32 [{t}, {g}, {dv}] on CPU, got {out.dtype} {tuple(out.shape)}")
    rc = _load().pq_gather_values(p.data_ptr(), src.data_ptr(), _DTYPES[src.dtype], rows.data_ptr(), t, g, s, dv,
                                  out.data_ptr())
    _check(rc == 0, "pq_gather_values rejected its arguments")
    return out


# the selection launchers (they use `_load`, `_check` above)
from .native_select import code_z, lut, rerank_pick, select_top, topk_pq  # noqa: E402
