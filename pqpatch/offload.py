"""Offloaded PQ layer: the KV cache lives in (pinned) host memory; the GPU keeps only what decoding reads often.

GPU-resident, per layer ("res" buffers, [B, Hkv, R, D], R = sink + W + cap + k):
    [0, sink)                 sink tokens
    [sink, sink + W)          ring of the newest W = local + 1 tokens (slot = position % W); the extra slot keeps
                              the token that just left the window until it has its code
    [.., + cap)               block cache: `cap / block` slots of `block` consecutive positions (`BlockCache`)
    [.., + k)                 staging: this step's selected tokens that missed the block cache
plus the PQ codes (uint8) and centroids, which every step reads in full and so stay on the GPU.
Host store: keys/values [B, Hkv, max_len, D], pinned on CUDA; new tokens are copied to it on a side stream.
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
        self.keys = torch.zeros(b, h, n, key_states.shape[-1], dtype=key_states.dtype, pin_memory=pin)
        self.values = torch.zeros(b, h, n, value_states.shape[-1], dtype=value_states.dtype, pin_memory=pin)
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
        super().reset()
        self.is_initialized = False  # the next update allocates fresh store, res buffers and block cache

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
            self.res_k[:, :, slots] = self.keys[:, :, pos].to(self.device)
            self.res_v[:, :, slots] = self.values[:, :, pos].to(self.device)
        b, h = self.res_k.shape[:2]
        self.blocks = BlockCache(b * h, math.ceil(self.max_cache_len / self.block), self.cap // self.block,
                                 self.cfg.cache_policy)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # `update` returns exactly the tokens so far

    def get_seq_length(self) -> int:
        return self.length

    # ---- writes ----------------------------------------------------------------------------------------------
    def _to_host(self, p0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy new tokens [B, Hkv, T, D] to store positions p0.. (side stream on CUDA)."""
        t = k.shape[-2]
        self.stats.bytes_d2h += (k.numel() + v.numel()) * k.element_size()
        if self.stream is None:
            self.keys[:, :, p0 : p0 + t].copy_(k)
            self.values[:, :, p0 : p0 + t].copy_(v)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.keys[:, :, p0 : p0 + t].copy_(k, non_blocking=True)
            self.values[:, :, p0 : p0 + t].copy_(v, non_blocking=True)
            k.record_stream(self.stream)  # keep the source alive until the copy is done
            v.record_stream(self.stream)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)

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
        full_k = torch.cat([self.keys[:, :, :p0].to(self.device), key_states], dim=2)
        full_v = torch.cat([self.values[:, :, :p0].to(self.device), value_states], dim=2)
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
        return self.keys[:, :, a:b].to(self.device)

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
            kst = self.keys.view(b * h, *self.keys.shape[2:])[ar, pos]  # [rows, nm, D] host gather
            vst = self.values.view(b * h, *self.values.shape[2:])[ar, pos]
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
        kf = self.keys.view(b * h, *self.keys.shape[2:])
        vf = self.values.view(b * h, *self.values.shape[2:])
        rk = self.res_k.view(b * h, *self.res_k.shape[2:])
        rv = self.res_v.view(b * h, *self.res_v.shape[2:])
        rows_d = rows.to(self.device)[:, None]
        rk[rows_d, dst] = kf[rows[:, None], src].to(self.device, non_blocking=True)
        rv[rows_d, dst] = vf[rows[:, None], src].to(self.device, non_blocking=True)
        self.stats.admitted_blocks += len(copies)
        self.stats.bytes_h2d += len(copies) * self.block * elt

    def gpu_kv_bytes(self) -> int:
        """Bytes this layer keeps on the compute device: res buffers, codes and centroids."""
        n = self.res_k.numel() * self.res_k.element_size() + self.res_v.numel() * self.res_v.element_size()
        for t in (self.codes, self.centroids):
            if t is not None:
                n += t.numel() * t.element_size()
        return n
