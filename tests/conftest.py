"""Shared fixtures: tiny randomly initialised causal LMs of every supported architecture, and test markers."""

import gc
import os
import warnings

import pytest
import torch

# Triton kernels run in the interpreter on machines without a GPU. It must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: Triton kernel tests (interpreter on CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: loads the real default model; runs only with PQPATCH_SLOW=1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="set PQPATCH_SLOW=1 to run tests that load the default model")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("PQPATCH_SLOW") != "1":
            item.add_marker(skip_slow)


def tiny_model(arch: str, seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    """A randomly initialised causal LM of `arch` small enough for CPU tests (float32, eval mode)."""
    import transformers as tf

    common = dict(
        vocab_size=96, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        head_dim=head_dim,
    )
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "mistral":
        cfg, cls = tf.MistralConfig(sliding_window=None, **common), tf.MistralForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**common), tf.Qwen3ForCausalLM
    elif arch == "gemma3":
        # one sliding-window layer (stays dense) and one global layer (gets PQ), like Gemma 3's 5:1 pattern
        lt = ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
        cfg = tf.Gemma3TextConfig(sliding_window=16, layer_types=lt, query_pre_attn_scalar=head_dim, **common)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def live_tensor_count() -> int:
    """Tensors reachable by the garbage collector: a growth check across repeated generate() calls."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some lazy torch module objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.fixture(params=["native", "aten"])
def cpu_path(request):
    """Run a CPU-backend test twice: through the native kernels (`kernels/native.py`, what the backend picks where a C
    compiler works) and through the ATen path (what it falls back to without one). The native run is skipped, not
    silently turned into an ATen run, where the kernels cannot be compiled."""
    from pqpatch.kernels import native

    if request.param == "aten":
        with native.disabled():
            yield "aten"
    else:
        if not native.available():
            pytest.skip(f"native CPU kernels unavailable: {native.unavailable_reason}")
        yield "native"
