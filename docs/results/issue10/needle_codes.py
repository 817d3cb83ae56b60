"""The diagnostic behind docs/results.md "The worst-coded keys join the shortlist" (stop 15).

python docs/results/issue10/needle_codes.py   (one 16K prefill of Gemma-3-270M, ~3 min on 2 CPU cores)

Replays the first 16K single-needle NIAH prompt (seed 0) teacher-forced with its answer and, at the step that the
residual default got wrong (fed the first "6" of 3966354, layer 5, budget 0.1), prints for each of the needle's digit
keys: its exact group score and rank among the candidates, its rank under the codes' approximate score (against the
shortlist size 2k), its reconstruction error (distance to the reconstructed key) and that error's rank, and the
exact vs approximate logits per head. Methods: the residual and the pq codebook with rerank_outliers=0 (the codes as they were before the fix).
"""
import torch, pqpatch
from pqpatch.models import load_default_model
from pqpatch.eval.tasks import HFCodec, niah_sample
from pqpatch.eval.engine import prefill, teacher_forced, blockwise_prefill, method_config
from pqpatch.config import PQCacheConfig

torch.set_num_threads(2)
model, tok = load_default_model(progress=False)
pqpatch.patch_model(model, PQCacheConfig())
codec = HFCodec(tok)
s = niah_sample(codec, 16384, 0.5, "single", seed=0)
feed = [236743, 236800, 236819, 236825, 236825, 236800, 236810, 236812, 236761]
ids = list(s.ids)
NEEDLE = list(range(8179, 8186))
with blockwise_prefill(model):
    cache, first = prefill(model, ids, len(feed) + 4)


def recon(layer):
    c = layer.centroids[0, 0].float()  # [m, K, Ds]
    codes = layer.codes[0, 0, :layer.length].long()  # [N, m]
    m = c.shape[0]
    parts = [c[j][codes[:, j]] for j in range(m)]  # [N, Ds] each
    if layer.cfg.quantizer == "residual":
        return sum(parts)
    return torch.cat(parts, -1)


class Obs:
    def __init__(self):
        self.step = {}

    def __call__(self, layer, query, idx, scaling):
        self.step[layer.layer_idx] = self.step.get(layer.layer_idx, -1) + 1
        if layer.layer_idx != 5 or self.step[5] != 3:
            return
        n = layer.length
        keys = layer.keys[0, 0, :n].float()
        rk = recon(layer)
        err = (keys - rk).norm(dim=-1)
        q = query[0, 0].float()
        sink, local, topk = layer.cfg.budget_split(layer.context_len)
        lo, hi = sink, n - local
        ex = torch.softmax(q @ keys[lo:hi].T * scaling, -1)  # [G, C]
        ap = torch.softmax(q @ rk[lo:hi].T * scaling, -1)
        exs, aps = ex.sum(0), ap.sum(0)
        for p in NEEDLE:
            i = p - lo
            print(f"  pos {p}: exact group score {float(exs[i]):.3f} rank {int((exs > exs[i]).sum())}; approx {float(aps[i]):.2e} "
                  f"rank {int((aps > aps[i]).sum())} (shortlist {2 * topk}); err {float(err[p]):.2f} rank "
                  f"{int((err[lo:hi] > err[p]).sum())} of {hi - lo}; |k| {float(keys[p].norm()):.2f}; "
                  f"q.k exact {[round(float(x), 2) for x in (q @ keys[p]) * scaling]} approx "
                  f"{[round(float(x), 2) for x in (q @ rk[p]) * scaling]}")
        print(f"  mean err {float(err[lo:hi].mean()):.2f}, mean |k| {float(keys[lo:hi].norm(dim=-1).mean()):.2f}, topk {topk}")


for m in ["pq:quantizer=residual:rerank_outliers=0", "pq:quantizer=pq:rerank_outliers=0"]:
    fork = cache.fork(method_config(m, 0.1, {}, None))
    obs = Obs()
    fork.add_observer(obs)
    print("==", m)
    teacher_forced(model, fork, feed[:5])
