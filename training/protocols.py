"""The evaluation protocols, run for several scorers on the same cases in one pass.

full:    the target is ranked among all actions (every id but PAD and UNK).
full-exclude-history:
         the same, but the actions in the case's input window (its last `window` events) are no candidates,
         except the target itself: the common variant for data where nobody repeats an action (Amazon).
sampled: the target is ranked among `negatives` actions drawn uniformly, without replacement, from those the
         user never interacted with (fixed seed), as in the published GRU4Rec/SASRec results. When fewer
         such actions exist, all of them are used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tqdm import tqdm

from app.manifest import UNK_ID
from training.metrics import RankAccumulator
from training.splits import EvalCases, Split

Protocol = Literal["full", "full-exclude-history", "sampled"]
EXCLUDE_HISTORY: Protocol = "full-exclude-history"
Scorer = Callable[[Sequence[np.ndarray]], np.ndarray]  # histories -> scores (B, V), higher is more likely


@dataclass(frozen=True)
class Evaluation:
    """metrics[protocol][scorer][metric], with how many cases and (sampled) negatives per case on average."""

    metrics: dict[str, dict[str, dict[str, float]]]
    cases: int
    mean_negatives: float | None


def sample_negatives(
    split: Split, cases: EvalCases, vocab_size: int, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (N, 1 + n) with the target in column 0, and which columns are real candidates (N, 1 + n)."""
    rng = np.random.default_rng(seed)
    candidates = np.zeros((len(cases), 1 + n), dtype=np.int64)
    valid = np.zeros((len(cases), 1 + n), dtype=bool)
    candidates[:, 0] = cases.targets
    valid[:, 0] = True
    seen: dict[int, set[int]] = {}
    for i, user in enumerate(cases.users.tolist()):
        if user not in seen:
            seen[user] = set(split.sequences[user].tolist())  # everything the user ever did, test included
        interacted = seen[user]
        pool_size = vocab_size - (UNK_ID + 1) - sum(1 for a in interacted if a > UNK_ID)
        if pool_size <= n:  # small vocabulary: take every action the user never did
            drawn = np.array(
                [a for a in range(UNK_ID + 1, vocab_size) if a not in interacted], dtype=np.int64
            )
        else:
            picked: dict[int, None] = {}
            while len(picked) < n:
                for a in rng.integers(UNK_ID + 1, vocab_size, size=2 * n).tolist():
                    if a not in interacted and a not in picked:
                        picked[a] = None
                        if len(picked) == n:
                            break
            drawn = np.fromiter(picked, dtype=np.int64, count=n)
        candidates[i, 1 : 1 + len(drawn)] = drawn
        valid[i, 1 : 1 + len(drawn)] = True
    return candidates, valid


def history_mask(
    histories: Sequence[np.ndarray], targets: np.ndarray, valid: np.ndarray, window: int | None
) -> np.ndarray:
    """Candidates (b, V) of full-exclude-history: `valid` without each history's last `window` actions, but
    with its target (a repeated action is still ranked, among the actions not in the window)."""
    mask = np.repeat(valid, len(histories), axis=0)  # (b, V)
    for i, history in enumerate(histories):
        mask[i, history[-window:] if window else history] = False
    mask[np.arange(len(histories)), targets] = valid[0, targets]
    return mask


def evaluate_cases(
    split: Split,
    cases: EvalCases,
    scorers: dict[str, Scorer],
    vocab_size: int,
    protocols: Sequence[Protocol] = ("full", "sampled"),
    negatives: int = 100,
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = False,
    window: int | None = None,
) -> Evaluation:
    """Every scorer under every protocol on `cases`; all scorers see the same sampled negatives.

    `window`: how many of a history's last events full-exclude-history masks (None: the whole history).
    """
    mean_negatives = None
    if "sampled" in protocols:
        candidates, cand_valid = sample_negatives(split, cases, vocab_size, negatives, seed)
        mean_negatives = float(cand_valid[:, 1:].sum(axis=1).mean()) if len(cases) else 0.0
    acc = {p: {name: RankAccumulator() for name in scorers} for p in protocols}
    full_valid = np.arange(vocab_size)[None, :] > UNK_ID  # (1, V)
    starts = range(0, len(cases), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
        sl = slice(start, start + batch_size)
        histories = [split.history(u, p) for u, p in zip(cases.users[sl], cases.positions[sl], strict=True)]
        targets = cases.targets[sl]  # (b,)
        ok = targets > UNK_ID  # (b,)
        if EXCLUDE_HISTORY in protocols:
            unseen = history_mask(histories, targets, full_valid, window)  # (b, V)
        for name, scorer in scorers.items():
            scores = scorer(histories)  # (b, V)
            if "full" in protocols:
                acc["full"][name].add(scores, None, targets, full_valid, ok)
            if EXCLUDE_HISTORY in protocols:
                acc[EXCLUDE_HISTORY][name].add(scores, None, targets, unseen, ok)
            if "sampled" in protocols:
                cand = candidates[sl]  # (b, 1 + n)
                picked = np.take_along_axis(scores, cand, axis=1)  # (b, 1 + n)
                acc["sampled"][name].add(
                    picked, cand, np.zeros(len(cand), dtype=np.int64), cand_valid[sl], ok
                )
    metrics: dict[str, dict[str, dict[str, float]]] = {
        str(p): {name: a.result() for name, a in per.items()} for p, per in acc.items()
    }
    return Evaluation(metrics, len(cases), mean_negatives)
