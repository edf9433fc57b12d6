"""Server names made of random words ("amber-falcon"): memorable, DNS-safe and offline.

The word list ships with the package (`words.txt`), so generation needs no network and the
same seed always yields the same names.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources

from treewave.core.topology import DNS_LABEL, RESERVED_NAMES

__all__ = ["load_words", "random_names"]

WORDS_FILE = "words.txt"


@cache
def load_words() -> tuple[str, ...]:
    """The bundled word list, deduplicated and sorted so the order never depends on the file."""
    text = resources.files(__package__).joinpath(WORDS_FILE).read_text(encoding="utf-8")
    words = {line.strip() for line in text.splitlines() if line.strip()}
    bad = sorted(w for w in words if not DNS_LABEL.match(w))
    if bad:
        raise ValueError(f"{WORDS_FILE} holds words that are not DNS-safe: {', '.join(bad)}")
    return tuple(sorted(words))


def random_names(n: int, seed: int) -> list[str]:
    """`n` unique, DNS-safe, non-reserved names of two random words, reproducible by `seed`.

    While two-word names are plentiful (n up to a quarter of the possible pairs) they are
    drawn without numbers; beyond that every name gets its index appended, which makes
    uniqueness certain instead of relying on ever more retries.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    words = load_words()
    rng = random.Random(seed)
    pair_count = len(words) * (len(words) - 1)
    names: list[str] = []
    if n <= pair_count // 4:
        seen: set[str] = set()
        while len(names) < n:
            first, second = rng.sample(words, 2)
            name = f"{first}-{second}"
            if name in seen or name in RESERVED_NAMES:
                continue
            seen.add(name)
            names.append(name)
    else:
        for index in range(n):
            first, second = rng.sample(words, 2)
            names.append(f"{first}-{second}-{index}")
    return names
