"""Model-level behaviour of patch_model / unpatch_model on tiny random models of every supported architecture."""

import gc
import threading

import pytest
import torch
from conftest import live_tensor_count, tiny_model

import pqpatch
from pqpatch.cache import PQLayer
from pqpatch.kernels.quality import rq_assign_ref
from pqpatch.kernels.reference import pq_assign_ref

PROMPT, NEW = 48, 12


def _full(**kw) -> pqpatch.PQCacheConfig:
    """A budget that covers every token, with the sparse path still on (min_context below the prompt)."""
    return pqpatch.PQCacheConfig(token_budget=1.0, sink_tokens=4, local_tokens=8, min_context=16, bits=4, **kw)


def _gen(model, ids, mask=None, **kw):
    torch.manual_seed(123)
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True,
        pad_token_id=0, **kw,
    )


def _assert_sparse_path_ran(model):
    layers = model._pqpatch.last_cache.pq_layers()
    assert layers, "no PQ layer in the cache"
    for layer in layers:
        assert layer.active and layer.topk > 0
        # tokens that left the window during decoding got their nearest-centroid codes: the top-k path really ran
        a, b = PROMPT - layer.local, PROMPT + NEW - 1 - layer.local
        assign_ref = rq_assign_ref if layer.cfg.quantizer == "residual" else pq_assign_ref
        want = assign_ref(layer.keys[:, :, a:b], layer.centroids)
        assert torch.equal(layer.codes[:, :, a:b], want) and bool(want.any())
        assert not layer.codes[:, :, b:].any()  # and nothing beyond them


@pytest.mark.parametrize("quantizer", pqpatch.config.QUANTIZERS)
def test_full_budget_equals_dense(arch, quantizer):
    model = tiny_model(arch)
    ids = torch.randint(1, 96, (1, PROMPT))
    ref = _gen(model, ids)
    pqpatch.patch_model(model, _full(quantizer=quantizer))
    out = _gen(model, ids)
    _assert_sparse_path_ran(model)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("selection", ["pq", "oracle", "quest", "streaming"])
def test_full_budget_equals_dense_batch2_left_padding(selection):
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0  # second sequence is 7 tokens shorter: left padding
    ref = _gen(model, ids, mask)
    pqpatch.patch_model(model, _full(selection=selection))
    out = _gen(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    starts = [layer.start.tolist() for layer in model._pqpatch.last_cache.pq_layers()]
    assert all(s == [0, 7] for s in starts)


def test_full_budget_sampling_fixed_seed():
    model = tiny_model("qwen2")
    ids = torch.randint(1, 96, (1, PROMPT))
    ref = _gen(model, ids, do_sample=True, temperature=1.5)
    pqpatch.patch_model(model, _full())
    out = _gen(model, ids, do_sample=True, temperature=1.5)
    assert torch.equal(out.sequences, ref.sequences)


def test_small_budget_differs_but_runs():
    """A real budget must change the computation (else the equality tests above prove nothing)."""
    model = tiny_model("llama", head_dim=32)
    with torch.no_grad():  # sharpen attention so that dropping tokens changes the logits visibly
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
    ids = torch.randint(1, 96, (1, 200))
    ref = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_logits=True, do_sample=False)
    cfg = pqpatch.PQCacheConfig(token_budget=24, sink_tokens=4, local_tokens=8, min_context=16, bits=4)
    pqpatch.patch_model(model, cfg)
    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_logits=True, do_sample=False)
    layer = model._pqpatch.last_cache.pq_layers()[0]
    assert (layer.sink, layer.local, layer.topk) == (4, 8, 12)
    assert not torch.allclose(out.logits[1], ref.logits[1], atol=1e-4)
    torch.testing.assert_close(out.logits[0], ref.logits[0])  # the first token comes from the exact prefill


def test_short_prompt_stays_dense():
    model = tiny_model("mistral")
    ids = torch.randint(1, 96, (1, 20))
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=4, min_context=64))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert not any(layer.active for layer in model._pqpatch.last_cache.pq_layers())


def test_gemma3_sliding_layers_stay_dense():
    model = tiny_model("gemma3", layers=4)
    pqpatch.patch_model(model, _full())
    out = _gen(model, torch.randint(1, 96, (1, PROMPT)))  # noqa: F841 -- the output keeps the cache alive
    kinds = [type(layer).__name__ for layer in model._pqpatch.last_cache.layers]
    assert kinds[0] != "PQLayer" and kinds[1] == "PQLayer" and kinds[2] != "PQLayer" and kinds[3] == "PQLayer"


def test_unpatch_restores_identical_outputs(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 96, (1, PROMPT))
    before = _gen(model, ids)
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.3, min_context=16, sink_tokens=2, bits=3))
    _gen(model, ids)
    assert pqpatch.unpatch_model(model) is model
    after = _gen(model, ids)
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__ and not hasattr(model, "_pqpatch")
    assert torch.equal(before.sequences, after.sequences)
    for a, b in zip(before.logits, after.logits):
        assert torch.equal(a, b)


def test_double_patch_and_bad_models_raise():
    model = tiny_model("llama")
    assert pqpatch.patch_model(model) is model
    with pytest.raises(ValueError, match="already patched"):
        pqpatch.patch_model(model)
    pqpatch.unpatch_model(model)
    with pytest.raises(ValueError, match="not patched"):
        pqpatch.unpatch_model(model)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="gpt2.*supported.*llama"):
        pqpatch.patch_model(gpt2)
    with pytest.raises(ValueError, match="num_subspaces=3 must divide"):
        pqpatch.patch_model(tiny_model("qwen3"), pqpatch.PQCacheConfig(num_subspaces=3, quantizer="pq"))
    residual3 = tiny_model("qwen3")  # residual stages each span the head dim: 3 of them need not divide it
    pqpatch.patch_model(residual3, pqpatch.PQCacheConfig(num_subspaces=3, quantizer="residual"))
    pqpatch.unpatch_model(residual3)
    with pytest.raises(ValueError, match="PQCacheConfig"):
        pqpatch.patch_model(tiny_model("qwen3"), {"token_budget": 0.1})


def test_right_padding_is_refused():
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    ids = torch.randint(1, 96, (2, PROMPT))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_beams_refused_with_clear_error():
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    with pytest.raises(ValueError, match="num_beams=1"):
        model.generate(torch.randint(1, 96, (1, PROMPT)), max_new_tokens=2, num_beams=2)


def test_no_thread_or_memory_growth_over_50_generates():
    model = tiny_model("llama")
    pqpatch.patch_model(model, pqpatch.PQCacheConfig(token_budget=0.4, min_context=16, sink_tokens=2, bits=3))
    ids = torch.randint(1, 96, (1, 40))
    for _ in range(3):  # warm up: pool threads start lazily
        model.generate(ids, max_new_tokens=3, do_sample=False)
    threads, tensors = threading.active_count(), live_tensor_count()
    for _ in range(50):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert threading.active_count() <= threads  # pools of models from other tests may be collected meanwhile
    assert live_tensor_count() <= tensors
    before = threading.active_count()
    pqpatch.unpatch_model(model)
    assert threading.active_count() < before  # the clustering pool is closed


def test_pq_layer_is_used_for_every_global_layer(arch):
    model = tiny_model(arch, layers=2)
    pqpatch.patch_model(model, _full())
    out = _gen(model, torch.randint(1, 96, (1, PROMPT)))  # noqa: F841 -- the output keeps the cache alive
    n_global = sum(isinstance(layer, PQLayer) for layer in model._pqpatch.last_cache.layers)
    assert n_global == (1 if arch == "gemma3" else 2)


@pytest.mark.triton
@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_triton_backend_full_budget_equals_dense(arch_name):
    """The Triton kernels wired into the decode path (interpreter on CPU): full budget == dense."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest sets TRITON_INTERPRET)
    model = tiny_model(arch_name).to(dev)
    ids = torch.randint(1, 96, (2, PROMPT), device=dev)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    ref = _gen(model, ids, mask)
    pqpatch.patch_model(model, _full(backend="triton"))
    out = _gen(model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantizer", pqpatch.config.QUANTIZERS)
def test_prefill_does_not_wait_for_kmeans(monkeypatch, quantizer):
    """Clustering runs in the pool: the prefill returns while k-means is still blocked; decode waits for it."""
    import pqpatch.clustering as clustering
    from pqpatch.cache import PQCache

    trainer = "train_rq" if quantizer == "residual" else "train_pq"  # the one the pool calls for this quantizer
    release, started = threading.Event(), threading.Event()
    real = getattr(clustering, trainer)

    def gated(*a, **k):
        started.set()
        assert release.wait(timeout=30), "the test never released k-means"
        return real(*a, **k)

    monkeypatch.setattr(clustering, trainer, gated)
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full(quantizer=quantizer))
    cache = PQCache(model, PROMPT + 4)
    kw = model._pqpatch.cache_kwarg
    with torch.no_grad():
        out = model(torch.randint(1, 96, (1, PROMPT)), **{kw: cache})  # returns although k-means is blocked
        assert started.wait(timeout=30)
        assert all(layer.future is not None and not layer.future.done() for layer in cache.pq_layers())
        release.set()
        model(out.logits[:, -1:].argmax(-1), **{kw: cache})  # the first decode step waits for the codebooks
    assert all(layer.future is None and layer.centroids.abs().sum() > 0 for layer in cache.pq_layers())


@pytest.mark.parametrize(
    "kw", [{}, {"max_length": 70}, {"max_new_tokens": 7}, {"max_length": 200, "max_new_tokens": 3}, "config"]
)
def test_generate_length_settings_match_transformers(kw):
    """The cache is sized as transformers resolves the length (default: 20 new tokens)."""
    from transformers import GenerationConfig

    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 40))
    if kw == "config":
        kw = {"generation_config": GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=0)}
    ref = model.generate(ids, do_sample=False, **kw) if "generation_config" not in kw else model.generate(ids, **kw)
    pqpatch.patch_model(model, _full())
    out = model.generate(ids, do_sample=False, **kw) if "generation_config" not in kw else model.generate(ids, **kw)
    assert out.shape == ref.shape and torch.equal(out, ref)


def test_cache_memory_is_released_after_generate():
    """Neither the patch state nor the attention modules keep the last call's KV cache alive."""
    import weakref

    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    out = _gen(model, torch.randint(1, 96, (1, PROMPT)))
    ref = weakref.ref(model._pqpatch.last_cache)
    assert ref() is not None  # the returned output still holds it
    assert all("_pqpatch_cache" not in m.__dict__ for m in model._pqpatch.attn_modules)
    stats = pqpatch.stats(model)
    del out
    gc.collect()
    assert ref() is None and model._pqpatch.last_cache is None
    assert pqpatch.stats(model) is stats and stats.steps == 2 * (NEW - 1)


def test_unpadded_prefill_needs_no_mask_on_pq_layers():
    """PQ layers expose only their filled prefix, so an unpadded causal prefill runs SDPA's is_causal path
    instead of materialising a [q, max_len] boolean mask (17 GB for a 128K prompt)."""
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    masks = []
    for m in model._pqpatch.attn_modules:
        m.register_forward_pre_hook(lambda mod, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
    model.generate(torch.randint(1, 96, (1, 300)), max_new_tokens=2, do_sample=False)
    assert len(masks) == 4 and masks[0] is None and masks[1] is None  # the prefill of both layers
    assert all(m.shape[-2] == 1 for m in masks[2:])  # decode: one [B, 1, 1, max_len] row (static shape)


@pytest.mark.parametrize(
    "prompt,heads,kv_heads,head_dim",
    [(1, 4, 4, 64), (17, 8, 2, 128), (97, 8, 1, 256), (1000, 4, 1, 64), (97, 4, 4, 128)],
)
def test_full_budget_equals_dense_odd_sizes(prompt, heads, kv_heads, head_dim):
    """Prompt lengths 1/17/97/1000, GQA groups 1/4/8, head dims 64/128/256 through the whole model."""
    model = tiny_model("qwen3", heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    ids = torch.randint(1, 96, (1, prompt))
    ref = _gen(model, ids)
    cfg = pqpatch.PQCacheConfig(token_budget=1.0, sink_tokens=4, local_tokens=5, min_context=1, bits=3)
    pqpatch.patch_model(model, cfg)
    out = _gen(model, ids)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(layer.active for layer in model._pqpatch.last_cache.pq_layers())
    assert pqpatch.stats(model).steps == 2 * (NEW - 1)
