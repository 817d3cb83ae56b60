"""The PQ cache: a transformers `StaticCache` whose global-attention layers also keep PQ codes.

Everything a decode step reads or writes is a tensor allocated before the first decode step and updated in place
(addresses never change), so `torch.compile(fullgraph=True)` captures the step whole and CUDA graphs can replay
it. Per PQ layer and sequence b, positions split as (n = `cumulative_length`, a 0-d device tensor)

    [0, start_b)            left padding: never attended
    [start_b, start_b+sink) sink tokens: always attended
    [lo_b, hi)              candidates: have PQ codes, top-k of them are attended     lo_b = start_b + sink
    [hi, n)                 local window (the newest `local` tokens, the current one included)  hi = n - local

Shapes are fixed by the cache's (bucketed) length: `sink_slots`, `topk_slots`, `local_slots` index slots per step;
the budget of the real context (prompt + max_new_tokens) decides how many of them are used (`sink_n`, `topk_n`,
`local_n`: 0-d device tensors), the rest are empty (-1). So calls whose cache sizes fall in one bucket share one
compiled graph and the budget keeps its meaning.

A decode step codes the one token that leaves the window (position hi - 1) from a device index. Work that must
wait (the k-means of the prefill) happens eagerly in `sync()`, before the first decode step.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from . import kernels
from .clustering import ClusterPool
from .config import PQCacheConfig
from .selection import QuestPages, pq_shortlist, select

__all__ = ["PQLayer", "PQCache", "bucket_length"]


def bucket_length(n: int) -> int:
    """Cache length used for a context of n tokens: n rounded up to a multiple of 2**max(6, floor(log2 n) - 3).

    Eight buckets per octave (at most 12.5% spare slots, at least 64-token steps): calls whose contexts fall in one
    bucket allocate equal shapes, so a compiled decode step is reused instead of recompiled.
    """
    step = 1 << max(6, n.bit_length() - 1 - 3)
    return -(-n // step) * step


class PQLayer(StaticLayer):
    """One global-attention layer: static K/V buffers plus PQ state. Shapes in the module docstring.

    `context_len` is the real context the budget is a fraction of (prompt + max_new_tokens); `max_cache_len` may be
    larger (a bucket). `observers` are called eagerly with (layer, query [B, Hkv, G, D], idx [B, Hkv, S], scaling)
    after each sparse step's selection (evaluation only: an observer makes the step eager).
    """

    def __init__(self, max_cache_len: int, layer_idx: int, config: PQCacheConfig, pool: ClusterPool,
                 context_len: int | None = None) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.layer_idx = layer_idx
        self.pool = pool
        self.context_len = context_len or max_cache_len
        self.observers: tuple = ()
        self.head_offset = 0  # global index of keys[:, 0]'s KV head (a tensor-parallel rank's first head)
        self._configure(config)
        self.start: torch.Tensor | None = None  # [B] first non-padding position
        self.prefill_len = 0  # tokens of the first forward (python int, set eagerly)
        self.obs_attn: torch.Tensor | None = None  # [B, Hkv, prefill_len] observation-window attention
        self._clear()

    # ---- configuration (eager) -------------------------------------------------------------------------------
    def _configure(self, config: PQCacheConfig) -> None:
        self.cfg = config
        self.sink, self.local, self.topk = self._split(config, self.context_len)  # what the budget selects
        self.sink_slots, self.local_slots, self.topk_slots = self._split(config, self.max_cache_len)  # shapes
        self.sink_slots, self.local_slots = max(self.sink_slots, self.sink), max(self.local_slots, self.local)
        self.topk_slots = max(self.topk_slots, self.topk)
        if config.selection == "quest":  # eager only: its page selection takes the exact count
            self.topk_slots = self.topk

    @staticmethod
    def _split(config: PQCacheConfig, n: int) -> tuple[int, int, int]:
        sink, local, topk = config.budget_split(n)
        if config.selection == "streaming":  # equal budget: what top-k would get goes to the window
            local, topk = local + topk, 0
        return sink, local, topk

    @property
    def is_compileable(self) -> bool:  # quest keeps python-side page bounds: eager only
        return self.cfg.selection != "quest"

    def _clear(self) -> None:
        """Drop the PQ state (not the K/V buffers)."""
        self.active = False  # sparse decoding on (prompt >= min_context)
        self.future: Future | None = None
        self.centroids: torch.Tensor | None = None  # [B, Hkv, m, K, Ds] float32
        self.centroid_sq: torch.Tensor | None = None  # [B, Hkv, m, K] float32: |c|^2, for encoding new keys
        self.codes: torch.Tensor | None = None  # [B, Hkv, max_len, m] uint8
        self.pages: QuestPages | None = None
        self.snap_idx: torch.Tensor | None = None  # [B, Hkv, topk_slots] the "snapkv" selection
        self.outliers: torch.Tensor | None = None  # [B, Hkv, outlier_slots] worst-coded positions, -1 = empty

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # the base class sets the layer up and allocates the K/V buffers; it is handed a length of 0 so the buffers
        # are allocated (and zero-filled) once, here: on CPU on huge pages (a sparse step gathers scattered rows,
        # huge pages spare a TLB miss per row)
        max_len, self.max_cache_len = self.max_cache_len, 0
        try:
            super().lazy_initialization(key_states, value_states)
        finally:
            self.max_cache_len = max_len
        dev = self.device
        b, h = key_states.shape[:2]
        self.keys = self._zeros((b, h, max_len, key_states.shape[-1]), key_states.dtype)
        self.values = self._zeros((b, h, max_len, value_states.shape[-1]), value_states.dtype)
        self.start = torch.zeros(b, dtype=torch.long, device=dev)
        # the split of the real context, as device scalars: read by the decode step, never guarded on
        self.split_n = torch.tensor([self.sink, self.local, self.topk], dtype=torch.long, device=dev)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.start, self.split_n):
                torch._dynamo.mark_static_address(t)

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero K/V buffer on this layer's device; on CPU backed by transparent huge pages (`hugepages`)."""
        if self.device.type == "cpu":
            from . import hugepages

            return hugepages.zeros(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def reset(self) -> None:
        super().reset()
        if self.start is not None:
            self.start.zero_()
        self.prefill_len = 0
        self.obs_attn = None
        self.cancel()
        self._clear()

    def cancel(self) -> None:
        """Drop a pending k-means job (a generate() that ends before its first decode step)."""
        if self.future is not None:
            cancel = getattr(self.pool, "cancel", None)
            if cancel is not None:
                cancel([self.future])
            else:
                self.future.cancel()
            self.future = None

    @property
    def length(self) -> int:
        """Tokens written (host read: for eager code and tests, never inside a decode step)."""
        return int(self.cumulative_length) if self.is_initialized else 0

    def fork(self, config: PQCacheConfig | None) -> "PQLayer":
        """A copy with its own K/V buffers whose decode follows `config` (None: dense). The PQ state is
        rebuilt from the copied keys, as if the prefill had run under `config`."""
        self.sync()
        pool, obs = self.pool, self.observers
        self.pool, self.observers = None, ()  # a thread pool cannot be deep-copied
        try:
            new = copy.deepcopy(self)
        finally:
            self.pool, self.observers = pool, obs
        new.pool = pool
        new._configure(config or self.cfg)
        new._clear()
        if self.is_initialized:
            new.split_n.copy_(torch.tensor([new.sink, new.local, new.topk]))
        if config is not None and self.start is not None and self.prefill_len:
            new.active = new.length >= config.min_context
            new._start_pq()
        return new

    def resize(self, max_cache_len: int, context_len: int) -> None:
        """Eagerly give a prefilled layer room for max_cache_len tokens and re-split its budget for context_len
        (continuing a conversation from a returned cache). Buffers are reallocated only when they grow."""
        self.sync()
        if self.is_initialized and max_cache_len > self.max_cache_len:
            n = self.length
            for name in ("keys", "values", "codes"):
                old = getattr(self, name)
                if old is None:
                    continue
                shape = (*old.shape[:2], max_cache_len, *old.shape[3:])
                new = self._zeros(shape, old.dtype) if name != "codes" else old.new_zeros(shape)
                new[:, :, :n] = old[:, :, :n]
                torch._dynamo.mark_static_address(new)
                setattr(self, name, new)
            if self.pages is not None:
                raise ValueError("a 'quest' cache cannot grow; generate on the whole conversation without a cache")
        self.max_cache_len = max(max_cache_len, self.max_cache_len)
        self.context_len = context_len
        self._configure(self.cfg)
        if self.is_initialized:
            self.split_n.copy_(torch.tensor([self.sink, self.local, self.topk]))

    # ---- writes -----------------------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1:
            return self.max_cache_len, 0  # decode: static shape (the sparse path ignores the mask)
        # a multi-token step sees only the filled prefix: an unpadded causal prefill then needs no mask at all
        # (SDPA's is_causal path) instead of a [q, max_len] boolean mask (17 GB for a 128K prompt)
        return self.length + query_length, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write [B, Hkv, T, D] new keys/values at the current length.

        Returns the whole static buffers [B, Hkv, max_len, D] for a decode step (T == 1: fixed shapes) and the
        filled prefix [B, Hkv, length, D] for a multi-token step (prefill, chunked prefill, assisted decoding),
        whose attention is exact and eager.
        """
        t = key_states.shape[-2]
        if t == 1:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return super().update(key_states, value_states, *args, **kwargs)
        n0 = self.length
        if n0 + t > self.max_cache_len:
            raise ValueError(
                f"the PQ cache holds {self.max_cache_len} tokens and already has {n0}; {t} more do not fit. "
                f"Let generate() build the cache (it sizes it from max_new_tokens), or pass a cache built with "
                f"PQCache(model, max_cache_len=...) large enough for the whole conversation"
            )
        super().update(key_states, value_states, *args, **kwargs)
        if self.active and n0 > 0:
            self._code_range(n0 - self.local, n0 + t - self.local)  # tokens this step pushed out of the window
        return self.keys[:, :, : n0 + t], self.values[:, :, : n0 + t]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest |tokens_to_remove| tokens (transformers passes a negative count to static layers).
        Codes of positions that re-enter the window are rewritten when they leave it again."""
        if self.is_initialized:
            self.cumulative_length.sub_(abs(int(tokens_to_remove)))

    # ---- prefill (eager) --------------------------------------------------------------------------------------
    @torch.compiler.disable
    def observe_prefill(self, query: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float) -> None:
        """Before `after_prefill` of the first prefill: record how much attention each prompt key gets from the
        prompt's last `observation_window` queries (`obs_attn`, see `selection.observation_attention`), for
        attention-weighted k-means and the "snapkv" selection. Kept with the layer, so forks reuse it.

        query: [B, H, q, D] the prefill's queries; keys: [B, Hkv, n, D] the prompt's keys (what `update` returned).
        """
        if self.prefill_len or keys.shape[2] < self.cfg.min_context:
            return  # a later multi-token step, or a short prompt that decodes densely
        # computed whatever this config uses, so a fork with weighted k-means or "snapkv" finds it: window x n dot
        # products per head, a small share (window / prompt length) of the prefill's own attention
        from .selection import observation_attention

        self.obs_attn = observation_attention(query, keys, attention_mask, scaling, self.cfg.observation_window)

    @torch.compiler.disable
    def after_prefill(self, attention_mask: torch.Tensor | None, batch: int) -> None:
        """Called once the layer's exact attention over a multi-token input is done.

        attention_mask: the 4D mask given to the attention function ([B, 1, q, length], bool or additive),
        or None (no padding). On the first prefill, records padding and hands the keys to the clustering pool.
        """
        if self.prefill_len:
            return  # a later multi-token step: its tokens got codes in `update`
        n = self.length
        self.prefill_len = n
        self.start.copy_(_first_valid(attention_mask, n, batch, self.device))
        self.active = n >= self.cfg.min_context
        self._start_pq()

    def _start_pq(self) -> None:
        """Hand the candidate keys to the clustering pool ("pq") or build page bounds ("quest")."""
        if not self.active:
            return
        hi = self.length - self.local
        if self.cfg.selection == "pq":
            lo = (self.start + self.sink).tolist()
            c = self.cfg
            b, h = self.keys.shape[:2]
            m, ds = c.num_subspaces, self.keys.shape[-1] // c.num_subspaces
            if c.quantizer == "residual":  # m full-dimension stages (kernels.quality)
                ds = self.keys.shape[-1]
            # allocated now, filled in place by `sync`: the decode step sees fixed addresses
            self.centroids = torch.zeros(b, h, m, c.num_centroids, ds, device=self.device)
            self.codes = torch.zeros(b, h, self.max_cache_len, m, dtype=torch.uint8, device=self.device)
            torch._dynamo.mark_static_address(self.centroids)
            torch._dynamo.mark_static_address(self.codes)
            if c.quantizer == "residual":  # squared norms of the stages' centroids, computed once by `sync`
                self.centroid_sq = torch.zeros(b, h, m, c.num_centroids, device=self.device)
                torch._dynamo.mark_static_address(self.centroid_sq)
            n_out = c.outlier_slots(self.context_len)
            if n_out > 0:  # filled by `sync`, read by every re-ranked step (`_rerank_decode`)
                self.outliers = torch.full((b, h, n_out), -1, dtype=torch.long, device=self.device)
                torch._dynamo.mark_static_address(self.outliers)
            weights = None
            if c.weighted_kmeans and self.obs_attn is not None:
                from .selection import kmeans_weights

                weights = kmeans_weights(self.obs_attn)  # [B, Hkv, prefill_len]
            self.future = self.pool.submit(
                self.keys, lo, hi, c.num_subspaces, c.bits, c.kmeans_iters, c.seed, ready=self._host_ready(),
                layer=self.layer_idx, head_offset=self.head_offset, weights=weights, quantizer=c.quantizer,
                outliers=n_out,
            )
        elif self.cfg.selection == "quest":
            self.pages = QuestPages(self.keys, self.cfg.quest_page_tokens)
        elif self.cfg.selection == "snapkv":
            if self.obs_attn is None:
                raise ValueError("selection 'snapkv' needs the prefill's attention (PQLayer.observe_prefill), which "
                                 "the patched attention function records; this layer was prefilled without it")
            from .selection import snapkv_indices

            # fixed for the whole decode: allocated once, read (never written) by every step
            self.snap_idx = snapkv_indices(self.obs_attn, self.start + self.sink, hi, self.topk, self.topk_slots)
            torch._dynamo.mark_static_address(self.snap_idx)

    def _assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Codes [B, Hkv, T, m] uint8 of keys [B, Hkv, T, D] under this layer's codebook (PQ or residual)."""
        if self.cfg.quantizer == "residual":
            from .kernels.quality import rq_assign_ref

            return rq_assign_ref(keys, self.centroids, self.centroid_sq)
        return kernels.pq_assign(keys, self.centroids, backend=self.cfg.backend)

    def _host_ready(self) -> torch.cuda.Event | None:
        """Event after which `self.keys` may be read on the host (offloaded layers); None here."""
        return None

    @torch.compiler.disable
    def sync(self) -> None:
        """Wait for this layer's codebook and copy it into the preallocated buffers (eager, once)."""
        if self.future is None:
            return
        book = self.future.result()
        self.future = None
        self.centroids.copy_(book.centroids)
        if self.centroid_sq is not None:  # once per codebook, not once per decode step and layer
            self.centroid_sq.copy_((self.centroids * self.centroids).sum(-1))
        starts = self.start.tolist()
        for i, q in enumerate(book.codes):
            lo = starts[i] + self.sink
            self.codes[i, :, lo : lo + q.shape[1]] = q.to(self.device)
        if self.outliers is not None:  # ascending, the empty (-1) slots first: what `with_outliers` searches
            x = self.outliers.shape[-1]
            for i, w in enumerate(book.outliers):  # [Hkv, <= outlier_slots] ascending positions relative to lo
                self.outliers[i, :, x - w.shape[1]:] = (w + starts[i] + self.sink).to(self.device)

    def _code_range(self, a: int, b: int) -> None:
        """Eagerly code positions [a, b) (a multi-token step pushed them out of the window)."""
        a = max(a, 0)
        if self.cfg.selection != "pq" or b <= a:
            return
        self.sync()
        self.codes[:, :, a:b] = self._assign(self._key_range(a, b))

    def _key_range(self, a: int, b: int) -> torch.Tensor:
        """Keys of positions [a, b) on the compute device: [B, Hkv, b - a, D]."""
        return self.keys[:, :, a:b]

    def _keys_at(self, pos: torch.Tensor) -> torch.Tensor:
        """Keys of positions pos [T] (device tensor): [B, Hkv, T, D]."""
        return self.keys.index_select(2, pos)

    # ---- decode (static: compiled whole) ---------------------------------------------------------------------
    def _step_ranges(self, query: torch.Tensor):
        """The per-step bookkeeping shared by every selection: codes the token that just left the window (position
        hi - 1) and returns (lo [B], hi_b [B] candidate bounds, sink [B, sink_slots], local [B, local_slots]
        positions, -1 = empty). Tensor ops only."""
        if self.future is not None:
            self.sync()  # eager callers (manual loops); generate() syncs before the first step
        dev = query.device
        n = self.cumulative_length  # 0-d: tokens so far, the current one included
        sink_n, local_n = self.split_n[0], self.split_n[1]
        hi = n - local_n  # 0-d
        lo = self.start + sink_n  # [B]
        hi_b = hi.expand_as(lo).contiguous()  # kernels index it per row
        if self.cfg.selection == "pq":
            p = (hi - 1).clamp_min(0).reshape(1)  # the token that left the window this step
            self.codes.index_copy_(2, p, self._assign(self._keys_at(p)))
        elif self.pages is not None:
            self.pages.update(self.keys, self.start, max(int(hi), 0))
        j = torch.arange(self.sink_slots, device=dev)
        sink = self.start[:, None] + j  # [B, sink_slots]
        sink = torch.where((j < sink_n) & (sink < torch.minimum(hi, n)), sink, -1)
        j = torch.arange(self.local_slots, device=dev)
        local = n - self.local_slots + j  # [local_slots]
        local = torch.where((j >= self.local_slots - local_n) & (local >= self.start[:, None]), local, -1)
        return lo, hi_b, sink, local

    def token_index(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Positions attended by a decode query: idx [B, Hkv, sink_slots + topk_slots + local_slots] int64,
        -1 = empty slot. query: [B, Hkv, G, D]. Sink, top-k and window ranges are disjoint.

        Also codes the token that just left the window (position hi - 1).
        """
        lo, hi_b, sink, local = self._step_ranges(query)
        top = select(
            self.cfg.selection, query, lo, hi_b, self.topk_slots, scaling, keys=self.keys, centroids=self.centroids,
            codes=self.codes, pages=self.pages, fixed=self.snap_idx, backend=self.cfg.backend,
            rerank=self.cfg.rerank_factor, k_valid=self.split_n[2:], outliers=self.outliers,
        )  # [B, Hkv, k_slots]: the best topk_n of them, the rest -1
        bh = top.shape[:2]
        return torch.cat([sink[:, None].expand(*bh, -1), top, local[:, None].expand(*bh, -1)], dim=-1)

    def _rerank_decode(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A "pq" step with exact re-ranking, through the fused `kernels.rerank_attention` (on CPU the selected
        keys are read once, by the re-ranking). q: [B, Hkv, G, D]. Returns (out [B, Hkv, G, Dv], idx as
        `token_index`)."""
        lo, hi_b, sink, local = self._step_ranges(q)
        bh = q.shape[:2]
        k_valid = self.split_n[2:]
        short, log_z = pq_shortlist(q, lo, hi_b, self.topk_slots, scaling, self.centroids, self.codes,
                                    self.cfg.rerank_factor, self.cfg.backend, k_valid, self.outliers)
        sink, local = sink[:, None].expand(*bh, -1), local[:, None].expand(*bh, -1)
        out, _, top = kernels.rerank_attention(q, self.keys, self.values, short, torch.cat([sink, local], -1),
                                               self.topk_slots, scaling, backend=self.cfg.backend, k_valid=k_valid,
                                               log_z=log_z)
        return out, torch.cat([sink, top, local], dim=-1)

    def decode(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step's attention. query: [B, H, 1, D] -> output [B, 1, H, Dv] (the HF layout)."""
        b, hq, _, d = query.shape
        hkv = self.keys.shape[1]
        q = query.reshape(b, hkv, hq // hkv, d)  # query head j uses KV head j // G (repeat_kv's layout)
        if self.cfg.selection == "pq" and self.cfg.rerank_factor > 1 and self.topk_slots > 0:
            out, idx = self._rerank_decode(q, scaling)
        else:
            idx = self.token_index(q, scaling)
            out = None
        for obs in self.observers:
            obs(self, q, idx, scaling)
        if out is None:
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
    empty = ~ok.any(dim=-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"batch rows {rows} have an attention mask of all zeros (no real token): give every row at least one "
            f"token with attention_mask 1"
        )
    start = ok.int().argmax(dim=-1)
    pos = torch.arange(length, device=ok.device)
    if not bool(((pos[None, :] >= start[:, None]) == ok).all()):
        raise ValueError(
            "pqpatch supports left padding only (every token after the first real one must be attended); "
            "set tokenizer.padding_side = 'left'"
        )
    return start.to(device=device, dtype=torch.long)


class PQCache(StaticCache):
    """StaticCache for `model`'s config whose full-attention layers are `PQLayer`s and whose sliding-window
    layers are static rings (`SlidingLayer`, dense within the window).

    Built by the patched `generate()`; build one yourself for a manual forward loop:
    `PQCache(model, max_cache_len=prompt_len + new_tokens)`. `context_len` (default: max_cache_len) is the real
    context the token budget is a fraction of, when max_cache_len is a rounded-up bucket.
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, context_len: int | None = None) -> None:
        from .sliding import SlidingLayer

        state = getattr(model, "_pqpatch", None)
        if state is None:
            raise ValueError("PQCache needs a patched model: call pqpatch.patch_model(model, config) first")
        text_config = model.config.get_text_config(decoder=True)
        super().__init__(config=text_config, max_cache_len=max_cache_len)
        if state.config.offload:
            from .offload import OffloadPQLayer as layer_cls
        else:
            layer_cls = PQLayer
        for i, layer in enumerate(self.layers):
            if i in state.pq_layers:
                self.layers[i] = layer_cls(max_cache_len, i, state.config, state.pool, context_len)
                self.layers[i].head_offset = state.kv_head_offsets.get(i, 0)
            elif getattr(layer, "is_sliding", False) and isinstance(layer, StaticLayer):
                window = layer.max_cache_len  # transformers sized it min(window, max_cache_len)
                self.layers[i] = SlidingLayer(window, max_cache_len)
        self.pq_config = state.config

    def pq_layers(self) -> list[PQLayer]:
        return [layer for layer in self.layers if isinstance(layer, PQLayer)]

    def sync(self) -> None:
        """Wait for every layer's pending k-means and fill its codebook (eager; before the first decode step)."""
        for layer in self.pq_layers():
            if layer.future is not None:  # generate() calls this before every step: skip the eager call when done
                layer.sync()

    def ensure_capacity(self, context_len: int) -> None:
        """Make room for a conversation of context_len tokens (prompt so far + new turn + answer) and re-split the
        budget for it: generate() calls this when it is handed a returned PQCache."""
        from .sliding import SlidingLayer

        size = max(self.get_max_length(), bucket_length(context_len))
        for layer in self.layers:
            if isinstance(layer, (PQLayer, SlidingLayer)):
                layer.resize(size, context_len)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return max((layer.max_cache_len for layer in self.pq_layers()), default=super().get_max_length(layer_idx))

    def cancel(self) -> None:
        """Drop every pending k-means job of this cache."""
        for layer in self.pq_layers():
            layer.cancel()

    def add_observer(self, fn) -> None:
        """Call fn(layer, query, idx, scaling) after every sparse step's selection (evaluation; eager only)."""
        for layer in self.pq_layers():
            layer.observers = (*layer.observers, fn)

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
