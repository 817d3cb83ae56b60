"""pqpatch: PQCache (product-quantized KV-cache retrieval) as a one-line patch for transformers models.

    import pqpatch
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.2))
    model.generate(ids, max_new_tokens=64)

Importing this package is light: transformers, triton and faiss are imported on first use.
"""

from .config import PQCacheConfig
from .patch import patch_model, unpatch_model
from .stats import CacheStats, stats

__all__ = ["PQCacheConfig", "CacheStats", "patch_model", "unpatch_model", "stats"]
__version__ = "0.1.0"
