"""Decode ms/token of dense vs eager pqpatch vs compiled pqpatch on an attention-bound model, as ratios from one run.

Model: the Llama-3-8B attention shape (32 query heads, 8 KV heads, head dim 128) with a small hidden size, MLP and
vocabulary, so that at long context the K/V read dominates a decode step. A 32K exact prefill takes many minutes on
a 2-core CPU, so the cache is *filled* instead: the prompt's real token ids go through the model with attention
outputs zeroed (`fill`), which writes real projections into the cache and starts k-means on them; the decode steps
timed afterwards are the real ones. Dense uses transformers' StaticCache filled the same way (same cache kind).
Each method's steps are timed in interleaved rounds; the minimum per-token time of each is reported.

    python benchmarks/bench_compile.py --lengths 8192 32768 [--threads 1] [--steps 8] [--rounds 3]
    python benchmarks/bench_compile.py --device cuda --mode reduce-overhead --lengths 32768 --layers 4   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pqpatch  # noqa: E402
from pqpatch.cache import PQCache  # noqa: E402


def build_model(layers: int, max_pos: int, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max_pos)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(device)
    model.generation_config.pad_token_id = 0
    return model


def _zero_prefill(fn):
    """An attention function that returns zeros for multi-token inputs (the fill) and calls fn otherwise."""

    def attn(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] > 1:
            return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    return attn


@contextlib.contextmanager
def fill_mode():
    """Zero the attention of multi-token steps for both the dense (sdpa) and the patched (pqcache) paths."""
    import pqpatch.attention as pa
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    old_pq = pa.sdpa_attention_forward
    pa.sdpa_attention_forward = _zero_prefill(old_pq)
    AttentionInterface.register("bench_fill", _zero_prefill(sdpa_attention_forward))
    try:
        yield
    finally:
        pa.sdpa_attention_forward = old_pq


@torch.no_grad()
def filled_cache(model, n: int, new: int, patched: bool):
    """A cache holding n real-token positions (module doc), with room for `new` decode steps."""
    from transformers import StaticCache

    ids = torch.randint(1, model.config.vocab_size, (1, n), device=model.device)
    if patched:
        cache = PQCache(model, max_cache_len=n + new)
        with fill_mode():
            model(ids, cache=cache, logits_to_keep=1)
        cache.sync()  # k-means waits here, before any timed step
    else:
        cache = StaticCache(config=model.config, max_cache_len=n + new)
        old = model.config._attn_implementation
        with fill_mode():
            model.set_attn_implementation("bench_fill")
            try:
                model(ids, cache=cache, logits_to_keep=1)
            finally:
                model.set_attn_implementation(old)
    return cache


@torch.no_grad()
def time_steps(step, cache, steps: int) -> float:
    """Seconds per decode step over `steps` steps of `step(token, cache)` (the cache is rewound afterwards)."""
    tok = torch.ones(1, 1, dtype=torch.long, device=cache.layers[0].device)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(tok, cache)
    _sync()
    dt = (time.perf_counter() - t0) / steps
    cache.crop(-steps)
    return dt


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(n: int, steps: int, rounds: int, layers: int, budget: float, backend: str = "auto", device: str = "cpu",
        mode: str | None = None) -> dict:
    model = build_model(layers, n + 64, device)
    dense_cache = filled_cache(model, n, steps + 1, patched=False)
    eager_step = lambda t, c: model(t, cache=c)  # noqa: E731
    compiled = torch.compile(lambda t, c: model(t, cache=c), fullgraph=True, dynamic=False, mode=mode)
    times = {"dense": [], "dense_compiled": []}
    for _ in range(2):  # warm-up: compile the dense graph
        compiled(torch.ones(1, 1, dtype=torch.long, device=device), dense_cache)
    dense_cache.crop(-2)
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=budget, backend=backend))
    pq_cache = filled_cache(model, n, steps + 1, patched=True)
    compiled_pq = torch.compile(lambda t, c: model(t, cache=c), fullgraph=True, dynamic=False, mode=mode)
    for _ in range(2):
        compiled_pq(torch.ones(1, 1, dtype=torch.long, device=device), pq_cache)
    pq_cache.crop(-2)
    times.update(pq_eager=[], pq_compiled=[])
    for _ in range(rounds):  # interleaved rounds, same process
        pqpatch.unpatch_model(model)
        times["dense"].append(time_steps(eager_step, dense_cache, steps))
        times["dense_compiled"].append(time_steps(compiled, dense_cache, steps))
        pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=budget, backend=backend))
        times["pq_eager"].append(time_steps(eager_step, pq_cache, steps))
        times["pq_compiled"].append(time_steps(compiled_pq, pq_cache, steps))
    pqpatch.unpatch_model(model)
    best = {k: min(v) * 1e3 for k, v in times.items()}
    return {"context": n, "ms_per_token": best,
            "ratio_vs_dense": {k: v / best["dense"] for k, v in best.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--out", default="results/bench_compile.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # inference: the pqpatch ops have no autograd formula
    rows = [run(n, args.steps, args.rounds, args.layers, args.budget, args.backend, args.device, args.mode)
            for n in args.lengths]
    print(f"{'context':>8} | " + " | ".join(f"{k:>15}" for k in rows[0]["ms_per_token"]))
    for r in rows:
        cells = [f"{v:8.2f} ({r['ratio_vs_dense'][k]:.2f}x)" for k, v in r["ms_per_token"].items()]
        print(f"{r['context']:>8} | " + " | ".join(f"{c:>15}" for c in cells))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "budget": args.budget, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
