"""pqpatch: PQCache (product-quantized KV-cache retrieval) as a one-line patch for transformers models.

    import pqpatch
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.2))
    model.generate(ids, max_new_tokens=64)

Importing this package is light: transformers, triton and faiss are imported on first use.
"""

import sys as _sys
from pathlib import Path as _Path

# A source checkout (no install, e.g. a copied working tree) keeps the ops in ../kernels; an installed pqpatch has
# them as pqpatch/kernels. Let `pqpatch.kernels` resolve in both layouts. The finder goes first on sys.meta_path:
# with another checkout installed in editable mode, that install's finder maps `pqpatch.kernels` to *its* kernels
# folder, and a source checkout on PYTHONPATH (a git worktree) would otherwise run its own pqpatch against the
# other checkout's ops.
if not (_Path(__file__).parent / "kernels").is_dir() and (_Path(__file__).parents[1] / "kernels" / "ops.py").is_file():
    import importlib.util as _util

    class _KernelsFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "pqpatch.kernels":
                return None
            folder = _Path(__file__).parents[1] / "kernels"
            return _util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])

    if not any(isinstance(f, type) and f.__name__ == "_KernelsFinder" for f in _sys.meta_path):
        _sys.meta_path.insert(0, _KernelsFinder)

from .config import PQCacheConfig
from .patch import patch_model, unpatch_model
from .stats import CacheStats, stats

__all__ = ["PQCacheConfig", "CacheStats", "patch_model", "unpatch_model", "stats"]
__version__ = "0.1.0"
