"""PQCacheConfig validation and budget arithmetic."""

import dataclasses
import math

import pytest

from pqpatch import PQCacheConfig

BAD = [
    ("token_budget", 0.0), ("token_budget", 1.5), ("token_budget", 0), ("token_budget", -3), ("token_budget", "0.2"),
    ("token_budget", True), ("sink_tokens", -1), ("sink_tokens", 2.0), ("local_tokens", 1.0), ("local_tokens", -0.1),
    ("local_tokens", 0), ("num_subspaces", 0), ("num_subspaces", 1.5), ("num_subspaces", 5), ("bits", 0), ("bits", 9), ("bits", None),
    ("kmeans_iters", 0), ("seed", 0.5), ("seed", -1), ("seed", 2**31), ("seed", 2**64), ("num_threads", 0), ("num_threads", 2.0), ("min_context", 0),
    ("selection", "random"), ("selection", "PQ"), ("backend", "cuda"), ("offload", 1), ("quest_page_tokens", 0),
    ("cache_block_tokens", 0), ("gpu_cache_tokens", -1), ("cache_policy", "fifo"),
    ("weighted_kmeans", 1), ("weighted_kmeans", None), ("observation_window", 0), ("observation_window", 8.0),
    ("sink_in_budget", "no"), ("quantizer", "opq"), ("rerank", 0), ("rerank", 2.0),
    ("rerank_outliers", 1.0), ("rerank_outliers", -1), ("rerank_outliers", "1%"),
]


@pytest.mark.parametrize("field,value", BAD)
def test_every_bad_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PQCacheConfig(**{field: value})


def test_every_field_has_a_bad_value_test():
    tested = {f for f, _ in BAD}
    assert tested == {f.name for f in dataclasses.fields(PQCacheConfig)}


def test_frozen_and_defaults():
    cfg = PQCacheConfig()
    assert (cfg.token_budget, cfg.sink_tokens, cfg.local_tokens, cfg.num_subspaces, cfg.bits) == (0.2, 32, 0.5, 2, 8)
    assert cfg.num_centroids == 256  # 8-bit codes: 2 bytes per token and KV head at m = 2
    assert cfg.weighted_kmeans and cfg.observation_window == 64 and cfg.quantizer == "residual"
    assert cfg.rerank is None and cfg.rerank_factor == 2  # re-ranking on by default for resident caches ...
    assert PQCacheConfig(offload=True).rerank_factor == 1  # ... and off with offload (exact keys on the host)
    assert PQCacheConfig(rerank=1).rerank_factor == 1 and PQCacheConfig(rerank=3).rerank_factor == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bits = 4


def test_residual_stage_cap_names_pq():
    """More than MAX_RESIDUAL_STAGES residual stages (e.g. an old num_subspaces=16 PQ setting under the residual
    default) is refused with the fix named; the same count is fine for "pq", and 4 stages for "residual"."""
    from pqpatch.config import MAX_RESIDUAL_STAGES

    with pytest.raises(ValueError, match="quantizer='pq'"):
        PQCacheConfig(num_subspaces=16)
    assert PQCacheConfig(num_subspaces=16, quantizer="pq").num_subspaces == 16
    assert PQCacheConfig(num_subspaces=MAX_RESIDUAL_STAGES).quantizer == "residual"


@pytest.mark.parametrize(
    "budget,local,sink,n,expect",
    [
        (0.2, 0.5, 32, 10_000, (32, 1000, 968)),  # 2000 tokens: half local, 32 sink, rest top-k
        (100, 10, 4, 10_000, (4, 10, 86)),
        (1.0, 0.5, 32, 50, (25, 25, 0)),  # budget = context: sink and local first
        (0.01, 0.5, 32, 1000, (5, 5, 0)),  # a budget below sink + local shrinks the sink
        (5000, 0.5, 32, 100, (32, 50, 18)),  # a count larger than the context is capped
    ],
)
def test_budget_split(budget, local, sink, n, expect):
    got = PQCacheConfig(token_budget=budget, local_tokens=local, sink_tokens=sink).budget_split(n)
    assert got == expect
    assert sum(got) == min(n, budget if isinstance(budget, int) else math.ceil(budget * n))


def test_import_is_light():
    """`import pqpatch` must not pull transformers, triton, faiss or plotting in (they load on first use)."""
    import subprocess
    import sys

    code = "import sys, pqpatch, kernels; print(sorted(m for m in ('transformers', 'triton', 'faiss', 'matplotlib', 'gguf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
