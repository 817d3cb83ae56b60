"""The `pqpatch` command line: `pqpatch demo` and `pqpatch eval TASK`.

    pqpatch demo [--length 8k] [--budget 0.2] [--max-new-tokens 8] [--model PATH_OR_GGUF]
    pqpatch eval passkey|niah|kl|recall|kl,recall [--lengths 2k,4k] [--budgets 0.05,0.1] [--methods ...] --out DIR

Without --model both use the embedded default model (Gemma-3-270M, converted on first use; see
`pqpatch.models`). Heavy imports happen inside the commands, so `pqpatch --help` is instant.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main", "parse_length", "parse_budget"]

_METHODS = ("dense", "pq", "oracle", "streaming", "quest")
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
    if "." not in text and "e" not in text.lower():
        return int(v)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"a fractional budget must lie in (0, 1], got {text!r}")
    return v


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
    d.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate (default 8)")
    d.add_argument("--depth", type=_depth, default=0.5, help="relative position of the pass key (default 0.5)")
    d.add_argument("--model", default=None, help="a transformers checkpoint or .gguf file (default: Gemma-3-270M)")
    d.add_argument("--num-subspaces", type=int, default=None,
                   help="PQCacheConfig.num_subspaces (demo default: head_dim // 16, i.e. 16 for Gemma-3)")
    d.add_argument("--bits", type=int, default=None, help="PQCacheConfig.bits (demo default 8)")
    d.add_argument("--decode-threads", type=int, default=1, help=_THREADS_HELP)

    e = sub.add_parser("eval", help="run an evaluation grid and write JSON + PNG results")
    e.add_argument("task", type=_csv(str, _TASKS), help="passkey | niah | kl | recall | kl,recall")
    e.add_argument("--model", default=None, help="a transformers checkpoint or .gguf file (default: Gemma-3-270M)")
    e.add_argument("--lengths", type=_csv(parse_length), default=(2048, 4096, 8192, 16384))
    e.add_argument("--budgets", type=_csv(parse_budget), default=(0.05, 0.1, 0.2))
    e.add_argument("--methods", type=_csv(str, _METHODS), default=_METHODS)
    e.add_argument("--depths", type=_csv(_depth), default=(0.1, 0.5, 0.9), help="needle depths (passkey, niah)")
    e.add_argument("--variants", type=_csv(str, _VARIANTS), default=_VARIANTS, help="NIAH variants")
    e.add_argument("--teacher-tokens", type=int, default=32, help="decode steps scored by kl / recall (default 32)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--sink-tokens", type=int, default=None, help="PQCacheConfig.sink_tokens (default 32)")
    e.add_argument("--min-context", type=int, default=None, help="PQCacheConfig.min_context (default 1024)")
    e.add_argument("--bits", type=int, default=None, help="PQCacheConfig.bits (default 6)")
    e.add_argument("--num-subspaces", type=int, default=None, help="PQCacheConfig.num_subspaces (default 2)")
    e.add_argument("--no-blockwise-prefill", action="store_true",
                   help="prefill sliding-window layers with one dense SDPA call (slower; same result)")
    e.add_argument("--decode-threads", type=int, default=1, help=_THREADS_HELP)
    e.add_argument("--out", default="pqpatch-results", help="output folder (default ./pqpatch-results)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _base_config(args: argparse.Namespace) -> dict:
    fields = {"sink_tokens": args.sink_tokens, "min_context": args.min_context, "bits": args.bits,
              "num_subspaces": args.num_subspaces}
    return {k: v for k, v in fields.items() if v is not None}


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.report import summary_markdown, write_outputs
    from .eval.runner import EvalSettings, run_eval
    from .eval.tasks import HFCodec
    from .models import DEFAULT_MODEL, load_default_model, load_model

    try:
        settings = EvalSettings(
            tasks=tuple(args.task), lengths=args.lengths, budgets=args.budgets, methods=args.methods,
            depths=args.depths, variants=args.variants, teacher_tokens=args.teacher_tokens, seed=args.seed,
            base=_base_config(args), blockwise_prefill=not args.no_blockwise_prefill,
            decode_threads=args.decode_threads or None,
        )
    except ValueError as err:
        print(f"pqpatch eval: {err}", file=sys.stderr)
        return 2
    model, tok = load_default_model() if args.model is None else load_model(args.model)
    result = run_eval(model, HFCodec(tok), settings, progress=not args.quiet)
    result["model"] = args.model or DEFAULT_MODEL
    paths = write_outputs(result, args.out)
    print(summary_markdown(result))
    print("wrote: " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pqpatch` script and of `python -m pqpatch`."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .eval.demo import run_demo

        fields = {k: v for k, v in (("num_subspaces", args.num_subspaces), ("bits", args.bits)) if v is not None}
        run_demo(args.model, length=args.length, budget=args.budget, max_new_tokens=args.max_new_tokens,
                 depth=args.depth, decode_threads=args.decode_threads or None, **fields)
        return 0
    return _cmd_eval(args)


if __name__ == "__main__":
    sys.exit(main())
