"""The transformers Cache protocol on a patched model: crop (assisted / prompt-lookup decoding), use_cache=False,
continuing from a returned cache, cache_implementation="static", concurrent generate() calls, and the inputs
that used to be refused or silently wrong (Mistral's sliding window, all-zero mask rows, inputs_embeds)."""

import copy
import pickle
import threading

import pytest
import torch
from conftest import tiny_model

import pqpatch

PROMPT, NEW = 48, 10


def _full(**kw) -> pqpatch.PQCacheConfig:
    return pqpatch.PQCacheConfig(token_budget=1.0, sink_tokens=4, local_tokens=8, min_context=16, bits=4, **kw)


def _greedy(model, ids, **kw):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def _repetitive(n: int) -> torch.Tensor:
    """A prompt that repeats itself, so prompt-lookup decoding proposes drafts (and some get rejected)."""
    base = torch.randint(1, 96, (1, 12))
    return base.repeat(1, n // 12 + 1)[:, :n]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prompt_lookup_decoding_equals_dense(arch):
    """Prompt-lookup decoding verifies drafts with multi-token steps and crops rejected ones."""
    model = tiny_model(arch)
    ids = _repetitive(PROMPT)
    ref = _greedy(model, ids)
    pqpatch.patch_model(model, _full())
    out = _greedy(model, ids, prompt_lookup_num_tokens=3)
    assert torch.equal(out, ref)


def test_prompt_lookup_decoding_with_offload_equals_dense():
    model = tiny_model("llama")
    ids = _repetitive(PROMPT)
    ref = _greedy(model, ids)
    pqpatch.patch_model(model, _full(offload=True, gpu_cache_tokens=16, cache_block_tokens=4))
    assert torch.equal(_greedy(model, ids, prompt_lookup_num_tokens=3), ref)


def test_assisted_decoding_equals_dense():
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = torch.randint(1, 96, (1, PROMPT))
    ref = _greedy(model, ids)
    pqpatch.patch_model(model, _full())
    out = _greedy(model, ids, assistant_model=assistant)
    assert torch.equal(out, ref)


def test_crop_rewinds_the_layers():
    """A cropped cache takes new tokens where the removed ones were, and decodes as if they never existed."""
    from pqpatch.cache import PQCache

    model = tiny_model("qwen3")
    pqpatch.patch_model(model, _full())
    kw = model._pqpatch.cache_kwarg
    ids, nxt = torch.randint(1, 96, (1, PROMPT)), torch.randint(1, 96, (1, 1))
    logits = []
    with torch.no_grad():
        for draft in (0, 5):
            cache = PQCache(model, PROMPT + NEW + 8)
            model(ids, **{kw: cache})
            if draft:
                model(torch.randint(1, 96, (1, draft)), **{kw: cache})  # a draft, all of it rejected
                cache.crop(-draft)
                assert int(cache.get_seq_length()) == PROMPT
            for _ in range(3):  # decode steps after the crop
                out = model(nxt, **{kw: cache}).logits[:, -1]
            logits.append(out)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)


def test_use_cache_false_works():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, PROMPT))
    ref = _greedy(model, ids, use_cache=False)
    pqpatch.patch_model(model, _full())
    assert torch.equal(_greedy(model, ids, use_cache=False), ref)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_continue_from_returned_cache(arch):
    """A second turn on the cache the first returned gives what one call over the whole conversation gives."""
    model = tiny_model(arch)
    ids = torch.randint(1, 96, (1, PROMPT))
    turn2 = torch.randint(1, 96, (1, 7))
    first = _greedy(model, ids)
    whole_ref = _greedy(model, torch.cat([first, turn2], dim=1))
    pqpatch.patch_model(model, _full())
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, first)
    again = _greedy(model, torch.cat([out.sequences, turn2], dim=1), past_key_values=out.past_key_values)
    assert torch.equal(again, whole_ref)


def test_cache_implementation_static_works_and_others_are_refused():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, PROMPT))
    ref = _greedy(model, ids)
    pqpatch.patch_model(model, _full())
    assert torch.equal(_greedy(model, ids, cache_implementation="static"), ref)
    with pytest.raises(ValueError, match="cache_implementation='dynamic'"):
        _greedy(model, ids, cache_implementation="dynamic")


def test_two_threads_get_what_sequential_calls_get():
    model = tiny_model("llama")
    cfg = pqpatch.PQCacheConfig(token_budget=0.5, sink_tokens=4, local_tokens=8, min_context=16, bits=4)
    pqpatch.patch_model(model, cfg)
    prompts = [torch.randint(1, 96, (1, PROMPT + 8 * (i % 3))) for i in range(4)]
    want = [_greedy(model, p) for p in prompts]
    errors, wrong = [], []

    def worker(t: int) -> None:
        try:
            for i in range(10):
                j = (t + i) % len(prompts)
                if not torch.equal(_greedy(model, prompts[j]), want[j]):
                    wrong.append((t, i))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong


def test_mistral_sliding_window_layers_stay_dense():
    """Mistral with sliding_window set: every layer slides; the patched model equals the unpatched one."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16)
    model = tf.MistralForCausalLM(cfg).eval()
    ids = torch.randint(1, 96, (1, PROMPT))
    ref = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    pqpatch.patch_model(model, _full())
    assert model._pqpatch.pq_layers == []
    out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_all_zero_mask_row_gets_a_clear_error():
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    ids = torch.randint(1, 96, (2, PROMPT))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError, match="all zeros"):
        _greedy(model, ids, attention_mask=mask)


def test_inputs_embeds_only():
    model = tiny_model("llama")
    emb = model.get_input_embeddings()(torch.randint(1, 96, (1, PROMPT)))
    ref = model.generate(inputs_embeds=emb, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    pqpatch.patch_model(model, _full())
    out = model.generate(None, inputs_embeds=emb, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_deepcopy_and_pickle_of_a_patched_model():
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    ids = torch.randint(1, 96, (1, PROMPT))
    want = _greedy(model, ids)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(_greedy(clone, ids), want)
        pqpatch.unpatch_model(clone)


def test_unpatch_restores_a_user_generate():
    model = tiny_model("llama")
    mine = lambda *a, **k: "mine"  # noqa: E731
    model.generate = mine
    pqpatch.patch_model(model, _full())
    assert model.generate is not mine
    pqpatch.unpatch_model(model)
    assert model.generate is mine


def test_stats_follow_a_call_with_the_callers_cache():
    from pqpatch.cache import PQCache

    model = tiny_model("llama")
    pqpatch.patch_model(model, _full())
    _greedy(model, torch.randint(1, 96, (1, PROMPT)))
    first = pqpatch.stats(model)
    cache = PQCache(model, PROMPT + 40)
    model.generate(torch.randint(1, 96, (1, PROMPT)), past_key_values=cache, max_new_tokens=30, do_sample=False,
                   pad_token_id=0)
    st = pqpatch.stats(model)
    assert st is not first and st.steps == 2 * 29


@pytest.mark.parametrize("quantizer", pqpatch.config.QUANTIZERS)
def test_calls_that_end_before_decoding_leave_no_queued_kmeans(monkeypatch, quantizer):
    """max_new_tokens=1 ends before the first decode step: its k-means jobs must be dropped, not left queued for the
    next call to wait behind (three 1-token calls turned a 6 s call into 20 s)."""
    import pqpatch.clustering as clustering

    trainer = "train_rq" if quantizer == "residual" else "train_pq"  # the one the pool calls for this quantizer
    gate, ran = threading.Event(), []
    real = getattr(clustering, trainer)

    def gated(*a, **k):
        ran.append(1)
        assert gate.wait(timeout=30)
        return real(*a, **k)

    monkeypatch.setattr(clustering, trainer, gated)
    model = tiny_model("llama")
    pqpatch.patch_model(model, _full(num_threads=1, quantizer=quantizer))
    for _ in range(3):  # 2 layers x 3 calls = 6 jobs; the first blocks the single pool thread
        model.generate(torch.randint(1, 96, (1, PROMPT)), max_new_tokens=1, do_sample=False, pad_token_id=0)
    gate.set()
    assert model._pqpatch.pool.drain(timeout=30)
    assert len(ran) == 1  # only the job already running when its call ended; the 5 queued ones never ran
