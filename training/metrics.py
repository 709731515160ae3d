"""Ranking metrics for one target per case: HR@k, NDCG@k, MRR@k, accuracy and macro-F1 of the top-1 prediction.

Ties count against the model: a target ranks below every other candidate whose score is greater than or
equal to its own, so a constant scorer gets no hits. A target that cannot be scored (the unknown action)
is never a hit at any k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KS = (1, 5, 10, 20)
UNRANKED = 2**31 - 1  # rank of a target that cannot be predicted: a miss at every k


def ranks(scores: np.ndarray, target_col: np.ndarray, valid: np.ndarray, target_ok: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target among that row's valid candidates.

    scores (N, C); target_col (N,) the target's column; valid (N, C) or (1, C) bool, which columns are
    candidates; target_ok (N,) False where the target cannot be predicted (its rank is then UNRANKED).
    """
    rows = np.arange(len(scores))
    target_score = scores[rows, target_col]  # (N,)
    at_least = (
        scores >= target_score[:, None]
    ) & valid  # (N, C): candidates ranked above the target (ties too)
    rank = at_least.sum(axis=1) - 1  # the target itself is counted once
    return np.where(target_ok, rank, UNRANKED).astype(np.int64)


def top1(scores: np.ndarray, target_col: np.ndarray, valid: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Column of each row's top-1 prediction under the same tie rule: the target only where it ranks first."""
    rows = np.arange(len(scores))
    others = np.where(valid, scores, -np.inf)  # (N, C)
    others[rows, target_col] = -np.inf
    best_other = others.argmax(axis=1)  # (N,)
    return np.where(rank == 0, target_col, best_other)


def macro_f1(targets: np.ndarray, predictions: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over every class that occurs as a target or a prediction."""
    if len(targets) == 0:
        return 0.0
    n = int(max(targets.max(), predictions.max())) + 1
    hits = targets == predictions
    tp = np.bincount(targets[hits], minlength=n).astype(np.float64)
    true = np.bincount(targets, minlength=n)
    pred = np.bincount(predictions, minlength=n)
    present = (true + pred) > 0
    f1 = 2 * tp[present] / (true[present] + pred[present])  # 2TP / (2TP + FP + FN)
    return float(f1.mean())


def summarize(rank: np.ndarray, targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """All metrics from 0-based ranks, target labels and top-1 predicted labels."""
    out: dict[str, float] = {}
    if len(rank) == 0:
        return out
    gain = 1.0 / np.log2(rank + 2.0)  # (N,) DCG of a single relevant item at this rank
    reciprocal = 1.0 / (rank + 1.0)  # (N,)
    for k in KS:
        hit = rank < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, gain, 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, reciprocal, 0.0).mean())
    out["accuracy"] = float((rank == 0).mean())
    out["macro_f1"] = macro_f1(targets, predictions)
    return out


@dataclass
class RankAccumulator:
    """Collects ranks and labels batch by batch; `result()` gives the metrics."""

    ranks: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    predictions: list[np.ndarray] = field(default_factory=list)

    def add(
        self,
        scores: np.ndarray,
        candidates: np.ndarray | None,
        target_col: np.ndarray,
        valid: np.ndarray,
        target_ok: np.ndarray,
    ) -> None:
        """Score one batch. candidates (N, C) maps columns to action ids; None means column = action id."""
        rank = ranks(scores, target_col, valid, target_ok)
        col = top1(scores, target_col, valid, rank)
        rows = np.arange(len(scores))
        if candidates is None:
            target, predicted = target_col, col
        else:
            target, predicted = candidates[rows, target_col], candidates[rows, col]
        self.ranks.append(rank)
        self.targets.append(np.asarray(target, dtype=np.int64))
        self.predictions.append(np.asarray(predicted, dtype=np.int64))

    def result(self) -> dict[str, float]:
        if not self.ranks:
            return {}
        return summarize(
            np.concatenate(self.ranks), np.concatenate(self.targets), np.concatenate(self.predictions)
        )
