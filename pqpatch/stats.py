"""`pqpatch.stats(model)`: what the latest generate() call moved and kept, summed over the PQ layers."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class CacheStats:
    """Totals over the PQ layers of one cache. Byte counts are per whole cache, not per layer.

    steps: sparse layer-steps: tokens decoded after the prefill, summed over the active PQ layers (offload: its
    own counter); requested / hits / misses (offload only, else 0): selected
    top-k tokens and how many were found in the GPU block cache — hits + misses == requested; bytes_h2d /
    bytes_d2h (offload only): host transfers; gpu_kv_bytes: K/V bytes on the compute device for the PQ layers (codes and centroids included);
    dense_kv_bytes: what a dense cache of the same length would hold for them.
    """

    offload: bool
    layers: int
    steps: int
    requested: int
    hits: int
    misses: int
    staged: int
    admitted_blocks: int
    bytes_h2d: int
    bytes_d2h: int
    gpu_kv_bytes: int
    dense_kv_bytes: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requested if self.requested else 0.0

    @property
    def bytes_h2d_per_step(self) -> float:
        return self.bytes_h2d / self.steps if self.steps else 0.0

    def __str__(self) -> str:
        mib = 1 << 20
        head = f"pqpatch stats: {self.layers} PQ layers, offload={self.offload}, {self.steps} sparse layer-steps | "
        moved = (
            f"selected {self.requested} tokens, block-cache hit rate {self.hit_rate:.1%} | "
            f"H2D {self.bytes_h2d / mib:.2f} MiB ({self.bytes_h2d_per_step / 1024:.1f} KiB/layer-step), "
            f"D2H {self.bytes_d2h / mib:.2f} MiB | "
            if self.offload else ""
        )
        return f"{head}{moved}GPU KV {self.gpu_kv_bytes / mib:.2f} MiB vs dense {self.dense_kv_bytes / mib:.2f} MiB"


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def cache_stats(cache) -> CacheStats:
    """Stats of a `PQCache` (see `CacheStats`)."""
    from .offload import OffloadPQLayer

    tot = dict.fromkeys(
        ("steps", "requested", "hits", "misses", "staged", "admitted_blocks", "bytes_h2d", "bytes_d2h"), 0
    )
    gpu = dense = 0
    layers = cache.pq_layers()
    for layer in layers:
        if not layer.is_initialized:
            continue
        kv_per_token = _nbytes(layer.keys[:, :, :1], layer.values[:, :, :1])
        dense += kv_per_token * layer.length
        if isinstance(layer, OffloadPQLayer):
            gpu += layer.gpu_kv_bytes()
            for f in fields(layer.stats):
                tot[f.name] += getattr(layer.stats, f.name)
        else:
            gpu += _nbytes(layer.keys, layer.values, layer.codes, layer.centroids)
            if layer.active and layer.prefill_len:  # tokens decoded after the prefill (derived: no counter)
                tot["steps"] += max(layer.length - layer.prefill_len, 0)
    return CacheStats(offload=cache.pq_config.offload, layers=len(layers), gpu_kv_bytes=gpu, dense_kv_bytes=dense, **tot)


def stats(model: torch.nn.Module) -> CacheStats:
    """Stats of the cache that the patched model's latest generate() call used (taken when it returned).
    For a cache you drive yourself, call `cache_stats(cache)`."""
    state = getattr(model, "_pqpatch", None)
    if state is None:
        raise ValueError("pqpatch.stats needs a patched model: call pqpatch.patch_model(model, config) first")
    if state.last_stats is None:
        raise ValueError("no generate() call yet: pqpatch.stats reports on the latest one")
    return state.last_stats
