"""A license-clean haystack: seeded, procedurally generated English prose.

Long-context retrieval tests need many thousands of tokens of ordinary text around the needle. Instead of
shipping a book, the prose is generated from original sentence templates and word lists written for this
package, so it is free of third-party copyright and reproducible from a seed. It reads as a loose chronicle of
villages, travellers, weather and trades. Two properties matter for the tests:

- it contains no digits, so a number in the prompt can only come from a needle;
- none of the needle key words (`NEEDLE_KEYS`) occur in it, so a key names exactly one needle.
"""

from __future__ import annotations

import random
import re

__all__ = ["NEEDLE_KEYS", "ProseGenerator"]

_WORDS = {
    "name": "Ada Bram Cora Dunstan Elsie Fenwick Greta Hollis Ines Jory Kestrel Linnet Marek Nell Osric Petra "
    "Quill Rosalind Silas Tamsin Ulric Vesna Wendel Yara Zephan Maren Tobin Odile Caspar Hedda".split(),
    "job": "miller weaver ferryman cartographer beekeeper stonemason potter shepherd clockmaker herbalist "
    "lamplighter cooper glassblower archivist boatwright chandler tanner innkeeper surveyor gardener".split(),
    "town": "Ashby Bellmoor Carrow Dunmere Eldham Fallowick Glenrith Harrowgate Ivybridge Kettlewell "
    "Larkspur Mossfield Northope Oakhollow Pennick Quarrendon Rushmere Saltcombe Thornbury Wrenfold".split(),
    "place": "the old mill|the harbour wall|the market square|the chapel on the hill|the ford below the weir|"
    "the long meadow|the salt marsh|the ridge road|the orchard gate|the lighthouse|the covered bridge|"
    "the quarry|the beech wood|the river bend|the winter pasture|the ruined tower".split("|"),
    "season": "spring|early summer|high summer|late autumn|the first frost|midwinter|the thaw|harvest time".split("|"),
    "time": "dawn|first light|midmorning|noon|the heat of the afternoon|dusk|nightfall|the small hours".split("|"),
    "weather": "a thin rain|a sea fog|a dry east wind|a heavy snow|a warm haze|a sudden hailstorm|"
    "a clear cold sky|a low grey cloud".split("|"),
    "thing": "a lantern|a bundle of letters|a wooden flute|a basket of pears|a coil of rope|a brass compass|"
    "a jar of honey|a sack of barley|a folded map|a pair of boots|a wheel of cheese|a bolt of blue cloth|"
    "a clay pipe|a ledger|a set of chisels|a small bell".split("|"),
    "animal": "heron|fox|badger|owl|hare|otter|kestrel|goat|mule|sheepdog|swan|crow".split("|"),
    "adj": "quiet|weathered|narrow|crooked|bright|patient|stubborn|generous|careful|restless|gentle|proud|"
    "tired|curious|cheerful|solemn".split("|"),
    "idea": "kindness|patience|a good harvest|an honest trade|the memory of the old roads|a warm hearth|"
    "the company of neighbours|a well-kept promise|the slow work of the seasons|a fair wage".split("|"),
    "people": "fishermen|children|farmers|traders|old women|apprentices|travellers|shepherds".split("|"),
    "doing": "mended their nets|gathered at the well|argued about the price of wool|sang in the tavern|"
    "drove the cattle home|stacked firewood against the walls|shared bread and cider|watched the road".split("|"),
}

_TEMPLATES = [
    "In {season}, {name} the {job} walked from {town} to {place}, carrying {thing}.",
    "{name} had always said that {idea} was worth more than silver.",
    "The {adj} {job} of {town} kept {thing} hidden behind a loose stone in the wall.",
    "By {time}, {weather} had settled over {place}, and the {people} of {town} {doing}.",
    "Nobody in {town} remembered who had first built {place}, though everyone had a story about it.",
    "A {animal} was seen near {place} at {time}, which the {people} took as a sign of {idea}.",
    "{name} and {name2} met at {place} and talked until {time} about {idea}.",
    "The road from {town} to {town2} was {adj} and long, and in {season} it was nearly impassable.",
    "When {weather} came in from the sea, the {people} {doing} and waited for it to pass.",
    "{name} the {job} traded {thing} for {thing2} and thought it a fair bargain.",
    "It was said in {town} that a {adj} {animal} guarded {place} through the night.",
    "Each year at {season} the {people} of {town} {doing}, as their grandparents had done.",
    "The {job} from {town2} arrived at {time} with {thing} and a letter for {name}.",
    "{name} kept a careful record of the weather, and in {season} wrote only of {weather}.",
    "Beyond {place} the land grew {adj}, and few travellers went farther than {town2}.",
    "The children of {town} liked to follow the {animal} along {place} until {time}.",
    "Some said {name} had learned the trade of a {job} from a {adj} stranger from {town2}.",
    "There was little to do in {season} but wait, mend tools, and speak of {idea}.",
    "At {time} the bell of {town} rang once, and the {people} {doing}.",
    "{name} lost {thing} near {place} and did not find it again until {season}.",
    "The {adj} old {job} of {town2} believed that {weather} always followed a quarrel.",
    "From the top of {place} one could see the roofs of {town} and, on a clear day, {town2}.",
    "{name} taught {name2} how to read the sky, and by {season} {name2} rarely got caught in {weather}.",
    "The inn at {town} was {adj} but warm, and its keeper never turned away a {job}.",
    "Travellers who reached {place} at {time} were given bread, a blanket, and news of {town2}.",
    "In the square of {town} the {people} {doing} while a {animal} watched from the roof.",
    "{name} the {job} and {name2} the {job2} had not spoken since the flood at {place}.",
    "Whoever crossed {place} in {season} was advised to carry {thing} and to keep to the path.",
    "The council of {town} met at {time} to decide what should be done about {place}.",
    "Later, {name} would say that the journey to {town2} had taught {them} the value of {idea}.",
]

# Needle keys: compound words that never occur in the generated prose.
NEEDLE_KEYS = (
    "amber-falcon", "cobalt-river", "velvet-anchor", "granite-lily", "copper-meadow", "silent-harbor",
    "crimson-tide", "hollow-pine", "ivory-comet", "rustic-lantern", "misty-summit", "golden-thimble",
    "scarlet-quarry", "frozen-orchard", "emerald-bridge", "lunar-kettle",
)


class ProseGenerator:
    """Deterministic prose: `sentences(n)` returns the same n sentences for the same seed."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _fill(self, rng: random.Random, template: str) -> str:
        picked: dict[str, str] = {}

        def word(slot: str) -> str:
            if slot == "them":
                return rng.choice(("her", "him", "them"))
            if slot in picked:  # a slot named twice in one template is the same word both times
                return picked[slot]
            base = slot.rstrip("2")
            pool = _WORDS[base]
            if slot != base:  # "name2": a second, different item of the same kind
                pool = [w for w in pool if w != picked.get(base)]
            picked[slot] = rng.choice(pool)
            return picked[slot]

        out = re.sub(r"\{(\w+)\}", lambda m: word(m.group(1)), template)
        return out[0].upper() + out[1:]

    def sentences(self, n: int) -> list[str]:
        """n sentences of prose (no digits, no needle keys), reproducible from the seed."""
        rng = random.Random(self.seed)
        out = []
        for _ in range(n):
            t = rng.choice(_TEMPLATES)
            out.append(self._fill(rng, t))
        return out

    def paragraphs(self, n_sentences: int) -> str:
        """The same sentences joined into paragraphs of 3-7 sentences."""
        rng = random.Random(self.seed + 1)
        sents, parts, i = self.sentences(n_sentences), [], 0
        while i < len(sents):
            k = rng.randint(3, 7)
            parts.append(" ".join(sents[i : i + k]))
            i += k
        return "\n\n".join(parts)
