"""The PQ cache: a transformers `StaticCache` whose global-attention layers also keep PQ codes.

Buffers are preallocated to the context the cache is built for (prompt + max_new_tokens), so the sparse decode
step reads tensors of the same shapes every step (`update` hands exact attention only the filled prefix).
Per PQ layer and sequence b, positions split as

    [0, start_b)            left padding: never attended
    [start_b, start_b+sink) sink tokens: always attended
    [lo_b, hi)              candidates: have PQ codes, top-k of them are attended     lo_b = start_b + sink
    [hi, length)            local window (the newest `local` tokens, the current one included)  hi = length - local

A token that leaves the local window gets its code from the nearest centroid (`_ensure_codes`).
"""

from __future__ import annotations

import copy
from concurrent.futures import Future

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from . import kernels

from .clustering import ClusterPool
from .config import PQCacheConfig
from .selection import QuestPages, select

__all__ = ["PQLayer", "PQCache"]


class PQLayer(StaticLayer):
    """One global-attention layer: static K/V buffers plus PQ state. Shapes in the module docstring."""

    is_compileable = False  # python-side bookkeeping (futures, counters): keep generate() from auto-compiling

    def __init__(self, max_cache_len: int, layer_idx: int, config: PQCacheConfig, pool: ClusterPool) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.layer_idx = layer_idx
        self.pool = pool
        self._configure(config)
        self.length = 0  # tokens written (python int: shapes depend on it, values do not)
        self.start: torch.Tensor | None = None  # [B] first non-padding position
        self.steps = 0  # sparse decode steps run
        self.record = False  # keep the last decode step's token index in `last_index` (evaluation)
        self.last_index: torch.Tensor | None = None
        self._clear()

    def _configure(self, config: PQCacheConfig) -> None:
        self.cfg = config
        self.sink, self.local, self.topk = config.budget_split(self.max_cache_len)
        if config.selection == "streaming":  # equal budget: what top-k would get goes to the window
            self.local, self.topk = self.local + self.topk, 0

    def _clear(self) -> None:
        """Drop the PQ state (not the K/V buffers)."""
        self.active = False  # sparse decoding on (prompt >= min_context)
        self.future: Future | None = None
        self.centroids: torch.Tensor | None = None  # [B, Hkv, m, K, Ds] float32
        self.codes: torch.Tensor | None = None  # [B, Hkv, max_len, m] uint8
        self.coded_upto = 0  # positions [lo, coded_upto) have codes
        self.pages: QuestPages | None = None

    def reset(self) -> None:
        super().reset()
        self.length, self.start = 0, None
        self._clear()

    def fork(self, config: PQCacheConfig | None) -> "PQLayer":
        """A copy with its own K/V buffers whose decode follows `config` (None: dense). The PQ state is
        rebuilt from the copied keys, as if the prefill had run under `config`."""
        pool, fut = self.pool, self.future
        self.pool = self.future = None  # neither can be deep-copied
        try:
            new = copy.deepcopy(self)
        finally:
            self.pool, self.future = pool, fut
        new.pool = pool
        new._configure(config or self.cfg)
        new._clear()
        if config is not None and self.start is not None:
            new.active = new.length >= config.min_context
            new._start_pq()
        return new

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # `update` returns only the filled prefix: a causal prefill without padding then needs no mask at all
        # (SDPA's is_causal path), instead of a [q, max_len] boolean mask (17 GB for a 128K prompt)
        return self.length + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, Hkv, T, D] new keys/values into the static buffers; returns views of the filled prefix
        [B, Hkv, length, D] (what exact attention needs; the sparse decode reads the buffers themselves)."""
        if self.length + key_states.shape[-2] > self.max_cache_len:
            raise ValueError(
                f"the PQ cache was built for {self.max_cache_len} tokens and is full; build it with a larger "
                f"max_cache_len (generate() does this from max_new_tokens)"
            )
        super().update(key_states, value_states, *args, **kwargs)
        self.length += key_states.shape[-2]
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    # ---- prefill -------------------------------------------------------------------------------------------
    def after_prefill(self, attention_mask: torch.Tensor | None, batch: int) -> None:
        """Called once the layer's exact attention over a multi-token input is done.

        attention_mask: the 4D mask given to the attention function ([B, 1, q, length], bool or additive),
        or None (no padding). On the first prefill, records padding and hands the keys to the clustering pool.
        """
        if self.start is not None:
            return  # a later multi-token step (chunked prefill): its tokens get codes as they leave the window
        self.start = _first_valid(attention_mask, self.length, batch, self.device)
        self.active = self.length >= self.cfg.min_context
        self._start_pq()

    def _start_pq(self) -> None:
        """Hand the candidate keys to the clustering pool ("pq") or build page bounds ("quest")."""
        if not self.active:
            return
        hi = self.length - self.local
        self.coded_upto = max(hi, 0)
        if self.cfg.selection == "pq":
            lo = (self.start + self.sink).tolist()
            c = self.cfg
            self.future = self.pool.submit(
                self.keys, lo, hi, c.num_subspaces, c.bits, c.kmeans_iters, c.seed, ready=self._host_ready()
            )
        elif self.cfg.selection == "quest":
            self.pages = QuestPages(self.keys, self.cfg.quest_page_tokens)

    def _host_ready(self) -> torch.cuda.Event | None:
        """Event after which `self.keys` may be read on the host (offloaded layers); None here."""
        return None

    def _ensure_codes(self, hi: int) -> None:
        """Wait for this layer's codebook (first decode step only) and code tokens that left the window."""
        if self.future is not None:
            book = self.future.result()
            self.future = None
            dev = self.device
            b, h = self.keys.shape[:2]
            self.centroids = book.centroids.to(dev)
            self.codes = torch.zeros(b, h, self.max_cache_len, self.cfg.num_subspaces, dtype=torch.uint8, device=dev)
            for i, q in enumerate(book.codes):
                lo = int(self.start[i]) + self.sink
                self.codes[i, :, lo : lo + q.shape[1]] = q.to(dev)
        if hi > self.coded_upto:
            new = self._key_range(self.coded_upto, hi)
            self.codes[:, :, self.coded_upto : hi] = kernels.pq_assign(new, self.centroids, backend=self.cfg.backend)
            self.coded_upto = hi

    def _key_range(self, a: int, b: int) -> torch.Tensor:
        """Keys of positions [a, b) on the compute device: [B, Hkv, b - a, D]."""
        return self.keys[:, :, a:b]

    # ---- decode ---------------------------------------------------------------------------------------------
    def token_index(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Positions attended by a decode query: idx [B, Hkv, sink + k + local] int64, -1 = empty slot.

        query: [B, Hkv, G, D]. Sink, top-k and window ranges are disjoint, so no position appears twice.
        """
        n = self.length
        hi = n - self.local
        dev = query.device
        lo = self.start + self.sink  # [B]
        hi_t = torch.full_like(lo, max(hi, 0))
        if self.cfg.selection == "pq":
            self._ensure_codes(hi)
        elif self.pages is not None:
            self.pages.update(self.keys, self.start, max(hi, 0))
        top = select(
            self.cfg.selection, query, lo, hi_t, self.topk, scaling, keys=self.keys, centroids=self.centroids,
            codes=self.codes, pages=self.pages, backend=self.cfg.backend,
        )  # [B, Hkv, k]
        sink = self.start[:, None] + torch.arange(self.sink, device=dev)  # [B, sink]
        sink = torch.where(sink < min(hi, n), sink, -1)
        local = torch.arange(n - self.local, n, device=dev)[None, :]  # [1, local]
        local = torch.where(local >= self.start[:, None], local, -1)  # [B, local]
        bh = top.shape[:2]
        return torch.cat([sink[:, None].expand(*bh, -1), top, local[:, None].expand(*bh, -1)], dim=-1)

    def decode(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step's attention. query: [B, H, 1, D] -> output [B, 1, H, Dv] (the HF layout)."""
        b, hq, _, d = query.shape
        hkv = self.keys.shape[1]
        q = query.reshape(b, hkv, hq // hkv, d)  # query head j uses KV head j // G (repeat_kv's layout)
        idx = self.token_index(q, scaling)
        if self.record:
            self.last_index = idx
        self.steps += 1
        out, _ = kernels.sparse_decode_attention(q, self.keys, self.values, idx, scaling, backend=self.cfg.backend)
        return out.reshape(b, hq, -1)[:, None]


def _first_valid(mask: torch.Tensor | None, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """First attended position of every sequence, from the 4D mask's last query row. Returns [B] int64.

    Only left padding is supported: every position from the first real token on must be attended.
    """
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    row = mask[:, 0, -1, :length]  # [B or 1, length]
    ok = row if row.dtype == torch.bool else row == 0
    ok = ok.expand(batch, -1)
    start = ok.int().argmax(dim=-1)
    pos = torch.arange(length, device=ok.device)
    if not bool(((pos[None, :] >= start[:, None]) == ok).all()):
        raise ValueError(
            "pqpatch supports left padding only (every token after the first real one must be attended); "
            "set tokenizer.padding_side = 'left'"
        )
    return start.to(device=device, dtype=torch.long)


class PQCache(StaticCache):
    """StaticCache for `model`'s config whose full-attention layers are `PQLayer`s (sliding layers stay dense).

    Built by the patched `generate()`; build one yourself for a manual forward loop:
    `PQCache(model, max_cache_len=prompt_len + new_tokens)`.
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int) -> None:
        state = getattr(model, "_pqpatch", None)
        if state is None:
            raise ValueError("PQCache needs a patched model: call pqpatch.patch_model(model, config) first")
        text_config = model.config.get_text_config(decoder=True)
        super().__init__(config=text_config, max_cache_len=max_cache_len)
        if state.config.offload:
            from .offload import OffloadPQLayer as layer_cls
        else:
            layer_cls = PQLayer
        for i in state.pq_layers:
            self.layers[i] = layer_cls(max_cache_len, i, state.config, state.pool)
        self.pq_config = state.config

    def pq_layers(self) -> list[PQLayer]:
        return [layer for layer in self.layers if isinstance(layer, PQLayer)]

    def fork(self, config: PQCacheConfig | None) -> "PQCache":
        """An independent copy of this (prefilled) cache whose decode steps follow `config` (None: dense).

        Lets an evaluation prefill once and decode under many methods and budgets. The budget split is
        recomputed for `config`; PQ codebooks are retrained from the copied keys. Resident caches only: an
        offloaded layer's GPU buffers are laid out for its own split.
        """
        if self.pq_config.offload or (config is not None and config.offload):
            raise ValueError("PQCache.fork works on caches with offload=False; patch with offload=False to fork")
        new = copy.copy(self)
        new.layers = [
            layer.fork(config) if isinstance(layer, PQLayer) else copy.deepcopy(layer) for layer in self.layers
        ]
        new.pq_config = config or self.pq_config
        return new
