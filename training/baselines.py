"""The baselines every run is compared with, fitted on the events before the test targets.

Each scores a batch of histories into (B, V) float64 scores, like the model; PAD and UNK are never candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.manifest import UNK_ID


class Popularity:
    """Scores each action by how often it occurs in the training events, whatever the history."""

    def __init__(self, train_sequences: Sequence[np.ndarray], vocab_size: int) -> None:
        counts = np.zeros(vocab_size, dtype=np.float64)
        for seq in train_sequences:
            counts += np.bincount(seq, minlength=vocab_size)
        self.counts = counts  # (V,)

    def __call__(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts))).copy()  # (B, V)


class Markov:
    """First-order Markov chain: scores the next action by how often it followed the history's last action.

    Popularity, scaled below one transition, breaks the ties among actions never seen after it (and scores a
    history that is empty or whose last action was never followed by anything), so that the chain is not
    penalised by the ties-count-against rule for having no opinion.
    """

    def __init__(self, train_sequences: Sequence[np.ndarray], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        pairs = [np.stack([s[:-1], s[1:]]) for s in train_sequences if len(s) >= 2]
        prev, nxt = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)  # (P,), (P,)
        keys, counts = np.unique(prev * vocab_size + nxt, return_counts=True)  # sorted by (prev, next)
        self.next_ids = keys % vocab_size  # (K,)
        self.counts = counts.astype(np.float64)  # (K,)
        self.row_start = np.searchsorted(
            keys // vocab_size, np.arange(vocab_size + 1)
        )  # (V + 1,) CSR pointers
        popularity = Popularity(train_sequences, vocab_size).counts
        self.backoff = popularity / (popularity.sum() + 1.0)  # (V,) each below 1: below any transition

    def __call__(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = np.broadcast_to(self.backoff, (len(histories), self.vocab_size)).copy()  # (B, V)
        for i, history in enumerate(histories):
            if len(history):
                last = int(history[-1])
                lo, hi = self.row_start[last], self.row_start[last + 1]
                scores[i, self.next_ids[lo:hi]] += self.counts[lo:hi]
        return scores


def recency_weights(n: int, decay: float) -> np.ndarray:
    """Weights (n,) of a history's last n events, oldest first: decay ** age, the last event (age 0) 1."""
    return decay ** np.arange(n - 1, -1, -1, dtype=np.float64)


class ItemKNN:
    """Item-to-item co-occurrence: two actions co-occur when one user did both within `window` events of each
    other in the training events, a pair d events apart weighing gap_decay ** (d - 1), a pair in reverse
    order (j before i) `backward` times that. similarity(i, j) = weighted co-occurrences / sqrt(count(i) *
    count(j)) (cosine-like on occurrence counts); a history scores action j by the sum over its last `recent`
    events e of decay ** age(e) * similarity(e, j). Popularity, scaled below every similarity, breaks the
    ties (as in Markov). The GRU4Rec papers' item-kNN, with a recency-weighted history instead of the last
    event alone.
    """

    def __init__(
        self,
        train_sequences: Sequence[np.ndarray],
        vocab_size: int,
        window: int = 50,
        recent: int = 10,
        decay: float = 0.5,
        gap_decay: float = 0.8,
        backward: float = 0.2,
    ) -> None:
        self.vocab_size, self.recent, self.decay = vocab_size, recent, decay
        seqs = [s for s in train_sequences if len(s)]
        ids = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)  # (n,) every training event
        owner = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])  # (n,) which user
        longest = max((len(s) for s in seqs), default=0)
        keys, weights = [], []
        for d in range(1, min(window, longest - 1) + 1):  # pairs d events apart within one user's events
            same = owner[:-d] == owner[d:]
            a, b = ids[:-d][same], ids[d:][same]
            keep = (a != b) & (a > UNK_ID) & (b > UNK_ID)
            a, b = a[keep], b[keep]
            w = gap_decay ** (d - 1)
            keys += [a * vocab_size + b, b * vocab_size + a]  # a then b; b's reverse pair
            weights += [np.full(len(a), w), np.full(len(a), w * backward)]
        key = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
        pairs, inverse = np.unique(key, return_inverse=True)  # sorted by (i, j): CSR order
        counts = np.bincount(
            inverse, weights=np.concatenate(weights) if weights else None, minlength=len(pairs)
        )
        freq = np.bincount(ids, minlength=vocab_size).astype(np.float64)  # (V,)
        rows, self.neighbours = pairs // vocab_size, pairs % vocab_size
        keep = counts > 0
        rows, self.neighbours = rows[keep], self.neighbours[keep]
        self.similarity = counts[keep] / np.sqrt(freq[rows] * freq[self.neighbours])  # (K,)
        self.row_start = np.searchsorted(rows, np.arange(vocab_size + 1))  # (V + 1,) CSR pointers
        floor = float(self.similarity.min(initial=1.0)) * decay ** max(recent - 1, 0)  # smallest contribution
        freq[: UNK_ID + 1] = 0.0
        self.backoff = floor * freq / (freq.sum() + 1.0)  # (V,) sums below any single contribution

    def __call__(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = np.broadcast_to(self.backoff, (len(histories), self.vocab_size)).copy()  # (B, V)
        for i, history in enumerate(histories):
            last = history[-self.recent :]
            for item, weight in zip(
                last.tolist(), recency_weights(len(last), self.decay).tolist(), strict=True
            ):
                lo, hi = self.row_start[item], self.row_start[item + 1]
                scores[i, self.neighbours[lo:hi]] += weight * self.similarity[lo:hi]
        return scores
