"""The repository folder `kernels/` imported under its own name (what transformers does when a source checkout is
on sys.path: it probes `import kernels` for Hugging Face's package) must not register the torch.library ops a
second time: that tore down the first registration and crashed later op calls at random."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_kernels_import_reuses_the_registered_ops():
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import pqpatch.kernels.ops as canonical\n"
        "op = canonical.pq_topk_op\n"
        "import kernels\n"  # the folder under its own name, as transformers' probe imports it
        "assert 'kernels.ops' not in sys.modules, 'ops.py ran a second time as kernels.ops'\n"
        "assert kernels._ops is canonical and canonical.pq_topk_op is op\n"
        "q = torch.randn(1, 1, 2, 8); c = torch.randn(1, 1, 2, 4, 4)\n"
        "codes = torch.randint(0, 4, (1, 1, 20, 2), dtype=torch.uint8)\n"
        "lo, hi = torch.tensor([0]), torch.tensor([20])\n"
        "for be in ('torch', 'cpu'):\n"
        "    idx = torch.ops.pqpatch.pq_topk(q, c, codes, lo, hi, 5, 0.5, be)\n"
        "    assert idx.shape == (1, 1, 5)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
