"""Page-locked host memory of exactly the size asked for: `cudaHostRegister` on plain host memory.

Why not `torch.empty/zeros(..., pin_memory=True)`: that goes through torch's caching host allocator, which rounds
every block up to a power of two (a 128K+64-token store pins 2x its size) and keeps freed blocks cached; `zeros`
also fills the whole store on the main thread. Here the memory is a plain `torch.empty` host buffer, cut to whole
pages it owns alone (so no other allocation shares a registered page) and registered with
`torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)`: flag 0 is cudaHostRegisterDefault, which on a system with
unified addressing (every 64-bit CUDA platform) is mapped and portable, i.e. pinned for every device's context.
The binding (torch/csrc/cuda/shared/cudart.cpp) returns the `cudaError_t` as `cudart.cudaError` (only `success`,
0, is named) and does not clear CUDA's per-thread last error on failure; torch's next kernel-launch check would
raise it, so a failed call is followed by a launch whose check consumes it (`_clear_last_error`).

If registration fails (not enough lockable memory, an unsupported platform), the buffer falls back to
`torch.empty(..., pin_memory=True)` with a logged warning: still pinned, only rounded by the caching allocator.

`HostBuffer` owns one such buffer; it is unregistered when the owner goes (a finalizer), after the last copy
registered with `fence` has finished, and before the memory can be freed (the finalizer holds the memory until it
has unregistered it). `StagingBuffers` hands out reusable buffers, each leased to one user at a time.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref

import torch

__all__ = ["HostBuffer", "StagingBuffers", "page_size"]

log = logging.getLogger("pqpatch")


def page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return 4096


def _clear_last_error(device: torch.device | None) -> None:
    """Consume CUDA's per-thread last error left by a failed cudart call: torch checks (and so resets) it after
    every kernel launch, and would otherwise report the failed registration at some unrelated later launch."""
    try:
        torch.empty(1, device=device if device is not None else "cuda").fill_(1)
    except RuntimeError:
        pass


def _register(ptr: int, nbytes: int, device: torch.device | None) -> str | None:
    """Page-lock [ptr, ptr + nbytes). Returns None on success, else the CUDA error text."""
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(ptr, nbytes, 0)
    except Exception as e:  # no CUDA runtime binding at all
        return f"{type(e).__name__}: {e}"
    if int(err) == 0:
        return None
    try:
        text = cudart.cudaGetErrorString(err)
    except Exception:
        text = "unknown"
    _clear_last_error(device)
    return f"cudaError {int(err)} ({text})"


def _unregister(ptr: int, memory: torch.Tensor, fence: list, device: torch.device | None) -> None:
    """Finalizer of a registered `HostBuffer`: wait for its last copy, unregister, then let the memory go (`memory`
    is referenced here only so it cannot be freed while still registered)."""
    try:
        if fence[0] is not None:
            fence[0].synchronize()
        err = torch.cuda.cudart().cudaHostUnregister(ptr)
        if int(err) != 0:
            log.warning("pqpatch: cudaHostUnregister failed with cudaError %d", int(err))
            _clear_last_error(device)
    except Exception as e:  # never raise from a finalizer
        log.warning("pqpatch: unregistering pinned host memory failed: %s", e)
    del memory


class HostBuffer:
    """`nbytes` of host memory (`data`: uint8), page-locked when `pin` (`registered`: by cudaHostRegister,
    exactly the pages it spans; else, after a failed registration, through `pin_memory=True`).

    Not zero-filled: callers read only what they wrote. `view(shape, dtype)` gives a typed tensor over the first
    bytes. A copy of this object (copy.deepcopy) is plain, unpinned host memory with the same contents.
    """

    def __init__(self, nbytes: int, pin: bool, device: torch.device | None = None) -> None:
        self.nbytes = nbytes
        self.registered = False
        self.pinned = False
        self._fence: list = [None]  # the last event after which no copy into or out of the memory is in flight
        if not pin:
            self.data = torch.empty(nbytes, dtype=torch.uint8)
            return
        page = page_size()
        span = max(1, -(-nbytes // page)) * page  # whole pages: nothing else lives on a registered page
        raw = torch.empty(span + page, dtype=torch.uint8)
        off = (-raw.data_ptr()) % page
        region = raw[off : off + span]
        err = _register(region.data_ptr(), span, device)
        if err is None:
            self.data = region[:nbytes]
            self.registered = self.pinned = True
            self._finalizer = weakref.finalize(self, _unregister, region.data_ptr(), raw, self._fence, device)
            self._finalizer.atexit = False  # at exit the process's memory goes anyway; CUDA may be torn down
            return
        del region, raw
        log.warning("pqpatch: cudaHostRegister of %d bytes failed (%s); falling back to pin_memory=True (rounded "
                    "up to a power of two by torch's caching host allocator)", span, err)
        self.data = _pinned_fallback(nbytes)
        self.pinned = True

    def view(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The first prod(shape) * itemsize bytes as a contiguous tensor of `dtype`."""
        n = 1
        for s in shape:
            n *= s
        nb = n * torch.empty((), dtype=dtype).element_size()
        if nb > self.nbytes:
            raise ValueError(f"a {tuple(shape)} {dtype} view needs {nb} bytes; this buffer has {self.nbytes}")
        return self.data[:nb].view(dtype).view(shape)

    def fence(self, event) -> None:
        """Record the event of the newest copy into or out of this memory (waited for before unregistering)."""
        self._fence[0] = event

    def wait(self) -> None:
        """Wait for the fenced copy (before handing the memory to a new user)."""
        ev, self._fence[0] = self._fence[0], None
        if ev is not None:
            ev.synchronize()

    def release(self) -> None:
        """Unregister now (after the fenced copy) instead of when the object goes."""
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        if self.registered:
            self.registered = self.pinned = False

    def __deepcopy__(self, memo) -> "HostBuffer":
        import copy

        new = HostBuffer.__new__(HostBuffer)
        new.nbytes, new.registered, new.pinned, new._fence = self.nbytes, False, False, [None]
        self.wait()
        new.data = copy.deepcopy(self.data, memo)  # through the memo: views of this buffer stay views of the copy
        return new

    def __reduce__(self):
        return (_unpinned_copy, (self.data.clone(),))


def _unpinned_copy(data: torch.Tensor) -> HostBuffer:
    new = HostBuffer.__new__(HostBuffer)
    new.nbytes, new.registered, new.pinned, new._fence, new.data = data.numel(), False, False, [None], data
    return new


def _pinned_fallback(nbytes: int) -> torch.Tensor:
    """pin_memory=True host memory (the caching host allocator): used when registration fails."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class StagingBuffers:
    """Reusable page-locked buffers for device->host snapshots (the clustering pool's copies of prefill keys).

    A buffer is leased to one user at a time (`take` ... `give`), so concurrent jobs never share memory; a given-
    back buffer is reused by the next `take` that fits in it (the smallest such), and a `take` that fits in none
    allocates an exactly sized one, dropping the largest free one that was too small (the count stays at the
    peak number of leases at once: a prefill's layers). Thread-safe (jobs give back from pool threads).
    """

    def __init__(self) -> None:
        self._free: list[HostBuffer] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int, device: torch.device | None = None) -> HostBuffer:
        drop = None
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            buf = min(fits, key=lambda b: b.nbytes) if fits else None
            if buf is not None:
                self._free.remove(buf)
            elif self._free:  # grow: replace the largest free buffer, too small for this lease
                drop = max(self._free, key=lambda b: b.nbytes)
                self._free.remove(drop)
        if buf is None:
            if drop is not None:
                drop.release()
            return HostBuffer(nbytes, pin=True, device=device)
        buf.wait()  # a copy into it from its previous lease may still run (a job cancelled before it started)
        return buf

    def give(self, buf: HostBuffer) -> None:
        with self._lock:
            self._free.append(buf)

    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.nbytes for b in self._free)

    def clear(self) -> None:
        """Unregister and drop every free buffer (leased ones go when given back to a cleared pool's owner)."""
        with self._lock:
            free, self._free = self._free, []
        for b in free:
            b.release()
