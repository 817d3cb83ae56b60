"""Worker of tests/test_tp.py, run under torchrun on CPU (gloo):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py OUT MODEL_DIR...

For every tiny saved model: load it tensor-parallel (`from_pretrained(tp_plan="auto")`), generate greedily
unpatched, patched at budget 1.0, patched at a partial budget (recording each PQ layer's selection, scores, codes
and codebook at every decode step through `cache.add_observer`), the same with `offload=True`, and once more with
the head offsets dropped
(what pqpatch did before it seeded k-means by global KV head: the test's proof that it can fail). The ranks'
records are gathered on rank 0, which then runs the single-process patched model on the same prompts and
writes everything to OUT/<model name>.pt for the test to compare. Rank 0 also writes OUT/meta.pt.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a source checkout without `pip install -e`

import pqpatch  # noqa: E402
from pqpatch.kernels.quality import residual_query  # noqa: E402
from pqpatch.kernels.reference import pq_scores_ref  # noqa: E402

PROMPT, PAD, NEW, BUDGET = 1500, 200, 8, 0.1


def prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of 2: a PROMPT-token row and a row left-padded by PAD. Returns (input_ids, attention_mask) [2, PROMPT]."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids, mask


def recorder(records: list) -> callable:
    """Observer fn(layer, query [B, Hkv, G, D], idx [B, Hkv, S], scaling) keeping, per PQ layer and decode step:
    the top-k part of idx, the group score through the codes of every position [B, Hkv, N], the codes
    [B, Hkv, N, m] and the centroids [B, Hkv, m, K, Ds] (Ds = D / m for "pq", D for "residual"'s m stages; all for
    this process's KV heads)."""

    def observe(layer, query, idx, scaling):
        lo = layer.start + layer.sink
        hi = (layer.cumulative_length - layer.split_n[1]).expand_as(lo)
        if layer.cfg.quantizer == "residual":  # stage s scores as PQ sub-space s under the query repeated m times
            query = residual_query(query, layer.centroids.shape[2])
        scores = pq_scores_ref(query, layer.centroids, layer.codes, lo, hi, scaling)
        s = layer.sink_slots
        records.append({
            "layer": layer.layer_idx, "top": idx[..., s : s + layer.topk_slots].clone(), "idx": idx.clone(),
            "scores": scores, "codes": layer.codes.clone(), "centroids": layer.centroids.clone(),
            "lo": lo.clone(), "hi": hi.clone(),
        })

    return observe


def run(model, ids, mask, config: pqpatch.PQCacheConfig | None, drop_offsets: bool = False) -> dict:
    """Greedy generate; patched under `config` unless None. Returns tokens [2, NEW], records, pool threads."""
    records: list = []
    threads = None
    if config is not None:
        pqpatch.patch_model(model, config)
        state = model._pqpatch
        threads = state.pool.num_threads
        if drop_offsets:
            state.kv_head_offsets = {}
        from pqpatch.cache import PQCache, bucket_length

        # what generate() itself builds (an offloaded cache cannot be resized to the bucket afterwards)
        cache = PQCache(model, max_cache_len=bucket_length(PROMPT + NEW), context_len=PROMPT + NEW)
        cache.add_observer(recorder(records))
        kwargs = {"cache": cache}
    else:
        kwargs = {}
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kwargs)
    finally:
        if config is not None:
            pqpatch.unpatch_model(model)
    return {"tokens": out[:, PROMPT:].clone(), "records": records, "threads": threads}


def gather_heads(records: list) -> list:
    """Rank 0: the ranks' records joined along the KV-head dim (dim 1) in rank order; None elsewhere."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, records)
    if dist.get_rank():
        return None
    joined = []
    for recs in zip(*parts):
        r = dict(recs[0])
        for key in ("top", "idx", "scores", "codes", "centroids"):
            r[key] = torch.cat([x[key] for x in recs], dim=1)
        joined.append(r)
    return joined


def main() -> None:
    from transformers import AutoModelForCausalLM

    out_dir, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    # the library's quantizer (residual): its codebooks must reproduce under TP's rounding differences
    # (test_tp.py::test_residual_codebook_is_stable_under_rounding)
    cfg = pqpatch.PQCacheConfig(token_budget=BUDGET, sink_tokens=8)
    full = pqpatch.PQCacheConfig(token_budget=1.0, sink_tokens=8)  # the default quantizer
    for path in paths:
        tp = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
        ids, mask = prompts(tp.config.vocab_size)
        result = {"dense_tp": run(tp, ids, mask, None), "full_tp": run(tp, ids, mask, full)}
        pq = run(tp, ids, mask, cfg)
        bug = run(tp, ids, mask, cfg, drop_offsets=True)
        off = run(tp, ids, mask, dataclasses.replace(cfg, offload=True))
        for name, r in (("pq_tp", pq), ("bug_tp", bug), ("offload_tp", off)):
            r["records"] = gather_heads(r["records"])
            result[name] = r
        del tp
        if rank == 0:  # the single-process reference, on the same host and thread settings
            single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            result["dense_single"] = run(single, ids, mask, None)
            result["pq_single"] = run(single, ids, mask, cfg)
            # offload never re-ranks (rerank=None resolves to 1 there): its single-process reference does not either
            result["pq_single_r1"] = run(single, ids, mask, dataclasses.replace(cfg, rerank=1))
            torch.save(result, out_dir / f"{path.name}.pt")
        dist.barrier()
    if rank == 0:
        torch.save({"world": dist.get_world_size(), "local_world": int(os.environ["LOCAL_WORLD_SIZE"])},
                   out_dir / "meta.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
