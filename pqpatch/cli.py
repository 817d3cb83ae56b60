"""The `pqpatch` command line: `pqpatch demo` and `pqpatch eval TASK`.

    pqpatch demo [--length 8k] [--budget 0.2] [--max-new-tokens 8] [--model PATH_OR_GGUF]
    pqpatch eval passkey|niah|kl|recall|kl,recall [--lengths 2k,4k] [--budgets 0.05,0.1] [--methods ...] --out DIR

Without --model both use the embedded default model (Gemma-3-270M, converted on first use; see
`pqpatch.models`). Heavy imports happen inside the commands, so `pqpatch --help` is instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["UsageError", "build_parser", "main", "parse_length", "parse_budget"]

_METHODS = ("dense", "pq", "oracle", "streaming", "quest", "snapkv")
_TASKS = ("passkey", "niah", "kl", "recall")
_VARIANTS = ("single", "multikey", "multivalue", "multiquery")
_THREADS_HELP = "torch threads while decoding on CPU (default 1: steadier on a busy machine; 0: leave as is)"


def parse_length(text: str) -> int:
    """ "8k" -> 8192, "1.5k" -> 1536, "3000" -> 3000."""
    t = text.strip().lower()
    try:
        n = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (use e.g. 2048 or 2k)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"length must be positive, got {text!r}")
    return n


def parse_budget(text: str) -> float | int:
    """ "0.2" -> 0.2 (a fraction of the context), "512" -> 512 (a token count)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a budget: {text!r} (a fraction like 0.2 or a count like 512)") from None
    if not math.isfinite(v):  # float() accepts "inf" and "nan"
        raise argparse.ArgumentTypeError(f"not a budget: {text!r} (a fraction in (0, 1] or a count >= 1)")
    if "." not in text and "e" not in text.lower():
        if v < 1:
            raise argparse.ArgumentTypeError(f"a token-count budget must be >= 1, got {text!r}")
        return int(v)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"a fractional budget must lie in (0, 1], got {text!r}")
    return v


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
        return v

    parse.__name__ = f"int >= {low}"  # argparse names the type in some messages
    return parse


def _csv(item_type, choices=None):
    def parse(text: str) -> tuple:
        items = tuple(item_type(x) for x in text.split(",") if x.strip())
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
        return items

    return parse


def _method(text: str) -> str:
    """A method with optional PQCacheConfig overrides, "pq:bits=8:num_subspaces=2"."""
    from .eval.engine import parse_method

    try:
        name, _ = parse_method(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if name not in _METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose from {','.join(_METHODS)}")
    return text.strip()


def _depth(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must lie in [0, 1], got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pqpatch", description="PQCache for Hugging Face transformers models.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="pass-key retrieval, dense vs patched decoding, on the default model")
    d.add_argument("--length", type=parse_length, default=8192, help="prompt length in tokens (default 8k)")
    d.add_argument("--budget", type=parse_budget, default=0.2, help="token budget (default 0.2)")
    d.add_argument("--max-new-tokens", type=_int_at_least(1), default=8, help="tokens to generate (default 8)")
    d.add_argument("--depth", type=_depth, default=0.5, help="relative position of the pass key (default 0.5)")
    d.add_argument("--model", default=None, help="a transformers checkpoint or .gguf file (default: Gemma-3-270M)")
    d.add_argument("--num-subspaces", type=int, default=None,
                   help="PQCacheConfig.num_subspaces (default: the library's, 2)")
    d.add_argument("--bits", type=int, default=None, help="PQCacheConfig.bits (default: the library's, 8)")
    d.add_argument("--decode-threads", type=_int_at_least(0), default=1, help=_THREADS_HELP)

    e = sub.add_parser("eval", help="run an evaluation grid and write JSON + PNG results")
    e.add_argument("task", type=_csv(str, _TASKS), help="passkey | niah | kl | recall | kl,recall")
    e.add_argument("--model", default=None, help="a transformers checkpoint or .gguf file (default: Gemma-3-270M)")
    e.add_argument("--lengths", type=_csv(parse_length), default=(2048, 4096, 8192, 16384))
    e.add_argument("--budgets", type=_csv(parse_budget), default=(0.05, 0.1, 0.2))
    e.add_argument("--methods", type=_csv(_method), default=_METHODS,
                   help="methods, each optionally with PQCacheConfig overrides: pq:bits=6,pq:bits=8 compares two "
                        "codebooks on the same prefills")
    e.add_argument("--depths", type=_csv(_depth), default=(0.1, 0.5, 0.9), help="needle depths (passkey, niah)")
    e.add_argument("--variants", type=_csv(str, _VARIANTS), default=_VARIANTS, help="NIAH variants")
    e.add_argument("--teacher-tokens", type=_int_at_least(1), default=32,
                   help="decode steps scored by kl / recall (default 32; fewer than the shortest length)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--seeds", type=_csv(_int_at_least(0)), default=None,
                   help="prompt seeds: each is its own haystack/document and prefill; cells report mean ± sd")
    e.add_argument("--kmeans-seeds", type=_csv(_int_at_least(0)), default=(0,),
                   help="k-means seed offsets: one more fork of every prefill per offset for codebook methods "
                        "(cheap: no new prefill); cells report mean ± sd")
    e.add_argument("--sink-tokens", type=int, default=None, help="PQCacheConfig.sink_tokens (default 32)")
    e.add_argument("--min-context", type=int, default=None, help="PQCacheConfig.min_context (default 1024)")
    e.add_argument("--bits", type=int, default=None, help="PQCacheConfig.bits (default 8)")
    e.add_argument("--num-subspaces", type=int, default=None, help="PQCacheConfig.num_subspaces (default 2)")
    e.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other PQCacheConfig field for every method, e.g. --set weighted_kmeans=true (repeatable)")
    e.add_argument("--no-blockwise-prefill", action="store_true",
                   help="prefill sliding-window layers with one dense SDPA call (slower; same result)")
    e.add_argument("--decode-threads", type=_int_at_least(0), default=1, help=_THREADS_HELP)
    e.add_argument("--out", default="pqpatch-results", help="output folder (default ./pqpatch-results)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _base_config(args: argparse.Namespace) -> dict:
    fields = {"sink_tokens": args.sink_tokens, "min_context": args.min_context, "bits": args.bits,
              "num_subspaces": args.num_subspaces}
    out = {k: v for k, v in fields.items() if v is not None}
    if getattr(args, "set", None):
        from .eval.engine import parse_method

        try:
            out.update(parse_method("pq:" + ":".join(args.set))[1])
        except ValueError as e:
            raise UsageError(f"--set: {e}") from None
    return out


class UsageError(Exception):
    """A bad argument found after parsing (a model path, an output folder, a value the model rejects): the
    command prints one line and exits with status 2, like argparse does."""


def _fail(command: str, err: BaseException) -> int:
    msg = " ".join(str(err).split())  # one line, whatever the exception put in it
    print(f"pqpatch {command}: error: {msg}", file=sys.stderr)
    return 2


def _check_out_dir(out: str) -> Path:
    """Create `out` if needed and make sure a file can be written there. Raises UsageError."""
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write results there ({e.strerror or e})") from None
    return path


def _looks_like_a_path(name: str) -> bool:
    """A name that can only mean a local file or folder (hub ids are "name" or "org/name")."""
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        return True
    return os.sep != "/" and os.sep in name


def _load(name: str | None):
    """(model, tokenizer) for --model; a path that is not there or is not a model raises UsageError."""
    from .models import load_default_model, load_model

    if name is None:
        return load_default_model()
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: a folder without config.json, not a transformers checkpoint")
        if path.is_file() and path.suffix != ".gguf":
            raise UsageError(f"--model {name}: not a model (give a checkpoint folder or a .gguf file)")
    elif _looks_like_a_path(name):
        raise UsageError(f"--model {name}: no such file or folder")
    try:
        return load_model(name)
    except (OSError, ValueError) as e:  # transformers: unknown hub id, unreadable or unsupported checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {name}: cannot load it as a causal LM ({first})") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.report import summary_markdown, write_outputs
    from .eval.runner import EvalSettings, preflight, run_eval
    from .eval.tasks import HFCodec
    from .models import DEFAULT_MODEL

    try:
        out = _check_out_dir(args.out)  # first: a typo here must not cost a whole evaluation
        settings = EvalSettings(
            tasks=tuple(args.task), lengths=args.lengths, budgets=args.budgets, methods=args.methods,
            depths=args.depths, variants=args.variants, teacher_tokens=args.teacher_tokens, seed=args.seed,
            seeds=args.seeds, kmeans_seeds=args.kmeans_seeds,
            base=_base_config(args), blockwise_prefill=not args.no_blockwise_prefill,
            decode_threads=args.decode_threads or None,
        )
        model, tok = _load(args.model)
        codec = HFCodec(tok)
        preflight(model, codec, settings)  # head dim vs num_subspaces, prompt lengths: before the heavy work
    except (UsageError, ValueError) as err:
        return _fail("eval", err)
    result = run_eval(model, codec, settings, progress=not args.quiet, check=False)
    result["model"] = args.model or DEFAULT_MODEL
    paths = write_outputs(result, out)
    print(summary_markdown(result))
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .eval.demo import prepare_demo, run_demo

    fields = {k: v for k, v in (("num_subspaces", args.num_subspaces), ("bits", args.bits)) if v is not None}
    try:
        print("[1/4] loading the model ...", file=sys.stderr, flush=True)
        model, tok = _load(args.model)
        plan = prepare_demo(model, tok, length=args.length, budget=args.budget, depth=args.depth, **fields)
    except (UsageError, ValueError) as err:
        return _fail("demo", err)
    run_demo(max_new_tokens=args.max_new_tokens, decode_threads=args.decode_threads or None, plan=plan)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pqpatch` script and of `python -m pqpatch`. Exit status 2: a bad argument (one line
    on stderr, found before any heavy work)."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _cmd_demo(args)
    return _cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
