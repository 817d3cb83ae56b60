"""Several GPUs: every Triton launcher runs under its tensors' device, the clustering pool's copy-ready event is
recorded on the keys' device, and a model split over two GPUs (`device_map`) decodes like the same model on one.

CPU tests check the guards with mocks; the `gpu` tests need 2 CUDA devices (skipped otherwise) and run from
`benchmarks/gpu_check.py` (step "multi_gpu").
"""

from __future__ import annotations

import contextlib

import pytest
import torch

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


# ---- CPU: the guards, with mocks ----------------------------------------------------------------------------------

def test_every_triton_launcher_is_device_guarded():
    pytest.importorskip("triton")
    from pqpatch.kernels import triton_ops

    for name in triton_ops.__all__:
        assert getattr(getattr(triton_ops, name), "_pqpatch_device_guard", False), name


def test_guard_switches_to_the_first_tensors_device(monkeypatch):
    pytest.importorskip("triton")
    from pqpatch.kernels import triton_ops

    current = ["cuda:0"]
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        before, current[0] = current[0], str(device)
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class OnGpu1:
        device = torch.device("cuda", 1)

    seen = []
    guarded = triton_ops._on_tensor_device(lambda first, *a, **k: seen.append((current[0], a, k)) or "out")
    assert guarded(OnGpu1(), 2, x=3) == "out"
    assert entered == [torch.device("cuda", 1)] and seen == [("cuda:1", (2,), {"x": 3})]
    assert current[0] == "cuda:0"  # restored after the launch
    seen.clear()
    guarded(torch.zeros(1))  # CPU (interpreter): no device switch
    assert len(entered) == 1 and seen[0][0] == "cuda:0"


class _FakeCudaKeys:
    """Keys that report cuda:1 but hold CPU data: enough for ClusterPool.submit's CUDA branch."""

    device = torch.device("cuda", 1)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.shape, self.dtype = t.shape, t.dtype

    def __getitem__(self, i):
        return _FakeCudaKeys(self.t[i])


def test_copy_ready_event_is_recorded_on_the_keys_device(monkeypatch):
    """submit copies CUDA keys to pinned memory on the keys' device's current stream (torch runs a device->host copy
    there), so the event the job waits on must be recorded on that stream, not the current device's."""
    from pqpatch.clustering import ClusterPool

    streams, recorded = [], []

    class FakeEvent:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    def fake_current_stream(device=None):
        streams.append(device)
        return f"stream of {device}"

    class FakeCudart:  # registration of the staging buffer "succeeds": it is plain host memory here
        def cudaHostRegister(self, ptr, nbytes, flags):
            return 0

        def cudaHostUnregister(self, ptr):
            return 0

    real_copy = torch.Tensor.copy_

    def fake_copy(self, src, non_blocking=False):  # the "device->host copy"
        return real_copy(self, src.t if isinstance(src, _FakeCudaKeys) else src)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", fake_current_stream)
    monkeypatch.setattr(torch.cuda, "cudart", FakeCudart)
    monkeypatch.setattr(torch.Tensor, "copy_", fake_copy)
    keys = torch.randn(1, 2, 300, 16)
    pool = ClusterPool(1)
    try:
        fut = pool.submit(_FakeCudaKeys(keys), [0], 300, 2, 3, 2, 0)
        book = fut.result(timeout=60)
    finally:
        pool.shutdown()
        monkeypatch.undo()
    assert streams == [torch.device("cuda", 1)] and recorded == ["stream of cuda:1"]
    assert book.centroids.shape == (1, 2, 2, 8, 8)


# ---- 2 GPUs -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@two_gpus
def test_kernels_on_the_second_gpu_while_the_first_is_current():
    """Each Triton op on cuda:1 tensors with cuda:0 current equals the reference there, and leaves cuda:0 current."""
    from pqpatch import kernels
    from pqpatch.kernels import reference as ref

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    b, h, gq, d, n, m, kc = 1, 2, 4, 64, 2048, 2, 64
    q = torch.randn(b, h, gq, d, device=dev, generator=g)
    keys = torch.randn(b, h, n, d, device=dev, generator=g)
    vals = torch.randn(b, h, n, d, device=dev, generator=g)
    cent = torch.randn(b, h, m, kc, d // m, device=dev, generator=g)
    codes = kernels.pq_assign(keys, cent, backend="triton")
    assert codes.device == dev
    # the nearest centroid, up to float ties: the chosen one's distance is the smallest
    x = keys.reshape(b, h, n, m, d // m).permute(0, 1, 3, 2, 4)  # [B, Hkv, m, N, Ds]
    dist = torch.cdist(x, cent)  # [B, Hkv, m, N, K]
    chosen = torch.gather(dist, 4, codes.long().permute(0, 1, 3, 2)[..., None])[..., 0]
    assert bool((chosen <= dist.amin(-1) + 1e-4).all())
    lo = torch.zeros(b, dtype=torch.long, device=dev)
    hi = torch.full((b,), n, dtype=torch.long, device=dev)
    top = kernels.pq_topk(q, cent, codes, lo, hi, 200, d**-0.5, backend="triton")
    want = ref.pq_topk_ref(q, cent, codes, lo, hi, 200, d**-0.5)
    scores = ref.pq_scores_ref(q, cent, codes, lo, hi, d**-0.5)
    kth = torch.gather(scores, 2, want).amin(-1, keepdim=True)
    assert bool((torch.gather(scores, 2, top) >= kth - 1e-6).all())  # a valid top-k (ties may pick either)
    out, lse = kernels.sparse_decode_attention(q, keys, vals, top, d**-0.5, backend="triton")
    out_ref, lse_ref = ref.sparse_decode_attention_ref(q, keys, vals, top, d**-0.5)
    torch.testing.assert_close(out, out_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, lse_ref, atol=2e-3, rtol=2e-3)
    assert torch.cuda.current_device() == 0


def _split_model(tmp_path, offload: bool):
    """A tiny saved Llama loaded twice: on cuda:0, and with its layers split over cuda:0 and cuda:1."""
    from conftest import tiny_model
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", layers=4, heads=8, kv_heads=4, head_dim=32)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(tmp_path / "m")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device_map={"": 0}).eval()
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
            "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32, device_map=dmap).eval()
    return one, two


def _run(model, ids, config):
    import pqpatch
    from pqpatch.cache import PQCache, bucket_length

    sel: list = []
    pqpatch.patch_model(model, config)
    try:  # the cache generate() would build (an offloaded one cannot be resized to the bucket afterwards)
        cache = PQCache(model, max_cache_len=bucket_length(ids.shape[1] + 8), context_len=ids.shape[1] + 8)
        cache.add_observer(lambda layer, q, idx, s: sel.append((layer.layer_idx, idx.device, idx.cpu())))
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
    finally:
        pqpatch.unpatch_model(model)
    return out.cpu(), sel


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("offload", [False, True])
def test_two_gpu_device_map_decodes_like_one_gpu(tmp_path, offload):
    """Layers 2-3 live on cuda:1 while cuda:0 stays current: same tokens and the same selections as on one GPU,
    every PQ layer selecting on its own device; at budget 1.0 the split model equals its unpatched self."""
    import pqpatch

    torch.cuda.set_device(0)
    one, two = _split_model(tmp_path, offload)
    ids = torch.randint(1, 96, (1, 1500), generator=torch.Generator().manual_seed(0))
    cfg = pqpatch.PQCacheConfig(token_budget=0.1, sink_tokens=8, offload=offload)
    out1, sel1 = _run(one, ids.to("cuda:0"), cfg)
    out2, sel2 = _run(two, ids.to("cuda:0"), cfg)
    assert torch.equal(out1, out2)
    assert [s[0] for s in sel1] == [s[0] for s in sel2] and len(sel1) == 4 * 7
    for (layer, dev, a), (_, dev2, b) in zip(sel1, sel2):
        assert dev == torch.device("cuda", 0) and dev2 == torch.device("cuda", 0 if layer < 2 else 1)
        assert torch.equal(a.sort(-1).values, b.sort(-1).values), f"layer {layer}"
    dense = two.generate(ids.to("cuda:0"), max_new_tokens=8, do_sample=False).cpu()
    full, _ = _run(two, ids.to("cuda:0"), pqpatch.PQCacheConfig(token_budget=1.0, sink_tokens=8, offload=offload))
    assert torch.equal(full, dense)
    assert torch.cuda.current_device() == 0
