"""The PQ log-partition (`kernels.pq_log_partition`, what exact re-ranking normalises by) against the PQ top-k of
the same step (`kernels.pq_topk` of the rerank=2 shortlist, 2k = N/5 tokens at k = N/10) and the reference, at the
Llama-3-8B layer shape: B = 1, Hkv = 8, G = 4, D = 128, m = 2 sub-spaces of 256 centroids (b = 8), every token a
candidate; and the fused op a decode step runs instead (`kernels.pq_shortlist`: both outputs from one pass over the
codes) against the two ops called one after the other.

CPU (default): one thread (`torch.set_num_threads(1)`), float32, the "cpu" paths, timed in interleaved rounds
(`bench_util.interleaved_min`), each op's time its minimum over the rounds. CUDA: the Triton paths, timed by
`bench_util.Timer` (CUDA events). "share": the log-partition's time as a share of the top-k's; "fused/2 ops": the
fused op's time over that of pq_topk + pq_log_partition (one callable, timed in the same rounds). Report only.

    python benchmarks/bench_log_partition.py [--n 32768 131072] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_util import Timer, interleaved_min  # noqa: E402
from pqpatch import kernels  # noqa: E402
from pqpatch.kernels.log_partition import log_partition_ref  # noqa: E402

HKV, G, D, M, KC = 8, 4, 128, 2, 256


def inputs(n: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HKV, G, D, generator=gen)
    c = torch.randn(1, HKV, M, KC, D // M, generator=gen)
    codes = torch.randint(0, KC, (1, HKV, n, M), generator=gen, dtype=torch.uint8)
    lo, hi = torch.tensor([0]), torch.tensor([n])
    return tuple(t.to(device) for t in (q, c, codes, lo, hi))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    fast = "triton" if cuda else "cpu"
    print(f"device={'cuda' if cuda else 'cpu'} threads={torch.get_num_threads()} float32 B=1 Hkv={HKV} G={G} D={D} "
          f"m={M} K={KC} backend={fast}")
    print(f"{'N':>7} {'log_partition ms':>17} {'reference ms':>13} {'pq_topk(N/5) ms':>16} {'share':>6} "
          f"{'2 ops ms':>9} {'pq_shortlist ms':>16} {'fused/2 ops':>11}")
    for n in args.n:
        q, c, codes, lo, hi = inputs(n, "cuda" if cuda else "cpu")
        s = D ** -0.5
        ops = {
            "logz": lambda: kernels.pq_log_partition(q, c, codes, lo, hi, s, backend=fast),
            "ref": lambda: log_partition_ref(q, c, codes, lo, hi, s),
            "topk": lambda: kernels.pq_topk(q, c, codes, lo, hi, n // 5, s, backend=fast),
            "two": lambda: (kernels.pq_topk(q, c, codes, lo, hi, n // 5, s, backend=fast),
                            kernels.pq_log_partition(q, c, codes, lo, hi, s, backend=fast)),
            "fused": lambda: kernels.pq_shortlist(q, c, codes, lo, hi, n // 5, s, backend=fast),
        }
        torch.testing.assert_close(ops["logz"](), ops["ref"](), rtol=1e-5, atol=1e-4)
        (idx, log_z), (idx2, log_z2) = ops["fused"](), ops["two"]()
        assert torch.equal(log_z, log_z2)  # the same sums (and on CPU the same selection; on CUDA ties at the
        assert cuda or torch.equal(idx, idx2)  # boundary go to whichever program comes first)
        best = {name: t * 1e3 for name, t in interleaved_min(ops, args.rounds, Timer(cuda)).items()}  # ms
        print(f"{n:>7} {best['logz']:>17.3f} {best['ref']:>13.2f} {best['topk']:>16.2f} "
              f"{best['logz'] / best['topk']:>6.1%} {best['two']:>9.2f} {best['fused']:>16.2f} "
              f"{best['fused'] / best['two']:>11.3f}")


if __name__ == "__main__":
    main()
