"""Action tokens <-> ids. Id 0 is padding, id 1 the unknown token; the vocabulary travels with the model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from app.manifest import PAD_ID, PAD_TOKEN, UNK_ID, UNK_TOKEN
from training.arrays import factorize
from training.errors import DataError


class Vocabulary:
    """Ordered action tokens; `tokens[i]` is the action of id i."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise DataError(f"vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}, got {tokens[:2]!r}")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}
        self._lookup = {
            t: i for t, i in self.index.items() if i != PAD_ID
        }  # an event named "<pad>" is unknown
        if len(self.index) != len(tokens):
            dup = next(t for t, c in Counter(tokens).items() if c > 1)
            raise DataError(f"vocabulary lists the action {dup!r} twice")

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Actions seen at least `min_count` times, most frequent first (first appearance breaks ties)."""
        counts: Counter[str] = Counter()
        for seq in sequences:
            counts.update(seq)
        counts.pop(PAD_TOKEN, None)  # an event literally named "<pad>"/"<unk>" maps onto the reserved ids
        counts.pop(UNK_TOKEN, None)
        kept = [
            t for t, c in counts.most_common() if c >= min_count
        ]  # most_common is stable for equal counts
        if not kept:
            raise DataError(f"no action occurs at least --min-count={min_count} times in the training events")
        return cls([PAD_TOKEN, UNK_TOKEN, *kept])

    @classmethod
    def from_codes(cls, tokens: Sequence[str], codes: np.ndarray, min_count: int = 1) -> Vocabulary:
        """`build` over integer action codes (`tokens[c]` is code c's action) in one pass of numpy: actions seen
        at least `min_count` times in `codes`, most frequent first, first appearance in `codes` breaking ties."""
        n = len(tokens)
        counts = np.bincount(codes, minlength=n)  # (A,)
        first = np.full(n, n, dtype=np.int64)  # (A,) rank of each code's first appearance
        seen = factorize(codes)[1].to_numpy()  # codes in order of first appearance (one hash pass)
        first[seen] = np.arange(len(seen))
        for reserved in (PAD_TOKEN, UNK_TOKEN):  # an event literally named "<pad>"/"<unk>" maps onto them
            if reserved in tokens:
                counts[list(tokens).index(reserved)] = 0
        order = np.lexsort((first, -counts))  # count descending, then first appearance
        kept = order[counts[order] >= max(min_count, 1)]
        if not len(kept):
            raise DataError(f"no action occurs at least --min-count={min_count} times in the training events")
        return cls([PAD_TOKEN, UNK_TOKEN, *(tokens[c] for c in kept.tolist())])

    def lookup(self, tokens: Sequence[str]) -> np.ndarray:
        """(A,) int64 ids of `tokens` (UNK_ID for actions not in the vocabulary): codes -> ids is lookup[codes]."""
        get = self._lookup.get
        return np.fromiter((get(t, UNK_ID) for t in tokens), dtype=np.int64, count=len(tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, actions: Sequence[str]) -> np.ndarray:
        """Ids of `actions`; actions not in the vocabulary become UNK_ID."""
        get = self._lookup.get
        return np.fromiter((get(a, UNK_ID) for a in actions), dtype=np.int64, count=len(actions))

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID
