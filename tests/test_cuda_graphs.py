"""CUDA graphs (GPU only): the compiled resident decode step is captured with mode="reduce-overhead" without
cudagraph skips, and a decode step makes no host synchronisation (checked with torch.cuda.set_sync_debug_mode)."""

import pytest
import torch
from conftest import tiny_model

import pqpatch

pytestmark = pytest.mark.gpu

PROMPT, NEW = 200, 12


def _cfg() -> pqpatch.PQCacheConfig:
    return pqpatch.PQCacheConfig(token_budget=0.3, sink_tokens=4, local_tokens=16, min_context=64, bits=6)


def test_reduce_overhead_generate_has_no_cudagraph_skips_and_equals_eager():
    from transformers import CompileConfig

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model("llama").cuda()
    pqpatch.patch_model(model, _cfg())
    ids = torch.randint(1, 96, (1, PROMPT), device="cuda")
    eager = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    for _ in range(2):  # the second call replays the recorded graph
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, compile_config=cc)
        assert torch.equal(out, eager)
    skips = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, dict(torch._dynamo.utils.counters["inductor"])


@torch.no_grad()
def test_compiled_decode_step_makes_no_host_sync():
    from pqpatch.cache import PQCache

    torch._dynamo.reset()
    model = tiny_model("llama").cuda()
    pqpatch.patch_model(model, _cfg())
    kw = model._pqpatch.cache_kwarg
    cache = PQCache(model, PROMPT + 64)
    ids = torch.randint(1, 96, (1, PROMPT), device="cuda")
    tok = model(ids, **{kw: cache}).logits[:, -1:].argmax(-1)
    cache.sync()  # k-means is waited for here, eagerly, before any compiled step
    step = torch.compile(lambda t: model(t, **{kw: cache}).logits[:, -1:].argmax(-1), fullgraph=True,
                         dynamic=False, mode="reduce-overhead")
    for _ in range(3):  # warm-up and recording may synchronise; replays must not
        tok = step(tok).clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            tok = step(tok).clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
