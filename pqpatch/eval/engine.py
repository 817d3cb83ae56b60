"""Evaluation engine: prefill once into a PQCache, then decode forks of it under every (method, budget).

- `prefill`: one exact forward pass over the prompt into a fresh `PQCache` (logits of the last position only:
  a 16K x 262K logit matrix would need 17 GB).
- `greedy_decode` / `teacher_forced`: decode-mode loops on a fork, timed per token.
- `RecallProbe`: a cache observer on every PQ layer of a fork, so each decode step's query and selected
  positions are scored (`metrics.selection_recall`) while the keys of that step are still in place.
- `blockwise_prefill`: a context manager that computes the prefill attention of sliding-window layers block by
  block. transformers hands those layers a dense [q, q] mask, so SDPA does the full quadratic work although a
  query sees only `sliding_window` keys; on Gemma-3 (15 of 18 layers sliding) this is most of the prefill time
  at 16K. The result is the same attention (exact, up to float summation order).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..config import PQCacheConfig
from .metrics import selection_recall

__all__ = [
    "prefill", "greedy_decode", "teacher_forced", "RecallProbe", "blockwise_prefill", "method_config", "parse_method",
    "threads",
]

BLOCK = 1024  # query rows per block in blockwise_prefill
_EVAL_ATTN = "pqcache_eval"


def parse_method(spec: str) -> tuple[str, dict]:
    """A method spec "name[:field=value[:field=value...]]" -> (name, {field: value}).

    Lets one grid compare variants of a selection on the same prefills, e.g. "pq:bits=6" against "pq:bits=8".
    Values are ints, floats, true/false or strings; field names must be `PQCacheConfig` fields.
    """
    from dataclasses import fields

    name, *parts = spec.split(":")
    known = {f.name for f in fields(PQCacheConfig)} - {"token_budget", "selection"}
    over: dict = {}
    for part in parts:
        key, eq, text = part.partition("=")
        if not eq or key not in known:
            raise ValueError(f"method {spec!r}: {part!r} is not field=value with a PQCacheConfig field "
                             f"(one of {sorted(known)})")
        over[key] = _parse_value(text)
    return name, over


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def method_config(method: str, budget: float | int, base: dict, kmeans_seed: int | None = None) -> PQCacheConfig | None:
    """The PQCacheConfig of `method` (a spec, see `parse_method`) at `budget` (None for "dense"); `base` holds the
    other fields. `kmeans_seed` (not None) replaces the config's k-means seed (repeated cells)."""
    name, over = parse_method(method)
    if name == "dense":
        return None
    fields = {**base, **over, "token_budget": budget, "selection": name}
    if kmeans_seed is not None:
        fields["seed"] = fields.get("seed", 0) + kmeans_seed
    return PQCacheConfig(**fields)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` intra-op threads (None: unchanged).

    Why: a batch-1 decode step is a chain of tiny ops; with several OpenMP threads each op waits for all of
    them, and on a busy machine (a core taken by another process) that wait costs milliseconds per op: we
    measured 1.5 s instead of 0.13 s per Gemma-3-270M step with 2 threads on 2 shared cores.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: list[int], extra_tokens: int):
    """Exact prefill of `ids` into a new PQCache of len(ids) + extra_tokens slots.

    Returns (cache, logits [V] float32 of the last prompt position). The model must be patched.
    """
    from ..cache import PQCache

    x = torch.tensor([ids], dtype=torch.long, device=model.device)
    cache = PQCache(model, max_cache_len=len(ids) + extra_tokens)
    out = model(x, logits_to_keep=1, **{model._pqpatch.cache_kwarg: cache})
    return cache, out.logits[0, -1].float()


@dataclass
class DecodeResult:
    tokens: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per step (teacher_forced only)
    seconds_per_token: float = float("nan")


@torch.no_grad()
def _step(model: torch.nn.Module, cache, token: int) -> torch.Tensor:
    x = torch.tensor([[token]], dtype=torch.long, device=model.device)
    return model(x, **{model._pqpatch.cache_kwarg: cache}).logits[0, -1].float()


def greedy_decode(
    model: torch.nn.Module,
    cache,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    stop: frozenset[int],
    done: Callable[[list[int]], bool] | None = None,
) -> DecodeResult:
    """Greedy generation on `cache` (a fork). The first token comes from the prefill logits; each further token
    costs one decode step. Stops at a token in `stop`, or once `done(tokens so far)` is true."""
    tok = int(first_logits.argmax())
    out, times = [tok], []
    while len(out) < max_new_tokens and tok not in stop and not (done and done(out)):
        t0 = time.perf_counter()
        tok = int(_step(model, cache, tok).argmax())
        times.append(time.perf_counter() - t0)
        out.append(tok)
    # the first step also waits for the fork's k-means; the median is the steady per-token cost
    spt = float(torch.tensor(times).median()) if times else float("nan")
    return DecodeResult(out, seconds_per_token=spt)


def teacher_forced(model: torch.nn.Module, cache, tokens: list[int]) -> DecodeResult:
    """Feed `tokens` one decode step at a time; keep each step's next-token logits ([V] float32)."""
    res, times = DecodeResult(list(tokens)), []
    for t in tokens:
        t0 = time.perf_counter()
        res.logits.append(_step(model, cache, t))
        times.append(time.perf_counter() - t0)
    res.seconds_per_token = float(torch.tensor(times).median()) if times else float("nan")
    return res


class RecallProbe:
    """Scores every decode step of every PQ layer of `cache` against the oracle at the same budget split.

    `reference` is the config whose (sink, local, top-k) split defines the candidates (for "streaming", the
    same budget under "pq"). Results: `rows`, one dict per (step, layer). Installed as a cache observer, so it
    sees each step's query and selection while the keys of that step are still in place.
    """

    def __init__(self, cache, reference: PQCacheConfig) -> None:
        self.rows: list[dict] = []
        self.splits = {
            layer.layer_idx: reference.budget_split(layer.context_len) for layer in cache.pq_layers()
        }
        cache.add_observer(self)

    def __call__(self, layer, query: torch.Tensor, idx: torch.Tensor, scaling: float) -> None:
        sink, local, topk = self.splits[layer.layer_idx]
        n = layer.length
        r = selection_recall(query, layer.keys, layer.start, n, sink, local, topk, idx, scaling)
        self.rows.append({"layer": layer.layer_idx, "step_length": n, **r})


def _blockwise_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """pqcache attention, except a long prefill of a sliding-window layer runs block by block (module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..attention import pqcache_attention_forward
    from ..cache import PQCache, PQLayer

    cache = getattr(module, "_pqpatch_cache", None)
    is_pq = isinstance(cache, PQCache) and isinstance(cache.layers[module.layer_idx], PQLayer)
    q_len = query.shape[2]
    if is_pq or not kwargs.get("sliding_window") or attention_mask is None or q_len <= BLOCK:
        return pqcache_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    outs = []
    for s in range(0, q_len, BLOCK):
        e = min(s + BLOCK, q_len)
        cols = allowed[:, :, s:e].any(dim=2).flatten(0, 1).any(dim=0).nonzero()  # key columns this block uses
        a, b = (int(cols.min()), int(cols.max()) + 1) if len(cols) else (0, 1)
        o, _ = sdpa_attention_forward(
            module, query[:, :, s:e], key[:, :, a:b], value[:, :, a:b], attention_mask[:, :, s:e, a:b],
            dropout, scaling, **kwargs,
        )
        outs.append(o)  # [B, block, H, Dv]
    layer = cache.layers[module.layer_idx] if isinstance(cache, PQCache) else None
    if getattr(layer, "prefilled", True) is False:  # what pqcache_attention_forward does after its own prefill
        layer.after_prefill(attention_mask, query.shape[0], key.shape[2])
    return torch.cat(outs, dim=1), None


@contextlib.contextmanager
def blockwise_prefill(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the patched `model` uses blockwise prefill attention on sliding-window layers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from ..attention import ATTN_NAME

    AttentionInterface.register(_EVAL_ATTN, _blockwise_attention)
    AttentionMaskInterface.register(_EVAL_ATTN, sdpa_mask)
    model.set_attn_implementation(_EVAL_ATTN)
    try:
        yield
    finally:
        model.set_attn_implementation(ATTN_NAME)
