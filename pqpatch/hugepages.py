"""Zero-filled CPU tensors backed by transparent huge pages, for the K/V buffers of resident CPU caches.

Why: a sparse decode step reads a few thousand scattered 256-512 byte rows per KV head out of a buffer of hundreds
of MB. With 4 KiB pages nearly every row costs a TLB miss (in a virtual machine, a two-level page walk); 2 MiB pages
cover the buffer with ~100 TLB entries. On the 2-core CI machine (AMD EPYC VM, THP "madvise") the gather of 1/5 of
a 32K x 8 x 128 float32 cache by `index_select` takes 3.8-4.0 ms instead of 4.8-4.9 ms, and a contiguous read of
the same bytes 0.85 ms instead of 1.2-1.5 ms (`python benchmarks/bench_hugepages.py`, two runs).

How: an anonymous `mmap` (zero-filled by the kernel, untouched until written), 2 MiB-aligned inside an over-sized
mapping, `madvise(MADV_HUGEPAGE)` before the first touch, wrapped with `torch.frombuffer` (which keeps the mapping
alive as long as any view of it). Where that is not possible (not Linux, THP "never", a Python without
`mmap.MADV_HUGEPAGE`, a buffer under 2 MiB) the buffer is a plain `torch.zeros`; `hugepages_available()` says which.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys
from pathlib import Path

import torch

__all__ = ["HUGE_PAGE", "hugepages_available", "zeros"]

log = logging.getLogger("pqpatch")

HUGE_PAGE = 2 << 20
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_state: bool | None = None


def hugepages_available() -> bool:
    """Whether `zeros` can ask for transparent huge pages here (Linux, THP "always" or "madvise")."""
    global _state
    if _state is None:
        ok = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
        if ok:
            try:
                ok = "[never]" not in _THP.read_text()
            except OSError:
                ok = False
        _state = ok
        if not ok:
            log.info("pqpatch: transparent huge pages are not available; CPU caches use ordinary pages")
    return _state


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled contiguous CPU tensor of `shape`, on huge pages where `hugepages_available()` (else torch.zeros).

    The tensor's storage is not resizable (it is a view of the mapping); everything else behaves as torch.zeros.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not hugepages_available():
        return torch.zeros(shape, dtype=dtype)
    size = nbytes + HUGE_PAGE  # room to start on a 2 MiB boundary
    try:
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to the mapping
        skip = -raw.data_ptr() % HUGE_PAGE
        # advise before the first write, so the kernel backs the range with huge pages as it faults it in
        mm.madvise(mmap.MADV_HUGEPAGE, skip, (size - skip) // mmap.PAGESIZE * mmap.PAGESIZE)
    except (OSError, ValueError) as err:  # e.g. a sandbox that forbids the advice: ordinary pages, logged
        log.info("pqpatch: huge-page allocation failed (%s); using ordinary pages", err)
        return torch.zeros(shape, dtype=dtype)
    return raw[skip:skip + nbytes].view(dtype).view(shape)
