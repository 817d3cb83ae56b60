"""Offloaded PQ layer: the KV cache lives in (pinned) host memory; the GPU keeps only what decoding reads often.

GPU-resident, per layer ("res" buffers, [B, Hkv, R, D], R = sink + W + cap + k):
    [0, sink)                 sink tokens
    [sink, sink + W)          ring of the newest W = local + 1 tokens (slot = position % W); the extra slot keeps
                              the token that just left the window until it has its code
    [.., + cap)               block cache: `cap / block` slots of `block` consecutive positions (`BlockCache`)
    [.., + k)                 staging: this step's selected tokens that missed the block cache
plus the PQ codes (uint8) and centroids, which every step reads in full and so stay on the GPU.
Host store: position-major keys/values [max_len, B, Hkv, D] (`_kst`, `_vst`; `keys`/`values` are their
[B, Hkv, max_len, D] views), page-locked on CUDA (`pinned.HostBuffer`: exactly sized, not zero-filled; nothing
reads a position before it is written). New tokens are copied to it on a side stream.

Why position-major: a decode step writes one position of every (sequence, KV head), and a prefill chunk writes
positions [a, b) of all of them. In this layout both are one contiguous range (`store[p]`, `store[a:b]`), so
the device->host copy lands directly in page-locked memory and runs asynchronously. In the head-major layout
[B, Hkv, max_len, D] the same write is B * Hkv strided pieces: torch copies a non-contiguous destination through
a pageable temporary, and a device->pageable copy blocks the host (once per layer and step, side stream or not).
The host gathers stay as cheap: every gathered token is still one contiguous D-element row (256 bytes in bf16
at D = 128, whole cache lines); a missed token is found by (position, row) instead of (row, position), and an
admitted block is `block` such rows at a fixed stride instead of one run, which the hardware prefetcher follows.
The alternative, a contiguous pinned staging row scattered on the host, would add a host pass per layer and
step that must first wait for the copy (a block, or a helper thread), and a staging area as large as a prefill
chunk. A dense step (chunked prefill, short prompt) reads `store[:n]`, which is now one contiguous copy too.
A decode step: select (codes on GPU) -> indices to the host -> block-cache lookup -> gather the misses from the
store into staging -> exact attention over the res buffers through remapped indices -> admit missed blocks.
On a CPU-only machine every buffer is in host memory and the copies are plain copies: the logic is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels

from .blockcache import BlockCache
from .cache import PQLayer
from .pinned import HostBuffer

__all__ = ["OffloadPQLayer", "LayerStats"]


@dataclass
class LayerStats:
    """Counters of one offloaded layer since its prefill."""

    steps: int = 0
    requested: int = 0  # selected top-k tokens (sink and window excluded: they are always resident)
    hits: int = 0  # ... found in the GPU block cache
    misses: int = 0  # ... gathered from the host store (hits + misses == requested)
    staged: int = 0  # token slots copied into staging (misses, padded to the row with the most)
    admitted_blocks: int = 0
    bytes_h2d: int = 0  # host -> GPU: staged slots + admitted blocks
    bytes_d2h: int = 0  # GPU -> host: new tokens written to the store


_D2H_CHUNK = 4096  # tokens per device->host copy of a long write (bounds the transposed device temporary)


def _host_store(shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
                device: torch.device) -> tuple[torch.Tensor, HostBuffer]:
    """An uninitialised host store of `shape` (page-locked, exactly sized, when `pin`) and the buffer owning it."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = HostBuffer(nbytes, pin, device)
    return buf.view(shape, dtype), buf


class OffloadPQLayer(PQLayer):
    """A `PQLayer` whose full K/V (`self.keys` / `self.values`) is a host store. Shapes in the module docstring.

    Eager only (`is_compileable` False): a step brings its indices to the host to gather the misses there, so it
    cannot be one captured graph; compiled generate() calls keep the whole offloaded step eager.
    """

    is_compileable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        b, h = key_states.shape[:2]
        self._n = 0  # tokens written (python int: this layer runs eagerly)
        self.start = torch.zeros(b, dtype=torch.long, device=self.device)
        self.split_n = torch.tensor([self.sink, self.local, self.topk], dtype=torch.long, device=self.device)
        pin = self.device.type == "cuda"
        n = self.max_cache_len
        self._kst, self._host_k = _host_store((n, b, h, key_states.shape[-1]), key_states.dtype, pin, self.device)
        self._vst, self._host_v = _host_store((n, b, h, value_states.shape[-1]), value_states.dtype, pin,
                                              self.device)
        self.keys = self._kst.permute(1, 2, 0, 3)  # [B, Hkv, max_len, D] views, what PQLayer's readers expect
        self.values = self._vst.permute(1, 2, 0, 3)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.stream = torch.cuda.Stream(self.device) if pin else None
        self.event: torch.cuda.Event | None = None
        block = self.cfg.cache_block_tokens
        self.block = block
        self.window = self.local_slots + 1
        # never more block cache than the candidates can fill: a short prompt must not pin a long-context cache
        self.cap = (max(0, min(self.cfg.gpu_cache_tokens, n - self.sink_slots - self.window)) // block) * block
        self.ring0 = self.sink_slots
        self.cache0 = self.ring0 + self.window
        self.stage0 = self.cache0 + self.cap
        r = self.stage0 + self.topk_slots
        self.res_k = torch.zeros(b, h, r, key_states.shape[-1], dtype=key_states.dtype, device=self.device)
        self.res_v = torch.zeros(b, h, r, value_states.shape[-1], dtype=value_states.dtype, device=self.device)
        self.blocks = BlockCache(b * h, math.ceil(n / block), self.cap // block, self.cfg.cache_policy)
        self.stats = LayerStats()
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    def reset(self) -> None:
        self.is_initialized = False  # the store is dropped, not zero-filled: the next update allocates a fresh one
        super().reset()
        self._release_host()

    def _release_host(self) -> None:
        """Drop the store; its pinned memory is unregistered once the last copy into it has finished."""
        for name in ("_kst", "_vst", "_host_k", "_host_v"):
            setattr(self, name, None)
        self.keys = self.values = None

    @property
    def length(self) -> int:
        return self._n if self.is_initialized else 0

    def resize(self, max_cache_len: int, context_len: int) -> None:
        if max_cache_len > self.max_cache_len or context_len != self.context_len:
            raise ValueError(
                "an offloaded PQ cache cannot grow or change its budget; call generate() on the whole conversation "
                "without past_key_values (pqpatch prefills it again)"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest tokens (assisted decoding). The ring is refilled from the host store for the positions
        the shorter window needs, and the block cache is emptied (its blocks may hold positions to be rewritten)."""
        if not self.is_initialized:
            return
        r = abs(int(tokens_to_remove))  # transformers 5.17 passes a 0-d tensor
        self._n -= r
        self.cumulative_length.sub_(r)
        n = self._n
        self._wait_host()
        pos = torch.arange(max(0, n - self.window), n)
        if len(pos):
            slots = (self.ring0 + pos % self.window).to(self.device)
            self.res_k[:, :, slots] = self._kst[pos].to(self.device).permute(1, 2, 0, 3)
            self.res_v[:, :, slots] = self._vst[pos].to(self.device).permute(1, 2, 0, 3)
        b, h = self.res_k.shape[:2]
        self.blocks = BlockCache(b * h, math.ceil(self.max_cache_len / self.block), self.cap // self.block,
                                 self.cfg.cache_policy)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # `update` returns exactly the tokens so far

    def get_seq_length(self) -> int:
        return self.length

    # ---- writes ----------------------------------------------------------------------------------------------
    def _store_rows(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The store's positions [a, b) of every row: [b - a, B, Hkv, D] each, contiguous (module docstring)."""
        return self._kst[a:b], self._vst[a:b]

    def _to_host(self, p0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy new tokens [B, Hkv, T, D] to store positions p0.. (side stream on CUDA). Every destination is a
        contiguous range of the (page-locked) store, so on CUDA the copy never goes through a pageable temporary
        and the host does not wait for it."""
        t = k.shape[-2]
        self.stats.bytes_d2h += (k.numel() + v.numel()) * k.element_size()
        if self.stream is None:
            kd, vd = self._store_rows(p0, p0 + t)
            kd.copy_(k.permute(2, 0, 1, 3))
            vd.copy_(v.permute(2, 0, 1, 3))
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            # position-major on the device first (a no-op for one token, and for a prefill whose projection left
            # it [B, T, Hkv, D] in memory with B = 1); in chunks, so the transposed copy of a long prefill stays small
            for a in range(0, t, _D2H_CHUNK):
                e = min(a + _D2H_CHUNK, t)
                kd, vd = self._store_rows(p0 + a, p0 + e)
                kd.copy_(k[:, :, a:e].permute(2, 0, 1, 3).contiguous(), non_blocking=True)
                vd.copy_(v[:, :, a:e].permute(2, 0, 1, 3).contiguous(), non_blocking=True)
            k.record_stream(self.stream)  # keep the sources alive until the copies are done
            v.record_stream(self.stream)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)
        self._host_k.fence(self.event)  # the store is not unregistered while these copies run
        self._host_v.fence(self.event)

    def _host_ready(self) -> torch.cuda.Event | None:
        return self.event

    def _wait_host(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, Hkv, T, D]; returns the keys/values the attention function needs:
        the whole context for prefill and dense steps, only the new tokens for sparse decode steps."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, p0 = key_states.shape[-2], self.length
        if p0 + t > self.max_cache_len:
            raise ValueError(
                f"the PQ cache holds {self.max_cache_len} tokens and already has {p0}; {t} more do not fit. Let "
                f"generate() build the cache, or call generate() on the whole conversation without past_key_values"
            )
        self._to_host(p0, key_states, value_states)
        pos = torch.arange(max(p0, p0 + t - self.window), p0 + t, device=self.device)
        slots = self.ring0 + pos % self.window
        self.res_k[:, :, slots] = key_states[:, :, pos - p0]
        self.res_v[:, :, slots] = value_states[:, :, pos - p0]
        self.cumulative_length.add_(t)
        self._n += t
        if self.prefill_len:
            self._fill_sink(p0, key_states, value_states)
        if p0 == 0:
            self._pending = (key_states, value_states)  # after_prefill copies the sink tokens from these
            return key_states, value_states
        if self.active and t == 1:
            return key_states, value_states  # the sparse decode reads the res buffers instead
        if self.active:
            self._code_range(p0 - self.local, p0 + t - self.local)  # tokens this step pushed out of the window
        self._wait_host()  # dense step (short prompt, chunked prefill): the whole context, from the store
        old_k, old_v = (x.to(self.device).permute(1, 2, 0, 3) for x in self._store_rows(0, p0))  # contiguous reads
        full_k = torch.cat([old_k, key_states], dim=2)
        full_v = torch.cat([old_v, value_states], dim=2)
        return full_k, full_v

    def after_prefill(self, attention_mask: torch.Tensor | None, batch: int) -> None:
        first = not self.prefill_len
        super().after_prefill(attention_mask, batch)
        if first and self._pending is not None:
            self._starts = self.start.tolist()
            self._fill_sink(0, *self._pending)
            self._pending = None

    def _fill_sink(self, p0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy the sink positions among new tokens [B, Hkv, T, D] (written at p0..) into the sink slots. A short
        left-padded row reaches its last sink positions only while decoding, so this runs on every update."""
        t = k.shape[2]
        for b, s0 in enumerate(self._starts):
            a, e = max(p0, s0), min(p0 + t, s0 + self.sink)
            if a < e:
                self.res_k[b, :, a - s0 : e - s0] = k[b, :, a - p0 : e - p0]
                self.res_v[b, :, a - s0 : e - s0] = v[b, :, a - p0 : e - p0]

    def _keys_at(self, pos: torch.Tensor) -> torch.Tensor:
        return self.res_k.index_select(2, self.ring0 + pos % self.window)  # the token just left the window

    def _key_range(self, a: int, b: int) -> torch.Tensor:
        if a >= self.length - self.window:  # still in the ring
            slots = self.ring0 + torch.arange(a, b, device=self.device) % self.window
            return self.res_k[:, :, slots]
        self._wait_host()
        return self._store_rows(a, b)[0].to(self.device).permute(1, 2, 0, 3)

    # ---- decode ----------------------------------------------------------------------------------------------
    def decode(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query: [B, H, 1, D] -> [B, 1, H, Dv]. Same selection as `PQLayer.decode`, K/V from the res buffers."""
        b, hq, _, d = query.shape
        hkv = self.res_k.shape[1]
        q = query.reshape(b, hkv, hq // hkv, d)
        idx = self.token_index(q, scaling)  # [B, Hkv, sink + k + local] absolute positions
        s, k = self.sink_slots, self.topk_slots
        r_sink = torch.where(idx[..., :s] >= 0, torch.arange(s, device=idx.device), -1)
        loc = idx[..., s + k :]
        r_loc = torch.where(loc >= 0, self.ring0 + loc % self.window, -1)
        r_top, blk = self._fetch(idx[..., s : s + k]) if k else (idx[..., s:s], None)
        ridx = torch.cat([r_sink, r_top.to(idx.device), r_loc], dim=-1)
        for obs in self.observers:
            obs(self, q, idx, scaling)
        out, _ = kernels.sparse_decode_attention(q, self.res_k, self.res_v, ridx, scaling, backend=self.cfg.backend)
        if blk is not None:
            self._admit(blk)  # after the attention: an admitted block may replace one it just read
        self.stats.steps += 1
        return out.reshape(b, hq, -1)[:, None]

    def _fetch(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make the selected tokens top [B, Hkv, k] resident. Returns their res slots [B, Hkv, k] and their
        block ids [B * Hkv, k] (-1 = empty slot), both on the CPU."""
        b, h, k = top.shape
        rows = top.cpu().reshape(b * h, k)  # the one device->host sync of a step: the gather runs on the host
        blk = torch.where(rows >= 0, rows // self.block, -1)
        slot = self.blocks.lookup(blk)
        hit = slot >= 0
        miss = (rows >= 0) & ~hit
        r = torch.where(hit, self.cache0 + slot * self.block + rows % self.block, -1)
        r = torch.where(miss, self.stage0 + miss.cumsum(-1) - 1, r)
        nm = int(miss.sum(-1).max())
        elt = self.keys.element_size() * (self.keys.shape[-1] + self.values.shape[-1])
        if nm:
            order = torch.argsort((~miss).to(torch.int8), dim=-1, stable=True)[:, :nm]  # misses first, in order
            pos = torch.gather(rows.clamp_min(0), 1, order)  # [rows, nm]
            self._wait_host()
            ar = torch.arange(b * h)[:, None]
            n = self.max_cache_len
            kst = self._kst.view(n, b * h, -1)[pos, ar]  # [rows, nm, D] host gather of D-element rows
            vst = self._vst.view(n, b * h, -1)[pos, ar]
            if self.device.type == "cuda":
                kst, vst = kst.pin_memory(), vst.pin_memory()
            # straight from pinned memory into the staging slots: one host->device copy each, no temporary
            self.res_k[:, :, self.stage0 : self.stage0 + nm].copy_(kst.view(b, h, nm, -1), non_blocking=True)
            self.res_v[:, :, self.stage0 : self.stage0 + nm].copy_(vst.view(b, h, nm, -1), non_blocking=True)
        st = self.stats
        st.requested += int((rows >= 0).sum())
        st.hits += int(hit.sum())
        st.misses += int(miss.sum())
        st.staged += b * h * nm  # the copy moves nm slots of every row (the largest miss count)
        st.bytes_h2d += b * h * nm * elt
        return r.view(b, h, k), blk

    def _admit(self, blk: torch.Tensor) -> None:
        """Count this step's blocks and copy newly admitted ones into their slots (complete blocks only: a block
        that still grows would go stale in the cache). Runs after the step's attention in stream order."""
        complete = (self.length - self.local) // self.block
        blk = torch.where(blk < complete, blk, -1)
        copies = self.blocks.admit(blk)
        if not copies:
            return
        b, h = self.res_k.shape[:2]
        elt = self.keys.element_size() * (self.keys.shape[-1] + self.values.shape[-1])
        rows, blocks, slots = (torch.tensor(c) for c in zip(*copies))
        ar = torch.arange(self.block)
        src = (blocks[:, None] * self.block + ar).clamp_max(self.max_cache_len - 1)  # [n, block]
        dst = (self.cache0 + slots[:, None] * self.block + ar).to(self.device)
        kf = self._kst.view(self.max_cache_len, b * h, -1)  # position-major: a block is `block` strided rows
        vf = self._vst.view(self.max_cache_len, b * h, -1)
        rk = self.res_k.view(b * h, *self.res_k.shape[2:])
        rv = self.res_v.view(b * h, *self.res_v.shape[2:])
        rows_d = rows.to(self.device)[:, None]
        rk[rows_d, dst] = kf[src, rows[:, None]].to(self.device, non_blocking=True)
        rv[rows_d, dst] = vf[src, rows[:, None]].to(self.device, non_blocking=True)
        self.stats.admitted_blocks += len(copies)
        self.stats.bytes_h2d += len(copies) * self.block * elt

    def gpu_kv_bytes(self) -> int:
        """Bytes this layer keeps on the compute device: res buffers, codes and centroids."""
        n = self.res_k.numel() * self.res_k.element_size() + self.res_v.numel() * self.res_v.element_size()
        for t in (self.codes, self.centroids):
            if t is not None:
                n += t.numel() * t.element_size()
        return n
