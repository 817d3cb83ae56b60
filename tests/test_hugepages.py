"""`pqpatch.hugepages.zeros`: zero-filled CPU tensors on transparent huge pages (the K/V buffers of resident CPU
caches), and the plain `torch.zeros` fallback."""

from __future__ import annotations

import pytest
import torch

from pqpatch import hugepages


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


@pytest.mark.parametrize("shape,dtype", [((1, 2, 3, 4), torch.float32), ((2, 8, 4097, 128), torch.bfloat16),
                                         ((1, 8, 8192, 64), torch.float32), ((3, 1000, 257), torch.float16)])
def test_zeros_is_a_zero_filled_writable_tensor(shape, dtype):
    x = hugepages.zeros(shape, dtype)
    assert x.shape == shape and x.dtype == dtype and x.device.type == "cpu" and x.is_contiguous()
    assert not bool(x.any())
    x.view(-1)[-1] = 3  # the last element is inside the mapping
    x[0].fill_(1.5)
    assert float(x[0].float().sum()) == 1.5 * x[0].numel()
    y = x.clone()
    del x  # views keep the mapping alive; a clone is independent
    assert float(y[0].float().mean()) == 1.5


def test_large_buffers_start_on_a_huge_page_boundary_and_use_huge_pages():
    if not hugepages.hugepages_available():
        pytest.skip("no transparent huge pages on this machine")
    before = _anon_huge_kib()
    x = hugepages.zeros((8, 8192, 128), torch.float32)  # 32 MiB
    assert x.data_ptr() % hugepages.HUGE_PAGE == 0
    x.fill_(1.0)  # fault the pages in
    grown = _anon_huge_kib() - before
    assert grown >= 16 * 1024, f"only {grown} KiB of huge pages for a 32 MiB buffer"


def test_small_buffers_and_no_thp_fall_back_to_torch_zeros(monkeypatch):
    small = hugepages.zeros((4, 100), torch.float32)
    assert small.untyped_storage().resizable()  # an ordinary torch allocation
    monkeypatch.setattr(hugepages, "_state", False)
    big = hugepages.zeros((8, 8192, 128), torch.float32)
    assert big.untyped_storage().resizable() and not bool(big.any())


def test_resident_cpu_cache_buffers_are_huge_page_backed():
    from transformers import LlamaConfig, LlamaForCausalLM

    import pqpatch
    from pqpatch.cache import PQCache

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=9000)
    model = LlamaForCausalLM(cfg).eval()
    pqpatch.patch_model(model, pqpatch.PQCacheConfig())
    full = []  # full-length buffers allocated with torch.zeros: none (the layer allocates its K/V once, itself)
    real = torch.zeros

    def spy(*size, **kw):
        shape = size[0] if size and isinstance(size[0], (tuple, list, torch.Size)) else size
        if 8200 in tuple(shape):
            full.append(tuple(shape))
        return real(*size, **kw)

    try:
        cache = PQCache(model, max_cache_len=8200)
        torch.zeros = spy
        try:
            with torch.no_grad():
                model(torch.randint(1, 64, (1, 8)), past_key_values=cache, use_cache=True)  # 5.17 and 5.24
        finally:
            torch.zeros = real
        assert not full, full
        layer = cache.layers[0]
        want = hugepages.hugepages_available()
        assert (not layer.keys.untyped_storage().resizable()) == want
        assert (not layer.values.untyped_storage().resizable()) == want
    finally:
        pqpatch.unpatch_model(model)
