"""The two baselines every run is compared with, fitted on the events before the test targets.

Both score a batch of histories into (B, V) float64 scores, like the model; PAD and UNK are never candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
