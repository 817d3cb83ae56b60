"""The evaluation grid: prefill once per (length, depth, variant), decode a fork per (method, budget).

Retrieval tasks ("passkey", "niah") record one greedy answer per fork; the teacher-forced tasks ("kl",
"recall") feed the last `teacher_tokens` tokens of a long document in decode mode and record next-token KL and
top-1 agreement against the dense fork plus per-layer attention recall (`metrics`). Both teacher-forced tasks
come out of the same decode pass, so `tasks=("kl", "recall")` costs the same as either one alone.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from .engine import (
    RecallProbe, blockwise_prefill, greedy_decode, method_config, parse_method, prefill, teacher_forced, threads,
)
from .metrics import kl_divergence, top1_agreement
from .tasks import NIAH_VARIANTS, Codec, niah_sample, passkey_sample, score_answer

__all__ = ["TASKS", "METHODS", "EvalSettings", "format_length", "machine_info", "preflight", "run_eval"]

TASKS = ("passkey", "niah", "kl", "recall")
METHODS = ("dense", "pq", "oracle", "streaming", "quest", "snapkv")


@dataclass
class EvalSettings:
    """One evaluation grid. budgets are `PQCacheConfig.token_budget` values; `base` holds the other
    PQCacheConfig fields (sink_tokens, bits, min_context, ...)."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
    budgets: tuple[float | int, ...] = (0.05, 0.1, 0.2)
    methods: tuple[str, ...] = METHODS
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    variants: tuple[str, ...] = NIAH_VARIANTS
    teacher_tokens: int = 32
    seed: int = 0
    # Repeated cells (mean and spread in the report): every prompt seed is its own prompt/document and prefill
    # (None: just `seed`); every k-means seed offset is one more fork of each prefill for the methods that train
    # a codebook (the offset is added to the config's seed). One-prompt, one-seed cells are noisy: with m=2, b=6
    # the recall of one prompt swung from 0.32 to 0.85 across k-means seeds.
    seeds: tuple[int, ...] | None = None
    kmeans_seeds: tuple[int, ...] = (0,)
    base: dict = field(default_factory=dict)
    blockwise_prefill: bool = True
    decode_threads: int | None = 1  # intra-op threads while decoding (see engine.threads); None: unchanged

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks or (set(self.tasks) & {"passkey", "niah"} and len(self.tasks) > 1):
            raise ValueError(f"tasks: one of {TASKS[:2]}, or any of ('kl', 'recall'); got {self.tasks}")
        if any(parse_method(m)[0] not in METHODS for m in self.methods):
            raise ValueError(f"methods must be among {METHODS} (optionally with :field=value), got {self.methods}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be distinct prompt seeds, got {self.seeds}")
        if not self.kmeans_seeds or len(set(self.kmeans_seeds)) != len(self.kmeans_seeds) or any(
                not isinstance(k, int) or k < 0 for k in self.kmeans_seeds):
            raise ValueError(f"kmeans_seeds must be distinct ints >= 0, got {self.kmeans_seeds}")
        if any(v not in NIAH_VARIANTS for v in self.variants):
            raise ValueError(f"variants must be among {NIAH_VARIANTS}, got {self.variants}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")
        if not self.lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {self.lengths}")
        if self.decode_threads is not None and (not isinstance(self.decode_threads, int) or self.decode_threads < 1):
            raise ValueError(f"decode_threads must be None or an int >= 1, got {self.decode_threads!r}")
        t = self.teacher_tokens
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise ValueError(f"teacher_tokens must be an int >= 1, got {t!r}")
        if self.tasks[0] in ("kl", "recall") and t > min(self.lengths) - 2:
            # the document's last t tokens are fed one by one; at least 2 must remain as the prompt
            raise ValueError(
                f"teacher_tokens={t} leaves no prompt in the shortest document ({min(self.lengths)} tokens): use "
                f"at most {max(min(self.lengths) - 2, 0)} or longer --lengths"
            )
        for m in self.methods:  # fail fast on a budget or field PQCacheConfig rejects
            for b in self.budgets:
                method_config(m, b, self.base)

    def forks(self) -> list[tuple[str, float | int | None]]:
        """(method, budget) of every decode run of one prefill; dense runs once (budget None)."""
        return [(m, None) for m in self.methods if m == "dense"] + [
            (m, b) for m in self.methods if m != "dense" for b in self.budgets
        ]

    def prompt_seeds(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (self.seed,)

    def fork_seeds(self, method: str, budget) -> tuple[int | None, ...]:
        """k-means seed offsets a (method, budget) fork runs under: every `kmeans_seeds` entry for a method that
        trains a codebook, (None,) for the others (their result does not depend on it)."""
        cfg = method_config(method, budget, self.base) if budget is not None else None
        if cfg is None or cfg.selection != "pq":
            return (None,)
        return self.kmeans_seeds


def format_length(n: int) -> str:
    """2048 -> "2k", 1500 -> "1500"."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def machine_info() -> dict:
    """Versions and machine facts recorded with every result. "kmeans": the trainer that built the PQ
    codebooks ("faiss <version>" or "torch", the fallback without faiss-cpu: it samples and seeds differently,
    so results depend on it)."""
    import transformers

    from ..codebook import kmeans_trainer

    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "kmeans": kmeans_trainer(),
    }


def preflight(model: torch.nn.Module, codec: Codec, settings: EvalSettings) -> None:
    """Checks that need the model or tokenizer, done before any heavy work; raises ValueError.

    The PQ codebook must fit the model's head dim, and the shortest prompt of every retrieval variant must
    have room for its instruction, needles and question (samples are built at the shortest length only).
    """
    from ..config import PQCacheConfig
    from ..patch import head_dim_of

    m = settings.base.get("num_subspaces", PQCacheConfig.num_subspaces)
    quantizer = settings.base.get("quantizer", PQCacheConfig.quantizer)
    hd = head_dim_of(model.config)
    if quantizer == "pq" and hd % m:  # residual stages each span the whole head dim
        divisors = [x for x in range(1, hd + 1) if hd % x == 0]
        raise ValueError(
            f"num_subspaces={m} does not divide the model's head dim {hd}; choose one of {divisors} "
            f"(the default, 2, divides every usual head dim)"
        )
    shortest = min(settings.lengths)
    if settings.tasks[0] == "passkey":
        passkey_sample(codec, shortest, settings.depths[0], seed=settings.seed)
    elif settings.tasks[0] == "niah":
        for v in settings.variants:
            niah_sample(codec, shortest, settings.depths[0], v, seed=settings.seed)


def _units(s: EvalSettings) -> list[tuple]:
    """(length, depth, variant, prompt seed) of every prefill."""
    seeds = s.prompt_seeds()
    if s.tasks[0] == "passkey":
        return [(L, d, "passkey", z) for z in seeds for L in s.lengths for d in s.depths]
    if s.tasks[0] == "niah":
        return [(L, d, v, z) for z in seeds for v in s.variants for L in s.lengths for d in s.depths]
    return [(L, None, "document", z) for z in seeds for L in s.lengths]


def run_eval(
    model: torch.nn.Module, codec: Codec, settings: EvalSettings, progress: bool = True, check: bool = True
) -> dict:
    """Run the grid on `model` (patched here if it is not already; unpatched afterwards in that case).

    check: run `preflight` first (the CLI runs it itself, to turn its errors into usage errors).
    Returns {"settings", "machine", "records", "wall_s"}: one record per (unit, method, budget).
    """
    import pqpatch
    from tqdm.auto import tqdm

    if check:
        preflight(model, codec, settings)

    own_patch = getattr(model, "_pqpatch", None) is None
    if own_patch:
        pqpatch.patch_model(model, pqpatch.PQCacheConfig(**settings.base))
    t_start = time.perf_counter()
    units = _units(settings)
    forks = [(m, b, k) for m, b in settings.forks() for k in settings.fork_seeds(m, b)]
    bar = tqdm(total=len(units) * (1 + len(forks)), disable=not progress, file=sys.stderr, unit="run")
    records: list[dict] = []
    try:
        for length, depth, variant, seed in units:
            tag = f"{'+'.join(settings.tasks) if variant == 'document' else variant} {format_length(length)}" + (
                f" depth={depth:.2f}" if depth is not None else ""
            ) + (f" seed={seed}" if len(settings.prompt_seeds()) > 1 else "")
            if variant == "document":
                recs = _teacher_unit(model, codec, settings, length, forks, bar, tag, seed)
            else:
                recs = _retrieval_unit(model, codec, settings, length, depth, variant, forks, bar, tag, seed)
            for r in recs:
                r["seed"] = seed
            records += recs
    finally:
        bar.close()
        if own_patch:
            pqpatch.unpatch_model(model)
    return {
        "settings": asdict(settings), "machine": machine_info(), "records": records,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def _prefill(model, ids, extra, settings, bar, tag):
    bar.set_description(f"{tag} | prefill {len(ids)} tok")
    t0 = time.perf_counter()
    if settings.blockwise_prefill:
        with blockwise_prefill(model):
            cache, logits = prefill(model, ids, extra)
    else:
        cache, logits = prefill(model, ids, extra)
    bar.update(1)
    return cache, logits, time.perf_counter() - t0


def _fork_tag(tag, method, budget, kseed) -> str:
    return f"{tag} | {method}" + (f" {budget}" if budget is not None else "") + (
        f" k-seed {kseed}" if kseed else "")


def _retrieval_unit(model, codec, settings, length, depth, variant, forks, bar, tag, seed) -> list[dict]:
    if variant == "passkey":
        sample = passkey_sample(codec, length, depth, seed=seed)
    else:
        sample = niah_sample(codec, length, depth, variant, seed=seed)
    cache, first, prefill_s = _prefill(model, sample.ids, sample.max_new_tokens, settings, bar, tag)
    out = []

    def answered(tokens: list[int]) -> bool:  # the answer line is over: later text is not scored anyway
        return "\n" in codec.decode(tokens).lstrip()

    for method, budget, kseed in forks:
        bar.set_description(_fork_tag(tag, method, budget, kseed))
        fork = cache.fork(method_config(method, budget, settings.base, kseed))
        with threads(settings.decode_threads):
            res = greedy_decode(model, fork, first, sample.max_new_tokens, codec.eos, done=answered)
        text = codec.decode(res.tokens)
        out.append({
            "task": sample.task, "variant": variant, "length": length, "prompt_tokens": len(sample.ids),
            "depth": depth, "method": method, "budget": budget, "kmeans_seed": kseed,
            "score": score_answer(text, sample.answers),
            "answers": sample.answers, "output": text, "s_per_token": res.seconds_per_token,
            "prefill_s": round(prefill_s, 2),
        })
        bar.update(1)
    return out


def _teacher_unit(model, codec, settings, length, forks, bar, tag, seed) -> list[dict]:
    from .tasks import document_ids

    t = settings.teacher_tokens
    ids = document_ids(codec, length, seed=seed)
    if t >= len(ids) - 1:
        raise ValueError(f"teacher_tokens={t} leaves no prompt in a {len(ids)}-token document")
    cache, _, prefill_s = _prefill(model, ids[:-t], t, settings, bar, tag)
    feed = ids[-t:]
    ref = None
    out = []
    # dense first: it is the reference every other fork is compared with
    order = sorted(forks, key=lambda f: f[0] != "dense")
    if order[0][0] != "dense":
        order.insert(0, ("dense", None, None))
    for method, budget, kseed in order:
        bar.set_description(_fork_tag(tag, method, budget, kseed))
        cfg = method_config(method, budget, settings.base, kseed)
        fork = cache.fork(cfg)
        probe = None
        if cfg is not None:
            # candidates: the split of the same budget under "pq" (streaming gives its top-k share to the window)
            probe = RecallProbe(fork, replace(cfg, selection="pq") if cfg.selection == "streaming" else cfg)
        with threads(settings.decode_threads):
            res = teacher_forced(model, fork, feed)
        logits = torch.stack(res.logits)  # [T, V]
        if ref is None:
            ref = logits
        kl = kl_divergence(ref, logits)
        rec = {
            "task": "teacher", "length": length, "prompt_tokens": len(ids) - t, "teacher_tokens": t,
            "method": method, "budget": budget, "kmeans_seed": kseed, "kl": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": top1_agreement(ref, logits).float().mean().item(), "s_per_token": res.seconds_per_token,
            "prefill_s": round(prefill_s, 2), "layers": _layer_summary(probe.rows if probe else []),
        }
        if (method, budget, kseed) in forks:
            out.append(rec)
            bar.update(1)
    return out


def _layer_summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean recall / coverage per layer over the decode steps (recall: NaN steps skipped)."""
    by: dict[int, list[dict]] = {}
    for r in rows:
        by.setdefault(r["layer"], []).append(r)
    out = {}
    for layer, rs in sorted(by.items()):
        rec = [r["recall"] for r in rs if not math.isnan(r["recall"])]
        out[str(layer)] = {
            "recall": sum(rec) / len(rec) if rec else float("nan"),
            "coverage": sum(r["coverage"] for r in rs) / len(rs), "steps": len(rs),
        }
    return out
