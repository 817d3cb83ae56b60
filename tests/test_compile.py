"""Compiled decode: generate(compile_config=...) and model.compile() capture the patched decode step whole
(fullgraph, no recompiles across steps or across calls in one shape bucket) and give eager pqpatch's tokens."""

import pytest
import torch
from conftest import tiny_model

import pqpatch
from pqpatch.cache import PQLayer, bucket_length

NEW = 12


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles a new model's forward: dynamo keys its cache (and its recompile limit of 8) by code
    object, so graphs of earlier tests' models would count against this test's limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Counter:
    """A torch.compile backend that counts the graphs it is handed (a recompile or a graph break adds one)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward

    def __deepcopy__(self, memo):  # CompileConfig.to_dict deep-copies its backend: keep counting here
        return self


def _compile_config(backend):
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
    cc._compile_all_devices = True  # generate() compiles decode on CPU too
    return cc


def _cfg(budget) -> pqpatch.PQCacheConfig:
    return pqpatch.PQCacheConfig(token_budget=budget, sink_tokens=4, local_tokens=8, min_context=16, bits=4)


def _greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_compiled_generate_equals_eager_one_graph(arch):
    model = tiny_model(arch)
    prompts = [torch.randint(1, 96, (1, 56)) for _ in range(3)]  # one bucket, different tokens
    dense = [_greedy(model, p) for p in prompts]
    for budget in (1.0, 0.3):
        pqpatch.patch_model(model, _cfg(budget))
        eager = [_greedy(model, p) for p in prompts]
        if budget == 1.0:
            assert all(torch.equal(e, d) for e, d in zip(eager, dense))
        counter = Counter()
        cc = _compile_config(counter)
        for p, want in zip(prompts, eager):
            assert torch.equal(_greedy(model, p, compile_config=cc), want)
        assert counter.graphs == 1  # fullgraph=True: no break; one graph for 3 calls x NEW - 1 steps
        st = pqpatch.stats(model)
        assert st.steps > 0  # the sparse path ran
        pqpatch.unpatch_model(model)
        model.__dict__.pop("_compiled_call", None)  # transformers caches the compiled call on the model


def test_integer_budget_shares_one_graph_across_prompt_lengths():
    """Different prompt lengths in one bucket: equal shapes, equal split (a token count), one graph."""
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(20))
    lengths = [40, 45, 50]
    assert len({bucket_length(n + NEW) for n in lengths}) == 1
    counter = Counter()
    cc = _compile_config(counter)
    for n in lengths:
        ids = torch.randint(1, 96, (1, n))
        assert torch.equal(_greedy(model, ids, compile_config=cc), _greedy(model, ids))
    assert counter.graphs == 1


@pytest.mark.parametrize("selection", ["pq", "oracle", "streaming"])
def test_fractional_budget_shares_one_graph_across_prompt_lengths(selection):
    """Different prompt lengths in one bucket under a fractional budget: the split of each real context lives in
    device tensors and fills the bucket's slots, so one graph serves all, with eager pqpatch's tokens."""
    model = tiny_model("llama")
    cfg = pqpatch.PQCacheConfig(token_budget=0.3, sink_tokens=4, local_tokens=0.25, min_context=16, bits=4,
                                selection=selection)
    pqpatch.patch_model(model, cfg)
    lengths = [40, 45, 50]
    assert len({bucket_length(n + NEW) for n in lengths}) == 1
    assert len({cfg.budget_split(n + NEW) for n in lengths}) == 3  # three different real splits
    counter = Counter()
    cc = _compile_config(counter)
    for n in lengths:
        ids = torch.randint(1, 96, (1, n))
        out = _greedy(model, ids, compile_config=cc, return_dict_in_generate=True)
        assert torch.equal(out.sequences, _greedy(model, ids))
        layer = out.past_key_values.pq_layers()[0]
        assert (layer.sink, layer.local, layer.topk) == PQLayer._split(cfg, n + NEW)  # the real context's split
    assert counter.graphs == 1


def test_model_compile_then_generate():
    """model.compile(): the prefill's eager bookkeeping is a graph break; decode compiles once for all calls."""
    model = tiny_model("llama")
    pqpatch.patch_model(model, _cfg(0.3))
    prompts = [torch.randint(1, 96, (1, 56)) for _ in range(3)]
    eager = [_greedy(model, p) for p in prompts]
    counter = Counter()
    model.compile(backend=counter, dynamic=False)
    try:
        out = _greedy(model, prompts[0])
        after_first = counter.graphs
        assert torch.equal(out, eager[0])
        for p, want in zip(prompts[1:], eager[1:]):
            assert torch.equal(_greedy(model, p), want)
        assert counter.graphs == after_first  # no recompile on later calls
    finally:
        torch._dynamo.reset()


def test_offload_with_compile_config_stays_eager_and_sparse():
    """Offloaded layers are not compileable (the host gather needs the indices on the host): generate() with a
    compile_config keeps them eager instead of failing or dropping the PQ path."""
    model = tiny_model("llama")
    cfg = pqpatch.PQCacheConfig(token_budget=0.3, sink_tokens=4, local_tokens=8, min_context=16, bits=4,
                                offload=True, gpu_cache_tokens=64, cache_block_tokens=8)
    pqpatch.patch_model(model, cfg)
    ids = torch.randint(1, 96, (1, 56))
    want = _greedy(model, ids)
    counter = Counter()
    assert torch.equal(_greedy(model, ids, compile_config=_compile_config(counter)), want)
    assert counter.graphs == 0 and pqpatch.stats(model).steps > 0
