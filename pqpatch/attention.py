"""The "pqcache" attention function registered with transformers' AttentionInterface.

transformers calls it for every attention layer with the layer's projected, rotated query/key/value. Multi-token
steps (prefill, chunked prefill, assisted decoding), short prompts and calls without a PQ cache run the model's
own SDPA path unchanged; a decode step (q_len == 1) of a PQ layer attends only to its selected tokens, and one of
a sliding-window layer to the ring slots inside its window.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import PQCache, PQLayer
from .sliding import SlidingLayer

ATTN_NAME = "pqcache"


def pqcache_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query: [B, H, q, D]; key/value: what the cache layer's `update` returned. Returns ([B, q, H, Dv], None)."""
    cache = getattr(module, "_pqpatch_cache", None)
    layer = cache.layers[module.layer_idx] if isinstance(cache, PQCache) else None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, batch = query.shape[2], query.shape[0]
    if isinstance(layer, SlidingLayer):
        if q_len == 1:
            if not layer.prefilled:  # a 1-token prompt
                layer.after_prefill(attention_mask, batch, 1)
            return layer.decode(query, scaling, cache.pq_config.backend), None
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if not layer.prefilled:
            layer.after_prefill(attention_mask, batch, key.shape[2])
        return out
    if not isinstance(layer, PQLayer):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if q_len == 1 and layer.active:
        return layer.decode(query, scaling), None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if not layer.prefill_len:
        layer.observe_prefill(query, key, attention_mask, scaling)  # observation window (weighted k-means, snapkv)
        layer.after_prefill(attention_mask, batch)  # the first forward only (1-token prompts too)
    return out


def cache_capture_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """forward pre-hook: hand the attention function the cache (`cache=` in transformers >= 5.24, else
    `past_key_values=`), which transformers does not pass to attention functions."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if module.__dict__.get("_pqpatch_cache") is not cache:
        module._pqpatch_cache = cache
