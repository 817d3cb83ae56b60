"""PQCacheConfig: the one frozen, validated description of how a model is patched."""

from __future__ import annotations

import math
from dataclasses import dataclass

SELECTIONS = ("pq", "oracle", "streaming", "quest", "snapkv")
BACKENDS = ("auto", "torch", "cpu", "triton")
CACHE_POLICIES = ("lfu", "lru")
QUANTIZERS = ("pq", "residual")
SEED_MAX = 2**31 - 1  # faiss takes the k-means seed as a C int
# rerank=None on a resident cache: re-rank a shortlist of 2 x top-k with the exact keys. On Gemma-3-270M (budget
# 0.1, 3 documents x 64 teacher-forced tokens, docs/results.md) r = 1 / 2 / 3 / 4 gave recall of the oracle's
# attention mass 0.80 / 0.90 / 0.94 / 0.96; on the CPU a decode step of the attention-bound benchmark model at 32K
# costs ~1.3x (r = 2) and ~1.7x (r = 4) of r = 1 (the shortlist's scattered key rows; benchmarks/test_model_step.py
# with PQPATCH_BENCH_RERANK=4): r = 2 is the balance
DEFAULT_RERANK = 2
# quantizer="residual" trains one full-dimension k-means per stage (num_subspaces stages): more than a few is
# several times the k-means time of the default 2 for little gain; many small sub-spaces are what "pq" is for
MAX_RESIDUAL_STAGES = 4


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float))) and not isinstance(x, bool)


@dataclass(frozen=True)
class PQCacheConfig:
    """How decoding attends to a long cache. Every field is checked in `__post_init__`.

    token_budget: tokens attended per decode step in total (sink + top-k + local window). A float in (0, 1] is a
        fraction of the context the cache is built for (prompt + max_new_tokens); an int >= 1 is a count.
    sink_tokens: first tokens of every sequence, always attended.
    local_tokens: most recent tokens, always attended: a float in [0, 1) is a fraction of the budget, an int a
        count.
    num_subspaces: m, product-quantization sub-spaces per key (must divide the head dim). Default 2: with
        bits=8 the index is 2 bytes per token and KV head for every head dim.
    bits: b, 2**b centroids per sub-space (1..8). Default 8: the whole code byte. On Gemma-3-270M (head dim
        256) b=8 raised the recall of the exact top-k's attention mass from ~0.55 to ~0.8 over the paper's b=6 at
        the same index size (docs/results.md).
    kmeans_iters, seed: k-means iterations and seed (an int in [0, 2**31 - 1]: faiss takes a C int).
    num_threads: clustering thread-pool size (None: min(4, CPU count)).
    min_context: prompts shorter than this stay fully dense.
    selection: "pq" (PQCache), "oracle" (exact top-k: the upper bound), "streaming" (sink + local only),
        "quest" (pages scored by the per-channel min/max bound), "snapkv" (eviction baseline: the top-k tokens by
        the attention of the prompt's last `observation_window` queries, chosen once at prefill and then fixed).
    backend: "auto" (Triton on CUDA, else PyTorch), "torch", "triton".
    offload: keep the middle of the KV cache in (pinned) CPU memory, fetch selected tokens through a GPU block
        cache.
    quest_page_tokens: page size of the "quest" selection.
    cache_block_tokens, gpu_cache_tokens, cache_policy: the offload block cache (block size, capacity, "lfu"/"lru").
    weighted_kmeans: attention-weighted k-means: each training key counts 1 + N x the mean softmax attention it
        gets from the prompt's last `observation_window` queries (N: prompt length), so the centroids resolve
        the keys queries actually hit. Default on: on Gemma-3-270M it raised the recall of the oracle's
        attention mass at budget 0.1 from 0.77 / 0.76 to 0.80 / 0.80 at 8K / 16K (3 prompts x 2 k-means seeds,
        docs/results.md).
    observation_window: how many of the prompt's last queries observe the keys (weighted_kmeans, "snapkv").
    sink_in_budget: True (default): the budget counts the sink tokens, so every method attends exactly
        `token_budget` tokens (sink + top-k + window). False: the official PQCache composition, sink tokens on top
        of the budget and the budget split between top-k and window by `local_tokens`.
    quantizer: "residual" (default: residual quantization, `num_subspaces` stages of at most MAX_RESIDUAL_STAGES,
        each a k-means over the whole head dim on what the previous stages left) or "pq" (product quantization:
        `num_subspaces` slices of the head dim, which it must divide). Both store `num_subspaces` one-byte codes
        per token and KV head; "residual" keeps num_subspaces x 2**bits full-dimension centroids per KV head
        (num_subspaces x more than "pq") and takes ~2-3x the k-means time. On Gemma-3-270M (budget 0.1, with the
        default re-ranking) it raised the recall of the oracle's attention mass from 0.90 / 0.90 to 0.94 / 0.93
        at 8K / 16K and brought the 16K KL from 9.6x to 1.3x the oracle's (docs/results.md).
    rerank: None (default) or r >= 1. r > 1: "pq" selects a shortlist of r x top-k tokens by the codes, re-scores
        it with the exact keys and keeps the best top-k (reads r x top-k extra keys per step and KV head; resident
        caches only). None: `DEFAULT_RERANK` (2) on a resident cache, 1 with offload=True (an offloaded cache keeps
        the exact keys on the host). On Gemma-3-270M re-ranking a 2k shortlist raised the recall of the oracle's
        attention mass at budget 0.1 from 0.80 to 0.90 at 8K and 16K, 4k to 0.96 (docs/results.md); each extra k
        costs a decode step k more scattered key rows. `rerank_factor` is the resolved value.
    rerank_outliers: with re-ranking (rerank_factor > 1), the prompt's worst-coded keys join every shortlist, so
        the exact keys decide for them: per KV head, the candidates with the largest reconstruction error under
        the trained codebook (a float in [0, 1): that fraction of the context, an int >= 0: a count; 0: off).
        Why: the keys a retrieval needs are often the rarest, and the rarest are coded worst. On Gemma-3-270M a
        NIAH needle's digit keys were the 6 worst-coded of 15.5K candidates, and the codes ranked the one key
        that held 0.96 of a head's attention 2443rd (docs/results.md). Costs rerank_outliers x context extra key
        rows per step and KV head (default 0.01: ~5% more than the default shortlist of 2 x top-k).
    """

    token_budget: float | int = 0.2
    sink_tokens: int = 32
    local_tokens: float | int = 0.5
    num_subspaces: int = 2
    bits: int = 8
    kmeans_iters: int = 10
    seed: int = 0
    num_threads: int | None = None
    min_context: int = 1024
    selection: str = "pq"
    backend: str = "auto"
    offload: bool = False
    quest_page_tokens: int = 16
    cache_block_tokens: int = 64
    gpu_cache_tokens: int = 2048
    cache_policy: str = "lfu"
    weighted_kmeans: bool = True
    observation_window: int = 64
    sink_in_budget: bool = True
    quantizer: str = "residual"
    rerank: int | None = None
    rerank_outliers: float | int = 0.01

    def __post_init__(self) -> None:
        tb = self.token_budget
        if not _is_number(tb) or (isinstance(tb, float) and not (0.0 < tb <= 1.0)) or (_is_int(tb) and tb < 1):
            raise ValueError(
                f"token_budget must be a float in (0, 1] (a fraction of the context) or an int >= 1 "
                f"(a token count), got {tb!r}"
            )
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {self.sink_tokens!r}")
        lt = self.local_tokens
        if not _is_number(lt) or (isinstance(lt, float) and not (0.0 <= lt < 1.0)) or (_is_int(lt) and lt < 1):
            raise ValueError(
                f"local_tokens must be a float in [0, 1) (a fraction of the budget) or an int >= 1 (a count), "
                f"got {lt!r}"
            )
        if not _is_int(self.num_subspaces) or self.num_subspaces < 1:
            raise ValueError(f"num_subspaces must be an int >= 1, got {self.num_subspaces!r}")
        if not _is_int(self.bits) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 1..8 (2**bits centroids per sub-space), got {self.bits!r}")
        if not _is_int(self.kmeans_iters) or self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be an int >= 1, got {self.kmeans_iters!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            # faiss takes the seed as a C int (and seeds problem i with seed + i, see codebook.kmeans_faiss)
            raise ValueError(f"seed must be an int in [0, {SEED_MAX}] (2**31 - 1), got {self.seed!r}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise ValueError(f"num_threads must be None or an int >= 1, got {self.num_threads!r}")
        if not _is_int(self.min_context) or self.min_context < 1:
            raise ValueError(f"min_context must be an int >= 1, got {self.min_context!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload must be True or False, got {self.offload!r}")
        if self.offload and self.selection not in ("pq", "streaming"):
            raise ValueError(
                f"offload=True works with selection 'pq' or 'streaming' (selection={self.selection!r} reads every "
                f"key at each step); set offload=False to evaluate it"
            )
        if not _is_int(self.quest_page_tokens) or self.quest_page_tokens < 1:
            raise ValueError(f"quest_page_tokens must be an int >= 1, got {self.quest_page_tokens!r}")
        if not _is_int(self.cache_block_tokens) or self.cache_block_tokens < 1:
            raise ValueError(f"cache_block_tokens must be an int >= 1, got {self.cache_block_tokens!r}")
        if not _is_int(self.gpu_cache_tokens) or self.gpu_cache_tokens < 0:
            raise ValueError(f"gpu_cache_tokens must be an int >= 0, got {self.gpu_cache_tokens!r}")
        if not isinstance(self.weighted_kmeans, bool):
            raise ValueError(f"weighted_kmeans must be True or False, got {self.weighted_kmeans!r}")
        if not isinstance(self.sink_in_budget, bool):
            raise ValueError(f"sink_in_budget must be True or False, got {self.sink_in_budget!r}")
        if not _is_int(self.observation_window) or self.observation_window < 1:
            raise ValueError(f"observation_window must be an int >= 1, got {self.observation_window!r}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if self.quantizer == "residual" and self.num_subspaces > MAX_RESIDUAL_STAGES:
            raise ValueError(
                f"quantizer='residual' trains num_subspaces full-dimension k-means stages; "
                f"num_subspaces={self.num_subspaces} is more than {MAX_RESIDUAL_STAGES}. For many small sub-spaces "
                f"use quantizer='pq' (num_subspaces must then divide the head dim)"
            )
        if self.rerank is not None and (not _is_int(self.rerank) or self.rerank < 1):
            raise ValueError(f"rerank must be None (automatic) or an int >= 1 (1: no re-ranking), got "
                             f"{self.rerank!r}")
        if self.rerank is not None and self.rerank > 1 and self.offload:
            raise ValueError("rerank > 1 reads the shortlist's exact keys, which an offloaded cache keeps on the host; "
                             "use rerank=1 with offload=True")
        ro = self.rerank_outliers
        if not _is_number(ro) or (isinstance(ro, float) and not (0.0 <= ro < 1.0)) or (_is_int(ro) and ro < 0):
            raise ValueError(f"rerank_outliers must be a float in [0, 1) (a fraction of the context) or an int >= 0 "
                             f"(a count), got {ro!r}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, got {self.cache_policy!r}")

    @property
    def rerank_factor(self) -> int:
        """The shortlist factor a "pq" step uses: `rerank`, or for None `DEFAULT_RERANK` on resident caches and 1
        with offload."""
        if self.rerank is not None:
            return self.rerank
        return 1 if self.offload else DEFAULT_RERANK

    def outlier_slots(self, context_len: int) -> int:
        """How many worst-coded keys per KV head join each re-ranking shortlist (`rerank_outliers`) for a cache
        built for `context_len` tokens: 0 without re-ranking or without "pq" selection."""
        if self.selection != "pq" or self.rerank_factor <= 1:
            return 0
        ro = self.rerank_outliers
        return ro if _is_int(ro) else math.ceil(ro * context_len)

    @property
    def num_centroids(self) -> int:
        return 1 << self.bits

    def budget_split(self, context_len: int) -> tuple[int, int, int]:
        """(sink, local, top-k) token counts for a cache built for `context_len` tokens.

        The three add up to min(budget, context_len) except that sink and local always get their share first:
        the budget is never smaller than sink + local + 0. With `sink_in_budget=False` the sink comes on top:
        the three add up to min(sink_tokens + budget, context_len).
        """
        tb = self.token_budget
        budget = math.ceil(tb * context_len) if isinstance(tb, float) else tb
        if not self.sink_in_budget:
            sink = min(self.sink_tokens, context_len)
            budget = min(budget, context_len - sink)
            lt = self.local_tokens
            local = math.ceil(lt * budget) if isinstance(lt, float) else lt
            local = max(1, min(local, budget)) if budget else 0
            if local == 0 and sink:  # the newest token is always attended: it takes a sink slot's place
                sink, local = sink - 1, 1
            return sink, local, max(0, budget - local)
        budget = min(budget, context_len)
        lt = self.local_tokens
        local = math.ceil(lt * budget) if isinstance(lt, float) else lt
        local = max(1, min(local, budget))  # the newest token is always attended
        sink = min(self.sink_tokens, max(0, budget - local))
        topk = max(0, budget - sink - local)
        return sink, local, topk
