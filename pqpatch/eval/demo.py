"""`pqpatch demo`: a pass key hidden in a long prompt, answered by dense decoding and by the patched model.

Both answers come from plain `model.generate()`: once unpatched, once after `pqpatch.patch_model`. The
decode time per token is measured inside generate() by a logits processor that timestamps every step, so the
prefill is left out of it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from .. import kernels
from ..patch import head_dim_of

__all__ = ["DemoPlan", "prepare_demo", "run_demo", "kv_memory"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


class _StepClock:
    """A transformers LogitsProcessor that records when each generation step's logits arrive. After the first
    (the prefill's) it switches torch to `decode_threads` intra-op threads (see `engine.threads`: batch-1 decode
    on a shared CPU is faster and far steadier with one thread); the caller restores the old count."""

    def __init__(self, decode_threads: int | None) -> None:
        self.times: list[float] = []
        self.decode_threads = decode_threads

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.times and self.decode_threads:
            torch.set_num_threads(self.decode_threads)
        self.times.append(time.perf_counter())
        return scores


@dataclass
class GenResult:
    text: str
    prefill_s: float
    s_per_token: float
    cache: object = None  # the PQCache of a patched run (None for dense)


def _generate(model, ids: torch.Tensor, max_new_tokens: int, tokenizer, decode_threads: int | None) -> GenResult:
    from transformers import LogitsProcessorList

    clock = _StepClock(decode_threads if ids.device.type == "cpu" else None)
    old_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
            )
        state = getattr(model, "_pqpatch", None)  # the output holds the PQ cache, so its weak reference is alive
        cache = state.last_cache if state is not None else None
    finally:
        torch.set_num_threads(old_threads)
    t = clock.times
    spt = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan")  # step i+1's logits - step i's
    text = tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
    return GenResult(text, t[0] - t0 if t else float("nan"), spt, cache)


def kv_memory(model, cache) -> dict[str, int]:
    """Bytes of KV state for the context `cache` was built for (prompt + new tokens).

    dense_global: K+V of every token in the global-attention (PQ) layers; sliding: K+V of the sliding-window
    layers (the same with or without the patch); pq_codes / pq_centroids: the PQ index of the global layers;
    pq_attended: K+V of the tokens one decode step attends to in the global layers (sink + top-k + window);
    pq_rerank: keys one step reads to re-rank its shortlist beyond the attended ones (rerank x top-k per KV head;
    (rerank - 1) x top-k on the CPU backend, whose fused path reuses the top-k's keys; 0 without re-ranking), plus
    the worst-coded keys joined to the shortlist (`rerank_outliers`; an upper bound: those the codes shortlist
    anyway are read once).
    """
    text = model.config.get_text_config(decoder=True)
    d = head_dim_of(model.config)
    hkv = text.num_key_value_heads
    elem = next(model.parameters()).element_size()
    layers = cache.pq_layers()
    # the context the cache is for (its buffers may be a little longer: a shape bucket, pqpatch.cache.bucket_length)
    n = layers[0].context_len if layers else max(layer.max_cache_len for layer in cache.layers)
    per_tok = 2 * hkv * d * elem  # K and V
    window = getattr(text, "sliding_window", None) or n
    num_sliding = text.num_hidden_layers - len(layers)
    out = {
        "dense_global": len(layers) * n * per_tok,
        "sliding": num_sliding * min(window, n) * per_tok,
        "pq_codes": 0, "pq_centroids": 0, "pq_attended": 0, "pq_rerank": 0,
    }
    for layer in layers:
        if layer.codes is not None:
            out["pq_codes"] += layer.codes.numel() * layer.codes.element_size()
            out["pq_centroids"] += layer.centroids.numel() * layer.centroids.element_size()
        out["pq_attended"] += (layer.sink + layer.topk + layer.local) * per_tok
        r = layer.cfg.rerank_factor
        if layer.cfg.selection == "pq" and r > 1:
            # exact keys of the shortlist; the CPU path (kernels.rerank_attention) reuses the top-k's keys for the
            # attention, so only (r - 1) x top-k of them are reads the attended K/V does not already count
            fused = kernels.resolve_backend(layer.cfg.backend, layer.keys.device) == "cpu"
            extra = layer.cfg.outlier_slots(layer.context_len)
            out["pq_rerank"] += ((r - 1 if fused else r) * layer.topk + extra) * hkv * d * elem
    return out


@dataclass
class DemoPlan:
    """Everything the demo decodes, checked before any decoding: the loaded model, its prompt and config."""

    model: object
    tokenizer: object
    sample: object  # tasks.Sample
    config: object  # PQCacheConfig
    fields: dict  # the PQCacheConfig fields besides token_budget, as printed
    budget: float | int
    depth: float


def prepare_demo(
    model, tokenizer, length: int = 8192, budget: float | int = 0.2, depth: float = 0.5, seed: int = 0,
    **config_fields,
) -> DemoPlan:
    """Build the prompt and the PQCacheConfig for `model`. Raises ValueError (a prompt too short for the
    pass key, a bad config field, num_subspaces not dividing the head dim) before anything is decoded."""
    import pqpatch

    from .tasks import HFCodec, passkey_sample

    sample = passkey_sample(HFCodec(tokenizer), length, depth, seed=seed)
    hd = head_dim_of(model.config)
    cfg = pqpatch.PQCacheConfig(token_budget=budget, **config_fields)  # the library defaults unless overridden
    config_fields = {"quantizer": cfg.quantizer, "num_subspaces": cfg.num_subspaces, "bits": cfg.bits,
                     **config_fields}  # printed
    if cfg.quantizer == "pq" and hd % cfg.num_subspaces:
        raise ValueError(f"num_subspaces={cfg.num_subspaces} does not divide the model's head dim {hd}")
    return DemoPlan(model, tokenizer, sample, cfg, config_fields, budget, depth)


def run_demo(
    model_name: str | None = None, length: int = 8192, budget: float | int = 0.2, max_new_tokens: int = 8,
    depth: float = 0.5, seed: int = 0, decode_threads: int | None = 1, plan: DemoPlan | None = None,
    **config_fields,
) -> dict:
    """Run the demo and print its report to stdout (progress to stderr). Returns the numbers it printed.

    config_fields: further `PQCacheConfig` fields (num_subspaces, bits, ...); unless given, the library
    defaults (see docs/results.md for how they were chosen).
    plan: a `prepare_demo` result (the model is loaded already; the other prompt and config arguments are
    ignored)."""
    import pqpatch

    from ..models import load_default_model, load_model
    from .tasks import score_answer

    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    t_all = time.perf_counter()
    if plan is None:
        _say("[1/4] loading the model ...")
        model, tok = load_default_model() if model_name is None else load_model(model_name)
        plan = prepare_demo(model, tok, length, budget, depth, seed, **config_fields)
    model, tok, sample, cfg = plan.model, plan.tokenizer, plan.sample, plan.config
    budget, depth, config_fields = plan.budget, plan.depth, plan.fields
    ids = torch.tensor([sample.ids], device=model.device)
    key = sample.answers[0]
    _say(f"      prompt: {ids.shape[1]} tokens of prose, pass key {key} at depth {depth:.0%}")

    _say("[2/4] dense decoding (unpatched model.generate) ...")
    t = time.perf_counter()
    dense = _generate(model, ids, max_new_tokens, tok, decode_threads)
    _say(f"      done in {time.perf_counter() - t:.1f} s (prefill {dense.prefill_s:.1f} s)")

    extra = "".join(f", {k}={v}" for k, v in config_fields.items())
    _say(f"[3/4] patched decoding (pqpatch.patch_model, token_budget={budget}{extra}) ...")
    pqpatch.patch_model(model, cfg)
    try:
        t = time.perf_counter()
        pq = _generate(model, ids, max_new_tokens, tok, decode_threads)
        _say(f"      done in {time.perf_counter() - t:.1f} s (prefill {pq.prefill_s:.1f} s)")
        mem = kv_memory(model, pq.cache)
        split = [(x.sink, x.topk, x.local) for x in pq.cache.pq_layers()][:1]
        pq.cache = None  # release the K/V
    finally:
        pqpatch.unpatch_model(model)
    _say("[4/4] report")

    ok_dense, ok_pq = score_answer(dense.text, [key]) == 1.0, score_answer(pq.text, [key]) == 1.0
    pq_index = mem["pq_codes"] + mem["pq_centroids"]
    reads = pq_index + mem["pq_attended"] + mem["pq_rerank"]
    lines = [
        f"pass key: {key}   prompt: {ids.shape[1]} tokens   budget: {budget}{extra}"
        + (f" (sink/top-k/window = {split[0][0]}/{split[0][1]}/{split[0][2]} tokens)" if split else ""),
        f"  dense  : {dense.text.strip()!r:28} {'correct' if ok_dense else 'WRONG'}   "
        f"{dense.s_per_token * 1e3:.0f} ms/token",
        f"  pqpatch: {pq.text.strip()!r:28} {'correct' if ok_pq else 'WRONG'}   {pq.s_per_token * 1e3:.0f} ms/token",
        f"KV memory of the global-attention layers ({str(next(model.parameters()).dtype).replace('torch.', '')}):",
        f"  dense K/V: {_mib(mem['dense_global'])}  (every step reads all of it)",
        f"  PQ index : {_mib(pq_index)}  (codes {_mib(mem['pq_codes'])} + centroids {_mib(mem['pq_centroids'])})",
        f"  PQ attended K/V per step: {_mib(mem['pq_attended'])}"
        + (f" + re-rank keys {_mib(mem['pq_rerank'])}" if mem["pq_rerank"] else "")
        + f"  -> a step reads {_mib(reads)} = {reads / max(mem['dense_global'], 1):.0%} of dense",
        f"  (the full K/V stays resident unless PQCacheConfig(offload=True); sliding-window layers: "
        f"{_mib(mem['sliding'])} either way)",
        f"total demo time: {time.perf_counter() - t_all:.0f} s",
    ]
    print("\n".join(lines))
    return {"key": key, "prompt_tokens": ids.shape[1], "dense": dense, "pq": pq, "dense_correct": ok_dense, "pq_correct": ok_pq, "memory": mem}
