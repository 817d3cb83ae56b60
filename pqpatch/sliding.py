"""A sliding-window layer for the PQ cache: a static ring of K/V, dense attention within the window.

transformers' `StaticSlidingWindowLayer` keeps its length as a Python int that changes every step, so a compiled
decode step recompiles until dynamo gives up. This ring keeps everything a decode step touches in tensors:

    ring slots [0, R), R = min(max_cache_len, window + SPARE); position p lives in slot p % R
    decode     write the new token at slot n % R (n: 0-d device tensor), attend over the slots whose positions
               lie in the window (n - window, n] and after the row's left padding: exact attention, static shapes
    multi-token steps (prefill, assisted decoding, continuing a conversation): the model's own SDPA with its
               sliding mask over [ring positions still in view, new tokens], then the newest tokens go to the ring

The SPARE slots keep positions that a `crop` (a rejected draft of assisted decoding) brings back into view.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer

from . import kernels

__all__ = ["SlidingLayer", "SPARE"]

SPARE = 128  # tokens a crop may remove once the ring has wrapped


class SlidingLayer(StaticLayer):
    """Sliding-window layer with a static ring of R slots. Shapes in the module docstring."""

    is_sliding = True

    def __init__(self, window: int, max_cache_len: int) -> None:
        super().__init__(max_cache_len=min(max_cache_len, window + SPARE))
        self.window = window
        self.start: torch.Tensor | None = None  # [B] first real position
        self.prefilled = False

    @property
    def is_croppable(self) -> bool:
        return True  # up to SPARE tokens once the ring has wrapped (checked in crop)

    @property
    def length(self) -> int:
        return int(self.cumulative_length) if self.is_initialized else 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.start = torch.zeros(key_states.shape[0], dtype=torch.long, device=self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.start)

    def reset(self) -> None:
        super().reset()
        if self.start is not None:
            self.start.zero_()
        self.prefilled = False

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return -1  # a window: no limit on the sequence length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if query_length == 1:
            return self.max_cache_len, 0  # decode: static shape (the ring path ignores the mask)
        a = self._view_start(self.length)
        return self.length - a + query_length, a

    def _view_start(self, n0: int) -> int:
        """First position a query at position n0 still sees."""
        return max(0, n0 - self.window + 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write [B, Hkv, T, D]. Decode (T == 1): returns the ring [B, Hkv, R, D]; a multi-token step returns the
        positions in view followed by the new tokens, for exact attention under the model's sliding mask."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, r = key_states.shape[-2], self.max_cache_len
        if t == 1:
            slot = (self.cumulative_length % r).reshape(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        n0 = self.length
        a = self._view_start(n0)
        old = torch.arange(a, n0, device=self.device) % r
        full_k = torch.cat([self.keys.index_select(2, old), key_states], dim=2)
        full_v = torch.cat([self.values.index_select(2, old), value_states], dim=2)
        keep = min(t, r)
        pos = torch.arange(n0 + t - keep, n0 + t, device=self.device)
        self.keys.index_copy_(2, pos % r, key_states[:, :, t - keep :])
        self.values.index_copy_(2, pos % r, value_states[:, :, t - keep :])
        self.cumulative_length.add_(t)
        return full_k, full_v

    def crop(self, tokens_to_remove: int) -> None:
        n, r = self.length, abs(int(tokens_to_remove))
        if n > self.max_cache_len and self._view_start(n - r) < n - self.max_cache_len:
            raise ValueError(
                f"cannot remove {r} tokens from a sliding-window layer whose ring has wrapped: at most "
                f"{self.max_cache_len - self.window + 1} can be restored; use fewer assistant tokens"
            )
        if self.is_initialized:
            self.cumulative_length.sub_(r)

    def resize(self, max_cache_len: int, context_len: int) -> None:
        """Room for a longer conversation (eager). A ring smaller than window + SPARE has never wrapped (it was
        sized by the whole cache), so its slots are positions and copy over as they are."""
        r = min(max_cache_len, self.window + SPARE)
        if self.is_initialized and r > self.max_cache_len:
            n = self.length
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros((*old.shape[:2], r, old.shape[-1]))
                new[:, :, :n] = old[:, :, :n]
                torch._dynamo.mark_static_address(new)
                setattr(self, name, new)
        self.max_cache_len = max(r, self.max_cache_len)

    @torch.compiler.disable
    def after_prefill(self, attention_mask: torch.Tensor | None, batch: int, length: int) -> None:
        """Record left padding from the first multi-token step's mask ([B, 1, q, kv] over positions [0, length))."""
        from .cache import _first_valid

        if self.prefilled:
            return
        self.prefilled = True
        self.start.copy_(_first_valid(attention_mask, length, batch, self.device))

    def decode(self, query: torch.Tensor, scaling: float, backend: str) -> torch.Tensor:
        """Exact attention of query [B, H, 1, D] over the window -> [B, 1, H, Dv]."""
        b, hq, _, d = query.shape
        hkv, r = self.keys.shape[1], self.max_cache_len
        q = query.reshape(b, hkv, hq // hkv, d)
        last = self.cumulative_length - 1  # position of the current token
        s = torch.arange(r, device=query.device)
        pos = last - torch.remainder(last - s, r)  # newest position held by each slot
        ok = (pos >= 0) & (pos > last - self.window)
        ok = ok[None, :] & (pos[None, :] >= self.start[:, None])  # [B, R]
        idx = torch.where(ok, s, -1)[:, None].expand(b, hkv, r).contiguous()
        out, _ = kernels.sparse_decode_attention(q, self.keys, self.values, idx, scaling, backend=backend)
        return out.reshape(b, hq, -1)[:, None]
