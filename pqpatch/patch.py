"""patch_model / unpatch_model: switch a loaded transformers causal LM to PQ-sparse decoding and back."""

from __future__ import annotations

import copy
import inspect
import sys
import threading
import weakref
from dataclasses import dataclass, field

import torch

from .config import PQCacheConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")


@dataclass
class PatchState:
    """What patch_model changed on a model, so unpatch_model can restore it exactly."""

    config: PQCacheConfig
    pool: object  # clustering.ClusterPool
    old_attn_impl: str | None
    pq_layers: list[int]
    attn_modules: list[torch.nn.Module]
    hooks: list = field(default_factory=list)
    cache_kwarg: str = "past_key_values"
    last_stats: object = None  # stats.CacheStats of the latest generate() call
    _last_cache: object = None  # weakref to that call's cache: its memory goes when the caller drops it
    saved_attrs: dict = field(default_factory=dict)  # the model's own instance attributes that the patch replaced
    # layer index -> global index of the first KV head this process holds (tensor parallel; 0 otherwise)
    kv_head_offsets: dict = field(default_factory=dict)
    # one generate() at a time per model: the attention modules reach the cache through an attribute
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle of a patched model
        state = dict(self.__dict__)
        state.update(lock=None, _last_cache=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    @property
    def last_cache(self):
        """The latest generate() call's PQCache while something (e.g. its output) still holds it, else None."""
        return self._last_cache() if self._last_cache is not None else None


def _register() -> None:
    """Register "pqcache" with transformers (idempotent). The mask function must be registered too: without
    it transformers builds no causal mask for an unknown implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .attention import ATTN_NAME, pqcache_attention_forward

    AttentionInterface.register(ATTN_NAME, pqcache_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def head_dim_of(model_config) -> int:
    """Attention head dim of a (possibly multimodal) transformers config."""
    text = model_config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Self-attention modules: the ones transformers gives a `layer_idx` and q/k/v projections."""
    mods = [
        m for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "k_proj") and type(m).__name__.endswith("Attention")
    ]
    return sorted(mods, key=lambda m: m.layer_idx)


def _shard_rows(weight: torch.Tensor) -> tuple[int, int]:
    """(first global output row, local output rows) of a projection weight [out, in] on this process.

    A plain tensor is whole: (0, out). A DTensor (transformers' tensor parallel: `from_pretrained(tp_plan=...)`
    shards q/k/v_proj "colwise", i.e. Shard(0)) holds the rows its placement gives this rank; torch computes them.
    """
    dtensor_mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before it is imported
    dtensor = getattr(dtensor_mod, "DTensor", None)
    if dtensor is None or not isinstance(weight, dtensor):
        return 0, weight.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return int(offset[0]), int(shape[0])


def kv_head_offsets(mods: list[torch.nn.Module], head_dim: int) -> dict[int, int]:
    """Per attention layer, the global index of the first KV head this process holds: 0 without tensor
    parallelism; rank r of a colwise k_proj split holds KV heads [offset, offset + local heads).

    PQ layers seed k-means by global head (`ClusterPool.submit(head_offset=...)`), so a rank's codebooks, codes and
    selections for a head equal a single process's. Raises ValueError when a rank's share is not whole heads or
    its query heads are not the GQA groups of its KV heads (the local reshape [Hkv, G] would mix groups).
    """
    out = {}
    for m in mods:
        k_row, k_rows = _shard_rows(m.k_proj.weight)
        q_row, q_rows = _shard_rows(m.q_proj.weight)
        if k_row == 0 and k_rows == m.k_proj.weight.shape[0]:
            out[m.layer_idx] = 0
            continue
        if k_row % head_dim or k_rows % head_dim or q_row % head_dim or q_rows % head_dim:
            raise ValueError(
                f"layer {m.layer_idx}: this tensor-parallel rank holds k_proj rows [{k_row}, {k_row + k_rows}) and "
                f"q_proj rows [{q_row}, {q_row + q_rows}), not whole heads of {head_dim}; pqpatch needs the KV "
                f"heads split evenly across ranks (a tensor-parallel size that divides num_key_value_heads)"
            )
        hkv, hq = k_rows // head_dim, q_rows // head_dim
        if hkv == 0 or hq % hkv or q_row // head_dim != (k_row // head_dim) * (hq // hkv):
            raise ValueError(
                f"layer {m.layer_idx}: this rank's query heads (from {q_row // head_dim}, {hq} of them) are not the "
                f"GQA groups of its KV heads (from {k_row // head_dim}, {hkv} of them); shard q_proj and k_proj "
                f"colwise with the same tensor-parallel size"
            )
        out[m.layer_idx] = k_row // head_dim
    return out


def _prepare_native(model: torch.nn.Module, config: PQCacheConfig) -> None:
    """Build (or load from the cache) the native CPU kernels now, for a model whose decode steps will run the CPU
    backend: the first build compiles C sources (~2 s), which must not land inside the first decode step (a
    timed one, for a benchmark). A machine without a compiler logs why once and keeps the ATen path."""
    param = next(model.parameters(), None)
    if config.backend in ("auto", "cpu") and param is not None and param.device.type == "cpu":
        from .kernels import native

        native.available()


def patch_model(model: torch.nn.Module, config: PQCacheConfig | None = None) -> torch.nn.Module:
    """Patch `model` in place for PQCache decoding and return it.

    After this, `model.generate(...)` builds a `PQCache` for each call (unless you pass your own cache) and
    decodes with PQ-sparse attention; prefill stays exact. Raises ValueError for a second patch, an
    unsupported architecture or a config that does not fit the model.
    """
    config = config if config is not None else PQCacheConfig()
    if not isinstance(config, PQCacheConfig):
        raise ValueError(f"config must be a pqpatch.PQCacheConfig, got {type(config).__name__}")
    if getattr(model, "_pqpatch", None) is not None:
        raise ValueError("this model is already patched by pqpatch; call pqpatch.unpatch_model(model) first")
    mconf = getattr(model, "config", None)
    model_type = getattr(mconf, "model_type", None)
    text = mconf.get_text_config(decoder=True) if mconf is not None else None
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(model, "generate"):
        raise ValueError(
            f"pqpatch does not support model type {model_type!r} ({type(model).__name__}); supported causal LMs: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(text, "attn_logit_softcapping", None) is not None:
        raise ValueError("pqpatch does not support attention logit soft-capping (Gemma 2 style models)")
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"no attention modules found in {type(model).__name__}")
    head_dim = head_dim_of(mconf)
    if config.quantizer == "pq" and head_dim % config.num_subspaces:  # residual stages each span the head dim
        raise ValueError(
            f"num_subspaces={config.num_subspaces} must divide the model's head dim {head_dim} (quantizer='pq'); "
            f"choose one of {[d for d in (1, 2, 4, 8, 16) if head_dim % d == 0]}"
        )
    pq_layers = _full_attention_layers(text)
    offsets = kv_head_offsets(mods, head_dim)
    _prepare_native(model, config)

    _register()
    from .attention import ATTN_NAME, cache_capture_hook
    from .clustering import ClusterPool

    fwd = inspect.signature(model.forward).parameters
    state = PatchState(
        config=config,
        pool=ClusterPool(config.num_threads),
        old_attn_impl=mconf._attn_implementation,
        pq_layers=pq_layers,
        attn_modules=mods,
        cache_kwarg="cache" if "cache" in fwd else "past_key_values",
        kv_head_offsets=offsets,
    )
    for m in mods:
        state.hooks.append(m.register_forward_pre_hook(cache_capture_hook, with_kwargs=True))
    model.set_attn_implementation(ATTN_NAME)
    model._pqpatch = state
    for name, wrapper in (("generate", _generate), ("prepare_inputs_for_generation", _prepare_inputs)):
        if name in model.__dict__:
            state.saved_attrs[name] = model.__dict__[name]  # the user's own: unpatch puts it back
        setattr(model, name, _Patched(wrapper, model, name))
    return model


class _Patched:
    """model.<name> after patching: wrapper(model, original, ...). A small class rather than a partial so that
    transformers sees the original's signature and a patched model survives copy.deepcopy and pickle."""

    def __init__(self, wrapper, model: torch.nn.Module, name: str) -> None:
        self.wrapper, self.model, self.name = wrapper, model, name

    def original(self):
        state = self.model.__dict__.get("_pqpatch")
        own = state.saved_attrs.get(self.name) if state is not None else None
        return own if own is not None else getattr(type(self.model), self.name).__get__(self.model)

    def __call__(self, *args, **kwargs):
        return self.wrapper(self.model, self.original(), *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # transformers inspects these signatures
        return inspect.signature(self.original())


def _full_attention_layers(text_config) -> list[int]:
    """Layers that transformers' StaticCache gives a full-length layer (the others are sliding-window or chunked:
    they stay dense). Mirrors transformers' rule: `layer_types`, else `sliding_window` set means every layer
    slides (Mistral)."""
    from transformers.cache_utils import StaticCache, StaticLayer

    probe = StaticCache(config=text_config, max_cache_len=1)  # lazy: allocates nothing
    return [i for i, layer in enumerate(probe.layers) if type(layer) is StaticLayer]


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch_model`: original attention implementation, no hooks, the class's own generate()."""
    state: PatchState | None = getattr(model, "_pqpatch", None)
    if state is None:
        raise ValueError("this model is not patched by pqpatch")
    for h in state.hooks:
        h.remove()
    for m in state.attn_modules:
        m.__dict__.pop("_pqpatch_cache", None)
    model.set_attn_implementation(state.old_attn_impl)
    for name in ("generate", "prepare_inputs_for_generation"):
        model.__dict__.pop(name, None)
        if name in state.saved_attrs:
            setattr(model, name, state.saved_attrs[name])
    state.pool.shutdown()
    del model._pqpatch
    return model


def _max_new_tokens(model: torch.nn.Module, kwargs: dict, prompt_len: int) -> int:
    """Tokens generate() will add, resolved as transformers does: max_new_tokens, else max_length - prompt,
    else transformers' default of 20 new tokens. Call arguments win over a passed generation_config, which wins
    over the model's."""
    passed = kwargs.get("generation_config")
    configs = [kwargs, getattr(passed, "__dict__", {}), getattr(model.generation_config, "__dict__", {})]
    for name in ("max_new_tokens", "max_length"):
        value = next((c[name] for c in configs if c.get(name) is not None), None)
        if value is not None:
            return int(value) if name == "max_new_tokens" else max(int(value) - prompt_len, 1)
    return 20


def _prepare_inputs(model: torch.nn.Module, original, *args, **kwargs):
    """prepare_inputs_for_generation, run eagerly by generate() before every forward: a PQ cache whose k-means is
    still pending is synced here, so the (possibly compiled) decode step never waits or allocates."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    from .cache import PQCache

    if isinstance(cache, PQCache):
        cache.sync()
    return original(*args, **kwargs)


def _prompt(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for x in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if x is not None:
            return x
    return None


def _generate(model: torch.nn.Module, original, *args, **kwargs):
    """generate() with a PQCache sized for this call (prompt + max_new_tokens, rounded up to a bucket) unless the
    caller passed a cache. One call at a time per model (a lock): concurrent calls run one after the other."""
    from .cache import PQCache, bucket_length
    from .stats import cache_stats

    state: PatchState = model._pqpatch
    gen = kwargs.get("generation_config") or model.generation_config
    if not kwargs.get("use_cache", getattr(gen, "use_cache", True)):
        return original(*args, **kwargs)  # no cache: every step recomputes the whole sequence, densely
    beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1)) or 1
    nret = kwargs.get("num_return_sequences", getattr(gen, "num_return_sequences", 1)) or 1
    if beams > 1 or nret > 1:
        raise ValueError(
            "pqpatch decodes one sequence per prompt: use num_beams=1 and num_return_sequences=1, "
            "or repeat the prompt in the batch"
        )
    impl = kwargs.get("cache_implementation", getattr(gen, "cache_implementation", None))
    if impl not in (None, "static"):
        raise ValueError(
            f"pqpatch builds its own static PQ cache; cache_implementation={impl!r} cannot be combined with it. "
            f"Drop cache_implementation (or pass 'static'), or call pqpatch.unpatch_model(model) first"
        )
    kwargs.pop("cache_implementation", None)
    inputs = _prompt(args, kwargs)
    user_cache = kwargs.get("past_key_values", kwargs.get("cache"))
    with state.lock:
        if user_cache is not None:
            cache = user_cache
            if isinstance(cache, PQCache) and inputs is not None:
                # continuing a conversation: make room for the new turn and its answer
                cache.ensure_capacity(inputs.shape[1] + _max_new_tokens(model, kwargs, inputs.shape[1]))
        else:
            if inputs is None:
                raise ValueError(
                    "pqpatch's generate() needs the prompt (input_ids or inputs_embeds) to size its cache"
                )
            if impl is not None:  # "static": the PQ cache is static; transformers must not build its own
                gen = kwargs["generation_config"] = copy.deepcopy(gen)
                gen.cache_implementation = None
            prompt_len = inputs.shape[1]
            ctx = prompt_len + _max_new_tokens(model, kwargs, prompt_len)
            state._last_cache = None  # drop our reference to the previous call's cache before allocating this one
            cache = PQCache(model, max_cache_len=bucket_length(ctx), context_len=ctx)
            kwargs[state.cache_kwarg] = cache
        if isinstance(cache, PQCache):
            state._last_cache = weakref.ref(cache)
        try:
            return original(*args, **kwargs)
        finally:
            for m in state.attn_modules:  # the hook's reference would keep this cache alive until the next call
                m.__dict__.pop("_pqpatch_cache", None)
            if isinstance(cache, PQCache):
                cache.cancel()  # a call that ended before its first decode step leaves no k-means job behind
                state.last_stats = cache_stats(cache)
