"""Decode benchmark: time per output token and peak GPU memory of a Llama-3-8B-shaped random model.

Methods (each measured in the same run, so ratios are fair):
    dense       transformers' default (GPU-resident dynamic) cache, unpatched model
    hf_offload  transformers' own DynamicCache(offloading=True) (CUDA only)
    pq          pqpatch, KV resident on the GPU
    pq_offload  pqpatch with offload=True (KV in pinned host memory, GPU block cache)
Time per output token = (time of generate(T new) - time of generate(2 new)) / (T - 2): the prefill and the first
decode step (which waits for the last layers' k-means) cancel; the first step is reported as first_decode_s.
Between calls the model's clustering pool is drained (untimed), so no k-means job of one call (a warm-up, or a
1-token call that ends before its jobs do) runs during the next timed call. speedup_vs_hf_offload is reported on
the offloaded pqpatch rows only (the like-for-like comparison). Exit status 1 if any row failed.

    python benchmarks/bench_decode.py                      # GPU: 32K and 128K, batch 1 and 4
    python benchmarks/bench_decode.py --smoke              # CPU: tiny model, seconds (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

METHODS = ("dense", "hf_offload", "pq", "pq_offload")


def build_model(layers: int, smoke: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    else:  # Llama-3-8B shape
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 64,
                          rope_theta=500000.0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def drain_clustering(model, timeout_s: float = 600.0) -> None:
    """Wait (untimed) until the patched model's k-means pool has no job left; no-op for an unpatched model.
    Reaches into the patch state: pqpatch has no public drain API yet."""
    state = getattr(model, "_pqpatch", None)
    pool = getattr(state, "pool", None)
    if pool is not None and not pool.drain(timeout=timeout_s):
        raise RuntimeError(f"k-means jobs still running after {timeout_s:.0f} s")


def time_generate(model, ids, new: int, device: str, cache_factory=None) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    if cache_factory is not None:
        kw["past_key_values"] = cache_factory()
    drain_clustering(model)  # nothing of an earlier call may run inside this one's timing
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    _sync(device)
    elapsed = time.perf_counter() - t0
    drain_clustering(model)
    return elapsed


def measure(model, method: str, ids, new: int, budget: float, device: str) -> dict:
    import pqpatch

    factory = None
    if method == "hf_offload":
        from transformers import DynamicCache

        factory = lambda: DynamicCache(config=model.config, offloading=True)  # noqa: E731
    if method.startswith("pq"):
        pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=budget, offload=method == "pq_offload"))
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        time_generate(model, ids, 2, device, factory)  # warm-up: allocator, kernels, pool threads
        t1 = time_generate(model, ids, 1, device, factory)
        t2 = time_generate(model, ids, 2, device, factory)
        tn = time_generate(model, ids, new, device, factory)
        # the first decode step also waits for the last layers' k-means: reported apart, not in ms/token
        row = {"ms_per_token": 1000 * (tn - t2) / (new - 2), "prefill_s": t1, "first_decode_s": t2 - t1}
        row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        if method.startswith("pq"):
            st = pqpatch.stats(model)
            row.update(gpu_kv_mib=st.gpu_kv_bytes / 2**20, dense_kv_mib=st.dense_kv_bytes / 2**20,
                       hit_rate=st.hit_rate, h2d_kib_per_layer_step=st.bytes_h2d_per_step / 1024)
    except torch.cuda.OutOfMemoryError:
        row = {"error": "out of GPU memory"}
    except Exception as e:  # one broken method must not hide the others' numbers
        row = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    finally:
        if method.startswith("pq"):
            pqpatch.unpatch_model(model)
    return row


def run(argv: list[str] | None = None) -> list[dict]:
    """Measure and print; returns the rows (a failed method has an "error" field instead of timings)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (fewer = faster run; per-layer cost)")
    ap.add_argument("--new-tokens", type=int, default=16, help=">= 3")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, for tests")
    ap.add_argument("--out", default="results/bench_decode.json")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        a.contexts, a.batches, a.layers, a.new_tokens = "1536", "1", 2, 10
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(a.layers, a.smoke, device, dtype)
    methods = [m for m in a.methods.split(",") if device == "cuda" or m != "hf_offload"]
    rows = []
    for n in (int(x) for x in a.contexts.split(",")):
        for b in (int(x) for x in a.batches.split(",")):
            ids = torch.randint(1, model.config.vocab_size, (b, n), device=device)
            base = None
            for m in methods:
                row = {"context": n, "batch": b, "method": m, **measure(model, m, ids, a.new_tokens, a.budget, device)}
                if m == "hf_offload" and "ms_per_token" in row:
                    base = row["ms_per_token"]
                rows.append(row)
            for row in rows[-len(methods):]:
                if base and row["method"] == "pq_offload" and "ms_per_token" in row:
                    row["speedup_vs_hf_offload"] = base / row["ms_per_token"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nbench_decode on {name}: {a.layers} layers, budget {a.budget}, {a.new_tokens} new tokens")
    print(f"{'ctx':>7} {'B':>2} {'method':<11} {'ms/tok':>8} {'1st step s':>10} {'peak GiB':>9} {'GPU KV MiB':>11} "
          f"{'hit':>6} {'x hf_off':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>7} {r['batch']:>2} {r['method']:<11} {r['error']}")
            continue
        pk = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        kv = f"{r['gpu_kv_mib']:.1f}" if "gpu_kv_mib" in r else "-"
        hit = f"{r['hit_rate']:.0%}" if r["method"] == "pq_offload" else "-"
        sp = f"{r['speedup_vs_hf_offload']:.2f}" if "speedup_vs_hf_offload" in r else "-"
        print(f"{r['context']:>7} {r['batch']:>2} {r['method']:<11} {r['ms_per_token']:>8.2f} "
              f"{r['first_decode_s']:>10.3f} {pk:>9} {kv:>11} {hit:>6} {sp:>8}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": name, "layers": a.layers, "rows": rows}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 if every row measured, 1 if any failed (gpu_check.py reports the step as failed)."""
    failed = [r for r in run(argv) if "error" in r]
    for r in failed:
        print(f"FAILED: ctx={r['context']} B={r['batch']} {r['method']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
