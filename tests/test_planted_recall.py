"""PQ ranking at a partial budget, end to end: on a tiny model whose decode attention is dominated by known
("planted") prompt tokens, generate() with selection="pq" must capture nearly the attention mass the exact top-k
(the oracle) captures, at every step, layer, sequence and KV head.

The full-budget equality tests select every candidate, so a ranking bug (reversed scores, another head's codes,
codes shifted under left padding) passes them; here it cannot: `test_the_check_fails_when_the_ranking_is_broken`
breaks the ranking on purpose and requires the same check to fail.

Planting, through the weights of a random Llama (no RoPE trouble):
- residual channel h (h = 0, 1) belongs to the planted tokens of KV head h: token ids PLANTED[h] write strength
  s in [0.6, 3] into it, every other token 0, and no layer writes into it (o_proj / down_proj rows zeroed);
- k_proj reads channel h into KV head h along a direction v that lives only in head dims whose RoPE frequency is
  negligible at rope_theta = 1e9 (< 1e-3 rad per position, 0.2 rad over the prompt); every query head's q_proj
  bias is c * v.
So a planted key scores ~ c * a * s * scaling above the rest whatever the relative position: each KV head has
its own 24 planted positions per sequence (8 strengths x 3) among ~360 candidates, carrying ~30% of the
candidates' attention mass, and the top-k (22 at budget 0.1) must pick the strongest of them. Both sequences
(one left-padded by 30) have their own positions. ~4 s on a 2-core CPU.
"""

from __future__ import annotations

import pytest
import torch

import pqpatch
from pqpatch import kernels
from pqpatch.cache import PQCache

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64
PLANTED = (tuple(range(80, 88)), tuple(range(88, 96)))  # token ids planted for KV head 0 / 1
STRENGTH = torch.linspace(0.6, 3.0, 8)
SLOW_DIMS = [4, 5, 6, 7, 12, 13, 14, 15]  # rotate_half pairs (i, i + 8) with i >= 4: frequency <= 3.2e-5 at 1e9
PROMPT, PAD, NEW, BUDGET = 400, 30, 12, 0.1
MIN_RECALL = 0.9


def planted_model(seed: int = 0, c: float = 2.0, a: float = 2.0):
    import transformers as tf

    cfg = tf.LlamaConfig(
        vocab_size=96, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=1024, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9},
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    v = torch.zeros(HEAD_DIM)
    v[SLOW_DIMS] = torch.randn(len(SLOW_DIMS))
    v /= v.norm()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_()
        emb[:, :KV_HEADS] = 0
        for h, toks in enumerate(PLANTED):
            emb[list(toks), h] = STRENGTH
        for layer in model.model.layers:
            att = layer.self_attn
            for lin in (att.o_proj, layer.mlp.down_proj):  # nothing writes into the planted channels
                lin.weight[:KV_HEADS] = 0
            for lin in (att.k_proj, att.v_proj, att.o_proj):
                lin.bias.zero_()
            att.k_proj.weight[:, :KV_HEADS] = 0
            for h in range(KV_HEADS):
                att.k_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM, h] = a * v
            att.q_proj.bias.copy_((c * v).repeat(HEADS))
    return model


def planted_prompt(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 80, (2, PROMPT), generator=g)
    for b in range(2):
        for toks in PLANTED:
            pos = torch.randperm(300, generator=g)[:24] + 50  # well inside the candidates (after the sink)
            ids[b, pos] = torch.tensor(toks).repeat(3)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids, mask


def _mass(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Attention mass p [B, Hkv, N] of the positions idx [B, Hkv, k] (-1 = empty): [B, Hkv]."""
    return torch.where(idx >= 0, p.gather(-1, idx.clamp_min(0)), 0.0).sum(-1)


class Recorder:
    """Cache observer: per decode step and PQ layer, the mass the method's top-k captures over the exact top-k's
    (same query, keys and budget; softmax over the candidates, summed over the GQA group: the kernels' rule), and
    the share of the candidates' mass on the planted positions."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        self.rows: list[dict] = []

    def __call__(self, layer, q: torch.Tensor, idx: torch.Tensor, scaling: float) -> None:
        n = layer.length
        lo, hi = layer.start + layer.sink, n - layer.local
        keys = layer.keys[:, :, :n].float()
        pos = torch.arange(n)
        cand = (pos[None] >= lo[:, None]) & (pos[None] < hi)  # [B, n]
        logits = torch.einsum("bhgd,bhnd->bhgn", q.float(), keys) * scaling
        p = torch.softmax(logits.masked_fill(~cand[:, None, None], float("-inf")), -1).sum(2)  # [B, Hkv, n]
        top = idx[..., layer.sink_slots : layer.sink_slots + layer.topk_slots]
        best = kernels.exact_topk(q, layer.keys, lo, torch.full_like(lo, hi), layer.topk, scaling)
        planted = torch.zeros_like(p)
        for h, toks in enumerate(PLANTED):
            planted[:, h, : self.ids.shape[1]] = torch.isin(self.ids, torch.tensor(toks)).float()[:, :n]
        self.rows.append(dict(
            layer=layer.layer_idx, length=n, top=top.clone(), topk=layer.topk,
            recall=_mass(p, top) / _mass(p, best),  # [B, Hkv]
            planted=(p * planted).sum(-1) / p.sum(-1),  # [B, Hkv]
        ))


def run(selection: str, ids: torch.Tensor, mask: torch.Tensor, **kw) -> tuple[torch.Tensor, list[dict]]:
    """generate() under `selection` (rerank=1: the codes' own ranking, no exact re-scoring), recording every step."""
    model = planted_model()
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=BUDGET, sink_tokens=4, local_tokens=16,
                                                     min_context=64, bits=4, selection=selection, rerank=1, **kw))
    rec = Recorder(ids)
    orig = PQCache.__init__

    def recording_init(self, *a, **k):
        orig(self, *a, **k)
        self.add_observer(rec)

    PQCache.__init__ = recording_init
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        PQCache.__init__ = orig
    assert len(rec.rows) == 2 * (NEW - 1)  # 2 layers x every decode step
    return out, rec.rows


def check_recall(rows: list[dict]) -> None:
    """PQ's recall of the oracle's attention mass >= MIN_RECALL at every step, layer, sequence and KV head."""
    for r in rows:
        worst = float(r["recall"].min())
        assert worst >= MIN_RECALL, f"layer {r['layer']} at length {r['length']}: recall {worst:.3f}"


@pytest.fixture(scope="module")
def prompt():
    return planted_prompt()


@pytest.fixture(scope="module")
def oracle_run(prompt):
    return run("oracle", *prompt)


def test_pq_recall_at_a_partial_budget_stays_near_the_oracle(prompt, oracle_run):
    ids, mask = prompt
    oracle_out, oracle_rows = oracle_run
    out, rows = run("pq", ids, mask)
    for r in oracle_rows:  # the setting is what it claims: a real top-k that the planted tokens dominate
        assert 0 < r["topk"] < 0.1 * r["length"]
        assert float(r["planted"].min()) > 0.15
        torch.testing.assert_close(r["recall"], torch.ones_like(r["recall"]))  # the oracle is the exact top-k
    check_recall(rows)
    # the same tokens, so the two runs' selections compare step by step: PQ's top-k holds nearly the oracle run's
    assert torch.equal(out, oracle_out)
    for r, o in zip(rows, oracle_rows):
        assert (r["layer"], r["length"]) == (o["layer"], o["length"])
        a, b = r["top"], o["top"]
        shared = ((a[..., :, None] == b[..., None, :]) & (a[..., :, None] >= 0)).any(-1).sum(-1)  # [B, Hkv]
        # 0.8, not 1: the weakest planted strength comes 3 times and the top-k takes only some of those near-ties
        assert int(shared.min()) >= 0.8 * r["topk"], (r["layer"], r["length"], shared.tolist())


@pytest.mark.parametrize("broken", ["reversed", "other_head", "shifted"])
def test_the_check_fails_when_the_ranking_is_broken(prompt, monkeypatch, broken):
    """The recall check is not vacuous. Each of these ranking bugs makes the same run fail it: PQ scores reversed
    (the lowest-scoring tokens selected), each KV head scored with the other head's codebook and codes, codes
    read 3 positions off."""
    real = kernels.pq_topk

    def broken_topk(q, centroids, codes, *a, **k):
        if broken == "reversed":
            q = -q
        elif broken == "other_head":  # [B, Hkv, ...]: swap the two KV heads
            centroids, codes = centroids.flip(1), codes.flip(1)
        else:
            codes = codes.roll(3, dims=2)
        return real(q, centroids, codes, *a, **k)

    monkeypatch.setattr(kernels, "pq_topk", broken_topk)
    _, rows = run("pq", *prompt)
    with pytest.raises(AssertionError, match="recall"):
        check_recall(rows)
