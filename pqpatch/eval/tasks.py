"""Evaluation samples: passkey retrieval, RULER-style needle-in-a-haystack, and long documents for KL/recall.

Every sample is built to a target length in tokens of the model's own tokenizer: haystack sentences are
counted one by one and taken until the prompt is full, and needles go in at sentence boundaries at a relative
depth (0 = right after the instruction, 1 = right before the question).

`Codec` is the minimal tokenizer interface the harness needs; `HFCodec` wraps a transformers tokenizer and
`CharCodec` is a self-contained character-level stand-in for tests with tiny random models.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .haystack import NEEDLE_KEYS, ProseGenerator

__all__ = [
    "Codec", "HFCodec", "CharCodec", "Sample", "NIAH_VARIANTS", "passkey_sample", "niah_sample", "document_ids",
    "score_answer",
]

NIAH_VARIANTS = ("single", "multikey", "multivalue", "multiquery")


class Codec:
    """Text <-> token ids. `bos` is prepended to every prompt (None: nothing); `eos` ends generation."""

    bos: int | None = None
    eos: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class HFCodec(Codec):
    """A transformers tokenizer. Special tokens are added by hand (BOS once, at the very start)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        eos = tokenizer.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class CharCodec(Codec):
    """One token per printable ASCII character (id = ord(c) - 31, so 1..95); 0 is BOS. Needs vocab >= 96.
    Other characters (newlines) become spaces."""

    def __init__(self) -> None:
        self.bos = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 31 if 32 <= ord(c) < 127 else 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 31) if 1 <= i <= 95 else "" for i in ids)


@dataclass
class Sample:
    """One prompt. ids: the full prompt (BOS included); answers: strings the output must contain."""

    ids: list[int]
    answers: list[str]
    task: str
    variant: str
    length: int  # the target length (the real one is len(ids), within a sentence of it)
    depth: float
    max_new_tokens: int
    needle_positions: list[int] = field(default_factory=list)  # token offset of each needle in `ids`


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _build(
    codec: Codec, length: int, prefix: str, needles: list[tuple[float, str]], question: str, seed: int
) -> tuple[list[int], list[int]]:
    """Prompt ids of about `length` tokens: prefix, prose with needles at their depths, question.

    needles: (depth in [0, 1], text). Returns (ids, token offset of each needle in input order).
    """
    head = ([codec.bos] if codec.bos is not None else []) + codec.encode(prefix)
    tail = codec.encode(question)
    needle_ids = [codec.encode(" " + t.strip()) for _, t in needles]
    room = length - len(head) - len(tail) - sum(map(len, needle_ids))
    if room < 16:
        raise ValueError(f"length {length} is too short for this task's instruction, needles and question")
    gen = ProseGenerator(seed)
    sents: list[list[int]] = []
    used, batch = 0, 64
    while used < room:  # count sentences until the haystack is full
        more = gen.sentences(len(sents) + batch)[len(sents) :]
        for s in more:
            ids = codec.encode(" " + s)
            if used + len(ids) > room:
                used = room
                break
            sents.append(ids)
            used += len(ids)
        batch *= 2
    # sentence boundary closest to each depth (by haystack tokens)
    cum = [0]
    for s in sents:
        cum.append(cum[-1] + len(s))
    cuts = [min(range(len(cum)), key=lambda i: abs(cum[i] - d * cum[-1])) for d, _ in needles]
    order = sorted(range(len(needles)), key=lambda j: (cuts[j], j))
    ids, pos, i = list(head), [0] * len(needles), 0
    for j in order:
        while i < cuts[j]:
            ids += sents[i]
            i += 1
        pos[j] = len(ids)
        ids += needle_ids[j]
    for s in sents[i:]:
        ids += s
    return ids + tail, pos


def passkey_sample(codec: Codec, length: int, depth: float, seed: int = 0) -> Sample:
    """A 5-digit pass key said twice in one sentence at `depth`, asked for at the end."""
    rng = random.Random(f"passkey-{length}-{depth}-{seed}")
    key = _number(rng, 5)
    prefix = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will quiz you about it later.\n\n"
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "\n\nWhat is the pass key? The pass key is"
    ids, pos = _build(codec, length, prefix, [(depth, needle)], question, seed=rng.randrange(1 << 30))
    return Sample(ids, [key], "passkey", "passkey", length, depth, max_new_tokens=8, needle_positions=pos)


def niah_sample(codec: Codec, length: int, depth: float, variant: str = "single", seed: int = 0) -> Sample:
    """RULER-style needle in a haystack: "One of the special magic numbers for KEY is: VALUE."

    single: one needle; multikey: the target and 3 distractor keys; multivalue: 4 values for one key, all
    asked for; multiquery: 4 keys, 2 of them asked for. The target (first) needle sits at `depth`; the others
    at seeded random depths. Values are 7-digit numbers.
    """
    if variant not in NIAH_VARIANTS:
        raise ValueError(f"NIAH variant must be one of {NIAH_VARIANTS}, got {variant!r}")
    rng = random.Random(f"niah-{variant}-{length}-{depth}-{seed}")
    keys = rng.sample(NEEDLE_KEYS, 4)
    n = 1 if variant == "single" else 4
    values = [_number(rng, 7) for _ in range(n)]
    needle_keys = [keys[0]] * n if variant == "multivalue" else keys[:n]
    depths = [depth] + [rng.uniform(0.0, 1.0) for _ in range(n - 1)]
    needles = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths, needle_keys, values)]
    prefix = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n\n"
    )
    if variant in ("single", "multikey"):
        k = keys[0]
        question = (
            f"\n\nWhat is the special magic number for {k} mentioned in the provided text? "
            f"The special magic number for {k} mentioned in the provided text is"
        )
        answers, new = values[:1], 12
    elif variant == "multivalue":
        k = keys[0]
        question = (
            f"\n\nWhat are all the special magic numbers for {k} mentioned in the provided text? "
            f"The special magic numbers for {k} mentioned in the provided text are"
        )
        answers, new = values, 40
    else:
        q = f"{keys[0]} and {keys[1]}"
        question = (
            f"\n\nWhat are all the special magic numbers for {q} mentioned in the provided text? "
            f"The special magic numbers for {q} mentioned in the provided text are"
        )
        answers, new = values[:2], 24
    ids, pos = _build(codec, length, prefix, needles, question, seed=rng.randrange(1 << 30))
    return Sample(ids, answers, "niah", variant, length, depth, max_new_tokens=new, needle_positions=pos)


def document_ids(codec: Codec, length: int, seed: int = 0) -> list[int]:
    """A long prose document of exactly `length` tokens (BOS included), for teacher-forced KL and recall."""
    gen = ProseGenerator(seed + 7919)
    ids = [codec.bos] if codec.bos is not None else []
    n = max(64, length // 8)
    while len(ids) < length:
        ids = ([codec.bos] if codec.bos is not None else []) + codec.encode(gen.paragraphs(n))
        n *= 2
    return ids[:length]


def score_answer(output: str, answers: list[str]) -> float:
    """Share of `answers` that appear as whole numbers in the answer line of `output` (its first non-empty
    line: what follows is the model going on with new text). Digit runs are compared whole, so a longer number
    that merely contains the answer does not count (RULER's substring match would accept it)."""
    line = output.lstrip().split("\n", 1)[0]
    found = set(re.findall(r"\d+", line))
    return sum(a in found for a in answers) / len(answers)
