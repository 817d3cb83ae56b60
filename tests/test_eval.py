"""The evaluation harness: metrics on constructed cases, prompt builders, and the grid end to end on a tiny
random model (seconds on a CPU)."""

import importlib.util
import json
import math
import re

import pytest
import torch
from conftest import tiny_model

from pqpatch.eval import engine
from pqpatch.eval.engine import blockwise_prefill, prefill
from pqpatch.eval.haystack import NEEDLE_KEYS, ProseGenerator
from pqpatch.eval.metrics import kl_divergence, selection_recall, top1_agreement
from pqpatch.eval.report import summary_markdown, write_outputs
from pqpatch.eval.runner import EvalSettings, format_length, run_eval
from pqpatch.eval.tasks import CharCodec, document_ids, niah_sample, passkey_sample, score_answer

BASE = dict(min_context=64, sink_tokens=4, quest_page_tokens=4)
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None  # plots are skipped (with a warning) without it


# ---- metrics -----------------------------------------------------------------------------------------------
def test_kl_of_identical_distributions_is_zero():
    x = torch.randn(5, 50)
    assert torch.allclose(kl_divergence(x, x), torch.zeros(5), atol=1e-7)
    assert torch.allclose(kl_divergence(x, x + 3.0), torch.zeros(5), atol=1e-6)  # a shift is the same dist
    assert top1_agreement(x, x).all()


def test_kl_is_positive_and_matches_the_definition():
    p, q = torch.randn(3, 10), torch.randn(3, 10)
    kl = kl_divergence(p, q)
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    assert torch.allclose(kl, (lp.exp() * (lp - lq)).sum(-1), atol=1e-5)
    assert (kl > 0).all()


def _case(n=200, d=16, g=2, seed=0):
    torch.manual_seed(seed)
    return torch.randn(1, 1, g, d), torch.randn(1, 1, n, d), torch.zeros(1, dtype=torch.long)


def _hand_case():
    """Two query heads of one KV head whose softmax over the candidates [2, 8) is set by hand.

    keys[n] = (ln pA[n], ln pB[n]) and the queries are the unit vectors, so with scaling 1 head A's logits are
    ln pA (its softmax over C is pA) and head B's are ln pB. Sink 2 and window 2 of N = 10 leave C = [2, 8).
    """
    pa = torch.tensor([0.40, 0.30, 0.10, 0.10, 0.05, 0.05], dtype=torch.float64)
    pb = torch.tensor([0.10, 0.05, 0.05, 0.50, 0.10, 0.20], dtype=torch.float64)
    # group mass per candidate 2..7: 0.50 0.35 0.15 0.60 0.15 0.25; head A alone would pick {2, 3}, B {5, 7}
    keys = torch.zeros(1, 1, 10, 2)
    keys[0, 0, 2:8] = torch.stack([pa.log(), pb.log()], -1).float()
    query = torch.eye(2)[None, None]  # [B=1, Hkv=1, G=2, D=2]
    return query, keys, torch.zeros(1, dtype=torch.long)


@pytest.mark.parametrize("chosen,want", [
    ([5, 2], 1.0),  # the oracle set: group mass 0.6 + 0.5 = 1.1
    ([3, 7], 0.60 / 1.1),  # 0.35 + 0.25 (the mean of per-head ratios would be 0.558)
    ([2, 4], 0.65 / 1.1),
    ([4, 6], 0.30 / 1.1),
    ([2, 3], 0.85 / 1.1),  # head A's own top-2: the group rule ranks by summed mass
    ([], 0.0),  # sink and window only: nothing inside the candidates counts
])
def test_selection_recall_of_hand_computed_sets(chosen, want):
    """recall = group mass of the chosen candidates / group mass of the exact top-k, computed by hand; sink and
    window positions in the index list count for coverage but not for recall."""
    q, keys, start = _hand_case()
    idx = torch.tensor([0, 1, *chosen, 8, 9, -1])[None, None]  # sink, selection, window, an empty slot
    r = selection_recall(q, keys, start, 10, 2, 2, 2, idx, 1.0)
    assert r["recall"] == pytest.approx(want, abs=1e-6)
    assert 0.0 < r["coverage"] <= 1.0 + 1e-6


def test_oracle_selection_has_recall_one():
    """The policy `oracle` (kernels.exact_topk) recovers the hand-computed best set, so its recall is 1, and a
    random k-subset gets less."""
    from pqpatch import kernels

    q, keys, start = _hand_case()
    top = kernels.exact_topk(q, keys, start + 2, torch.tensor([8]), 2, 1.0)
    assert sorted(top.flatten().tolist()) == [2, 5]
    q, keys, start = _case()
    n, sink, local, k = 200, 4, 20, 30
    lo, hi = start + sink, torch.tensor([n - local])
    top = kernels.exact_topk(q, keys, lo, hi, k, 0.25)
    idx = torch.cat([torch.arange(sink)[None, None], top, torch.arange(n - local, n)[None, None]], -1)
    assert selection_recall(q, keys, start, n, sink, local, k, idx, 0.25)["recall"] == pytest.approx(1.0, abs=1e-6)
    rand = (torch.randperm(n - local - sink)[:k] + sink)[None, None]
    assert selection_recall(q, keys, start, n, sink, local, k, rand, 0.25)["recall"] < 1.0


def test_streaming_misses_a_needle_outside_its_window():
    q, keys, start = _case(g=1)
    n, sink, local, k, needle = 200, 4, 20, 30, 90
    keys[0, 0, needle] = q[0, 0, 0] * 4.0  # one key the query attends to almost exclusively
    # streaming at the same budget: sink + a window of local + k tokens
    stream = torch.cat([torch.arange(sink), torch.arange(n - local - k, n)])[None, None]
    r = selection_recall(q, keys, start, n, sink, local, k, stream, 0.25)
    assert r["recall"] < 0.05 and r["coverage"] < 0.05
    with_needle = torch.cat([stream[0, 0, :-1], torch.tensor([needle])])[None, None]
    assert selection_recall(q, keys, start, n, sink, local, k, with_needle, 0.25)["coverage"] > 0.9


def test_recall_is_nan_without_candidates():
    q, keys, start = _case()
    idx = torch.arange(200)[None, None]
    r = selection_recall(q, keys, start, 200, 4, 196, 0, idx, 0.25)
    assert math.isnan(r["recall"]) and r["coverage"] == pytest.approx(1.0, abs=1e-5)


def test_score_answer_matches_whole_numbers():
    assert score_answer(" 68231. Remember", ["68231"]) == 1.0
    assert score_answer(" 682319", ["68231"]) == 0.0
    assert score_answer("12 and 34", ["12", "34", "56"]) == pytest.approx(2 / 3)
    assert score_answer("\n 12.\n\nThe pass key is 34", ["12", "34"]) == 0.5  # the answer line only


# ---- prompts -------------------------------------------------------------------------------------------------
def test_haystack_is_deterministic_and_clean():
    text = ProseGenerator(3).paragraphs(2000)
    assert text == ProseGenerator(3).paragraphs(2000)
    assert text != ProseGenerator(4).paragraphs(2000)
    assert not re.search(r"\d", text)
    assert not any(k in text for k in NEEDLE_KEYS)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sample(depth):
    codec = CharCodec()
    s = passkey_sample(codec, 3000, depth)
    assert 2800 <= len(s.ids) <= 3000 and s.ids[0] == codec.bos
    text = codec.decode(s.ids)
    assert text.count(s.answers[0]) == 2 and text.rstrip().endswith("The pass key is")
    rel = s.needle_positions[0] / len(s.ids)
    assert abs(rel - depth) < 0.1


@pytest.mark.parametrize("variant", ["single", "multikey", "multivalue", "multiquery"])
def test_niah_sample(variant):
    codec = CharCodec()
    s = niah_sample(codec, 4000, 0.3, variant)
    text = codec.decode(s.ids)
    assert len(s.answers) == {"single": 1, "multikey": 1, "multivalue": 4, "multiquery": 2}[variant]
    assert all(text.count(a) == 1 for a in s.answers)
    n = 1 if variant == "single" else 4
    assert text.count("One of the special magic numbers for") == n == len(s.needle_positions)
    with pytest.raises(ValueError):
        niah_sample(codec, 4000, 0.3, "nope")


def test_document_has_exact_length():
    assert len(document_ids(CharCodec(), 777)) == 777


# ---- engine and runner on a tiny model -----------------------------------------------------------------------
def test_blockwise_prefill_is_exact(monkeypatch):
    import pqpatch

    model = tiny_model("gemma3", layers=2)  # sliding window 16
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(**BASE))
    monkeypatch.setattr(engine, "BLOCK", 32)
    ids = torch.randint(1, 96, (150,)).tolist()
    c1, l1 = prefill(model, ids, 4)
    with blockwise_prefill(model):
        c2, l2 = prefill(model, ids, 4)
    assert model.config._attn_implementation == "pqcache"
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-4)
    for a, b in zip(c1.layers, c2.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        # the blockwise path must finish the prefill like the model's own (a sliding ring records its padding;
        # otherwise the first decode step takes its 1-row mask for the prompt's)
        assert getattr(b, "prefilled", True) and getattr(a, "prefilled", True)
    # and decoding from the blockwise prefill equals decoding from the plain one
    torch.testing.assert_close(engine._step(model, c1, 5), engine._step(model, c2, 5), atol=1e-4, rtol=1e-4)
    pqpatch.unpatch_model(model)


def test_run_eval_passkey_end_to_end(tmp_path):
    model = tiny_model("gemma3", layers=2)
    s = EvalSettings(tasks=("passkey",), lengths=(320, 400), depths=(0.2, 0.8), budgets=(0.1, 0.3), base=BASE)
    res = run_eval(model, CharCodec(), s, progress=False)
    assert getattr(model, "_pqpatch", None) is None  # patched for the run only
    recs = res["records"]
    assert len(recs) == 2 * 2 * (1 + 5 * 2)
    assert {r["method"] for r in recs} == {"dense", "pq", "oracle", "streaming", "quest", "snapkv"}
    assert all(0.0 <= r["score"] <= 1.0 and r["s_per_token"] > 0 for r in recs)
    paths = write_outputs(res, tmp_path)
    assert (tmp_path / "passkey.json").is_file() and json.loads((tmp_path / "passkey.json").read_text())["records"]
    assert sum(p.suffix == ".png" for p in paths) == (6 if HAVE_MPL else 0)  # a heatmap per method
    assert "| pq @0.1 |" in summary_markdown(res)


def test_run_eval_kl_and_recall(tmp_path):
    model = tiny_model("llama", layers=2)
    s = EvalSettings(tasks=("kl", "recall"), lengths=(256,), budgets=(0.1, 0.3), teacher_tokens=6, base=BASE)
    res = run_eval(model, CharCodec(), s, progress=False)
    by = {(r["method"], r["budget"]): r for r in res["records"]}
    assert by[("dense", None)]["kl"] == pytest.approx(0.0, abs=1e-9) and by[("dense", None)]["top1"] == 1.0
    for b in (0.1, 0.3):
        layers = by[("oracle", b)]["layers"]
        assert set(layers) == {"0", "1"}  # llama: every layer is a PQ layer
        assert all(v["recall"] == pytest.approx(1.0, abs=1e-5) and v["steps"] == 6 for v in layers.values())
        for m in ("pq", "streaming", "quest"):
            assert all(0.0 <= v["recall"] <= 1.0 for v in by[(m, b)]["layers"].values())
            assert by[(m, b)]["kl"] >= 0.0
    paths = write_outputs(res, tmp_path)
    assert {p.name for p in paths} >= {"kl_recall.json", "kl_recall.md"} | (
        {"kl.png", "recall.png"} if HAVE_MPL else set())
    md = summary_markdown(res)
    assert "KL(dense" in md and "Attention recall" in md


def test_run_eval_niah_variants():
    model = tiny_model("gemma3", layers=2)
    s = EvalSettings(tasks=("niah",), lengths=(700,), depths=(0.5,), budgets=(0.2,), methods=("dense", "pq"),
                     variants=("single", "multivalue"), base=BASE)
    res = run_eval(model, CharCodec(), s, progress=False)
    assert [(r["variant"], r["method"]) for r in res["records"]] == [
        ("single", "dense"), ("single", "pq"), ("multivalue", "dense"), ("multivalue", "pq")]


def test_results_record_which_kmeans_ran(monkeypatch):
    """faiss and the torch fallback sample and seed differently: the result JSON must say which one ran."""
    import pqpatch.codebook as cb
    from pqpatch.eval.runner import machine_info

    if cb.faiss_available():
        assert machine_info()["kmeans"].startswith("faiss ")
    monkeypatch.setattr(cb, "faiss_available", lambda: False)
    assert machine_info()["kmeans"] == "torch"


def test_settings_are_validated():
    with pytest.raises(ValueError):
        EvalSettings(tasks=("passkey", "kl"))
    with pytest.raises(ValueError):
        EvalSettings(tasks=("passkey",), methods=("magic",))
    with pytest.raises(ValueError):
        EvalSettings(tasks=("passkey",), budgets=(1.5,))
    assert EvalSettings(tasks=("kl",), methods=("pq", "dense"), budgets=(0.1,)).forks() == [
        ("dense", None), ("pq", 0.1)]
    assert format_length(2048) == "2k" and format_length(1500) == "1500"


# ---- repeated cells and method specs ---------------------------------------------------------------------------
def test_method_specs_override_config_fields():
    from pqpatch.eval.engine import method_config, parse_method

    assert parse_method("pq:bits=8:num_subspaces=4") == ("pq", {"bits": 8, "num_subspaces": 4})
    cfg = method_config("pq:bits=5", 0.1, {"bits": 7, "seed": 3}, kmeans_seed=2)
    assert (cfg.bits, cfg.selection, cfg.token_budget, cfg.seed) == (5, "pq", 0.1, 5)
    assert method_config("dense:bits=5", None, {}) is None
    with pytest.raises(ValueError, match="bogus"):
        parse_method("pq:bogus=1")
    with pytest.raises(ValueError, match="field=value"):
        parse_method("pq:bits")
    with pytest.raises(ValueError):
        EvalSettings(tasks=("kl",), methods=("pq:bits=9",))  # the config rejects it up front


def test_repeated_cells_report_mean_and_spread(tmp_path):
    """Two prompt seeds x two k-means seeds: pq cells have 4 repetitions, oracle (no codebook) 2, and the
    Markdown and the JSON cells carry mean ± sd computed from exactly those records."""
    from pqpatch.eval.report import cell_stats

    model = tiny_model("llama", layers=2)
    s = EvalSettings(tasks=("kl", "recall"), lengths=(256,), budgets=(0.2,), teacher_tokens=4, base=BASE,
                     methods=("dense", "pq:bits=3", "pq:bits=5", "oracle"), seeds=(0, 1), kmeans_seeds=(0, 1))
    res = run_eval(model, CharCodec(), s, progress=False)
    recs = res["records"]
    count = {m: sum(r["method"] == m for r in recs) for m in s.methods}
    assert count == {"dense": 2, "pq:bits=3": 4, "pq:bits=5": 4, "oracle": 2}
    assert {(r["seed"], r["kmeans_seed"]) for r in recs if r["method"] == "pq:bits=5"} == {
        (0, 0), (0, 1), (1, 0), (1, 1)}
    # the two documents differ, so dense itself is a new prefill per prompt seed
    cells = {(c["method"], c["budget"]): c for c in cell_stats(recs)}
    pq = [r for r in recs if r["method"] == "pq:bits=3"]
    per = [sum(v["recall"] for v in r["layers"].values()) / len(r["layers"]) for r in pq]
    st = cells[("pq:bits=3", 0.2)]["recall"]
    mean = sum(per) / 4
    assert st["n"] == 4 and st["mean"] == pytest.approx(mean)
    assert st["sd"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in per) / 3))
    assert cells[("oracle", 0.2)]["recall"]["mean"] == pytest.approx(1.0, abs=1e-5)
    md = summary_markdown(res)
    assert "Attention recall per length" in md and "| pq:bits=3 @0.2 |" in md and " ± " in md
    write_outputs(res, tmp_path)
    assert json.loads((tmp_path / "kl_recall.json").read_text())["cells"]


def test_retrieval_seeds_build_different_prompts():
    model = tiny_model("gemma3", layers=2)
    s = EvalSettings(tasks=("passkey",), lengths=(320,), depths=(0.5,), budgets=(0.3,), methods=("dense",),
                     seeds=(0, 5), base=BASE)
    recs = run_eval(model, CharCodec(), s, progress=False)["records"]
    assert [r["seed"] for r in recs] == [0, 5] and recs[0]["answers"] != recs[1]["answers"]


def test_cli_takes_method_specs_and_seeds():
    from pqpatch.cli import build_parser

    a = build_parser().parse_args(["eval", "recall", "--methods", "pq:bits=8,oracle", "--seeds", "0,1",
                                   "--kmeans-seeds", "0,1,2"])
    assert a.methods == ("pq:bits=8", "oracle") and a.seeds == (0, 1) and a.kmeans_seeds == (0, 1, 2)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "recall", "--methods", "magic:bits=8"])


def test_kmeans_cost_tool_times_a_job(capsys):
    from pqpatch.eval import kmeans_cost

    assert kmeans_cost.job_seconds(600, 2, 32, 4, 2, weighted=True) > 0
    kmeans_cost.main(["--keys", "300", "--head-dim", "16", "--bits", "3", "--quantizer", "residual"])
    assert "residual m=2 b=3: " in capsys.readouterr().out


def test_demo_counts_the_re_rank_reads():
    """With rerank r a step also reads r x top-k exact keys per KV head, of which the CPU's fused path reuses the
    top-k for the attention: kv_memory reports the (r - 1) x top-k extra there (0 without re-ranking), plus the
    worst-coded keys joined to the shortlist (rerank_outliers, counted as a count here: 5)."""
    import pqpatch
    from pqpatch.eval.demo import kv_memory

    model = tiny_model("gemma3", layers=2)  # one global layer, 2 KV heads x 16 dims, float32
    ids = torch.randint(1, 96, (200,)).tolist()
    got = {}
    for r in (1, 3):
        pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.3, rerank=r, rerank_outliers=5, **BASE))
        try:
            cache, _ = prefill(model, ids, 4)
            got[r] = (kv_memory(model, cache), cache.pq_layers()[0].topk)
        finally:
            pqpatch.unpatch_model(model)
    assert got[1][0]["pq_rerank"] == 0
    topk = got[3][1]
    assert topk > 0 and got[3][0]["pq_rerank"] == ((3 - 1) * topk + 5) * 2 * 16 * 4  # "auto" on CPU: fused
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.3, rerank=3, rerank_outliers=0, backend="torch",
                                                     **BASE))
    try:  # the reference backend runs re-ranking and attention as two ops: all 3 x top-k keys are extra reads
        cache, _ = prefill(model, ids, 4)
        assert kv_memory(model, cache)["pq_rerank"] == 3 * topk * 2 * 16 * 4
    finally:
        pqpatch.unpatch_model(model)
