"""Fixed-size, right-padded batches: training windows with a target at every position, and evaluation inputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from app.manifest import PAD_ID


def training_windows(sequences: Sequence[np.ndarray], window: int) -> list[np.ndarray]:
    """Cut each training sequence into chunks of at most window + 1 events, from its end backwards.

    A chunk's first `window` events are inputs and its last `window` events targets, so every event but a
    user's first is a target exactly once. Sequences of one event give nothing to learn and are skipped.
    """
    chunks: list[np.ndarray] = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            start = max(0, end - window - 1)
            chunks.append(seq[start:end])
            end = start + 1  # the next chunk's last target is this chunk's first input
            if start == 0:
                break
    return chunks


def pad_right(rows: Sequence[np.ndarray], width: int | None = None) -> np.ndarray:
    """Stack 1-D id arrays into (B, width) int64, padded with PAD_ID on the right."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:width]
    return out


def training_batches(
    chunks: Sequence[np.ndarray], batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled batches of (inputs (B, T), targets (B, T)); chunks of similar length share a batch.

    Chunks are shuffled, sorted by length within pools of 50 batches (less padding), and the batches are
    shuffled again, so each epoch sees a different order.
    """
    order = rng.permutation(len(chunks))
    pool = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        part = order[start : start + pool]
        part = part[np.argsort([len(chunks[i]) for i in part], kind="stable")]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    for b in rng.permutation(len(batches)):
        rows = [chunks[i] for i in batches[b]]
        yield pad_right([r[:-1] for r in rows]), pad_right([r[1:] for r in rows])  # (B, T), (B, T)


def history_batch(histories: Sequence[np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's inputs for evaluation or prediction: each history's last `window` events, right-padded.

    Returns (action_ids (B, T), lengths (B,)) with T = the longest kept history (at least 1).
    """
    kept = [h[-window:] if len(h) > window else h for h in histories]
    lengths = np.array([len(h) for h in kept], dtype=np.int64)  # (B,)
    return pad_right(kept, max(1, int(lengths.max(initial=0)))), lengths
