"""Two CPU selection primitives through numpy, where numpy's implementation is cheaper than ATen's at decode sizes.

Measured (`python benchmarks/bench_step_phases.py --primitives`, 1 thread, 8 rows of 29.5K float32 scores: the
shortlist of a 32K step, Llama-3-8B layer; of 6.8K: its re-ranking): the k-th largest by `np.partition`
(introselect on the values alone) 1.45 / 0.33 ms against `torch.topk(...).values.min()` 2.33 / 0.55 ms (topk also
moves indices); the positions of a mask by `np.flatnonzero` 0.32 / 0.13 ms against `torch.nonzero` 0.64 / 0.25 ms
(which writes [total, 2] indices). Both are exact: the
same value and the same positions as the torch calls, which are the fallback when numpy cannot be imported
(`HAS_NUMPY`) and the reference in `tests/test_cpu_np.py`. CPU tensors only; nothing here copies to a device.
"""

from __future__ import annotations

import torch

try:
    import numpy as np

    HAS_NUMPY = True
except ImportError:  # numpy is optional for torch: the torch calls below stay correct, only slower
    np = None
    HAS_NUMPY = False

__all__ = ["HAS_NUMPY", "kth_largest", "row_positions"]


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row. scores: [R, n] float32 CPU, no NaN; 0 < k <= n. Returns [R, 1] float32
    (equal to `torch.topk(scores, k).values.amin(-1, keepdim=True)`)."""
    n = scores.shape[1]
    if not HAS_NUMPY or scores.dtype != torch.float32:
        return torch.topk(scores, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    part = np.partition(scores.detach().numpy(), n - k, axis=1)  # a copy; scores stay as they are
    return torch.from_numpy(np.ascontiguousarray(part[:, n - k: n - k + 1]))


def row_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The True entries of mask [R, n] bool CPU, row after row, each row's in ascending order: (rows [T] int64,
    cols [T] int64), as `mask.nonzero(as_tuple=True)`."""
    if not HAS_NUMPY:
        return mask.nonzero(as_tuple=True)
    n = mask.shape[1]
    flat = torch.from_numpy(np.flatnonzero(mask.numpy()))  # int64 positions in the row-major flattening
    return flat // n, flat % n
