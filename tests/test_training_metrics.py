"""training.metrics / protocols / baselines against hand-computed cases, ties included."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest

from training.baselines import ItemKNN, Markov, Popularity, recency_weights
from training.events import EventLog
from training.metrics import UNRANKED, RankAccumulator, macro_f1, ranks, summarize, top1
from training.protocols import EXCLUDE_HISTORY, evaluate_cases, history_mask, sample_negatives
from training.splits import Split, leave_one_out

# columns: <pad>, <unk>, a, b, c, d
SCORES = np.array(
    [
        [0.0, 0.0, 0.5, 0.3, 0.5, 0.1],  # target a (2) ties with c: rank 1, not 0
        [0.0, 0.0, 0.5, 0.3, 0.5, 0.1],  # target d (5): a, c, b above it: rank 3
        [0.0, 0.0, 0.2, 0.9, 0.5, 0.1],  # target b (3) strictly best: rank 0
        [0.0, 0.0, 0.2, 0.9, 0.5, 0.1],  # target <unk> (1): never a hit
    ]
)
TARGETS = np.array([2, 5, 3, 1])
VALID = np.arange(6)[None, :] > 1
OK = TARGETS > 1


def test_ranks_count_ties_against_the_model() -> None:
    assert ranks(SCORES, TARGETS, VALID, OK).tolist() == [1, 3, 0, UNRANKED]
    constant = np.ones((2, 6))
    assert ranks(constant, np.array([2, 4]), VALID, np.array([True, True])).tolist() == [3, 3]  # last of 4


def test_top1_is_the_target_only_when_strictly_first() -> None:
    rank = ranks(SCORES, TARGETS, VALID, OK)
    assert top1(SCORES, TARGETS, VALID, rank).tolist() == [4, 2, 3, 3]  # row 0: c wins the tie


def test_summary_against_hand_computed_values() -> None:
    acc = RankAccumulator()
    acc.add(SCORES, None, TARGETS, VALID, OK)
    m = acc.result()
    assert m["hr@1"] == m["accuracy"] == pytest.approx(1 / 4)
    assert m["hr@5"] == m["hr@20"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5) + 1) / 4)
    assert m["mrr@5"] == pytest.approx((1 / 2 + 1 / 4 + 1) / 4)
    assert m["mrr@1"] == pytest.approx(1 / 4)
    # predictions c, a, b, b for targets a, d, b, <unk>: only b has a true positive (F1 = 2/(2+1+0))
    assert m["macro_f1"] == pytest.approx((0 + 0 + 2 / 3 + 0 + 0) / 5)  # classes a, b, c, d, <unk>
    assert set(m) == {f"{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (1, 5, 10, 20)} | {
        "accuracy",
        "macro_f1",
    }


def test_macro_f1_hand_computed() -> None:
    targets, predictions = np.array([1, 1, 2, 3]), np.array([1, 2, 2, 2])
    # class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 1 fp 2 fn 0 -> 1/2; class 3: tp 0 -> 0
    assert macro_f1(targets, predictions) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert summarize(np.array([], dtype=np.int64), targets[:0], predictions[:0]) == {}


def _split(sequences: list[list[int]]) -> Split:
    log = EventLog.from_sequences([[str(a) for a in s] for s in sequences])
    return Split(leave_one_out(log), [np.array(s, dtype=np.int64) for s in sequences])


def test_sampled_negatives_avoid_the_users_actions_and_are_reproducible() -> None:
    split = _split([[2, 3, 4, 5], [6, 7, 8]])
    cases = split.cases("test")
    cand, valid = sample_negatives(split, cases, vocab_size=40, n=10, seed=3)
    assert cand[:, 0].tolist() == cases.targets.tolist() and valid.all()
    for row, user in zip(cand, cases.users, strict=True):
        negatives = set(row[1:].tolist())
        assert len(negatives) == 10 and not negatives & set(split.sequences[user].tolist())
        assert min(negatives) >= 2  # never <pad> or <unk>
    again, _ = sample_negatives(split, cases, vocab_size=40, n=10, seed=3)
    assert np.array_equal(cand, again)
    small, small_valid = sample_negatives(split, cases, vocab_size=9, n=10, seed=3)
    assert small_valid[0].sum() == 1 + 3  # only 6, 7, 8 were never touched by user 0
    assert sorted(small[0, 1:4].tolist()) == [6, 7, 8]


def test_popularity_and_markov_baselines() -> None:
    train = [np.array([2, 3, 4]), np.array([2, 3, 5]), np.array([2, 4])]
    pop = Popularity(train, vocab_size=7)
    assert pop([np.array([5])])[0].tolist() == [0, 0, 3, 2, 2, 1, 0]
    markov = Markov(train, vocab_size=7)
    backoff = np.array([0, 0, 3, 2, 2, 1, 0]) / 9  # popularity / (events + 1): below one transition
    scores = markov([np.array([4, 2]), np.array([6]), np.array([], dtype=np.int64)])
    assert scores[0] == pytest.approx(backoff + np.array([0, 0, 0, 2, 1, 0, 0]))  # 2 -> 3 twice, 2 -> 4 once
    assert scores[1] == pytest.approx(backoff)  # 6 never seen: popularity
    assert scores[2] == pytest.approx(backoff)  # empty history: popularity


class Oracle:
    """Scores the true next action highest; the split's sequences tell it what that is."""

    def __init__(self, split: Split, vocab: int) -> None:
        self.next = {tuple(s[:i].tolist()): int(s[i]) for s in split.sequences for i in range(1, len(s))}
        self.vocab = vocab

    def __call__(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = np.zeros((len(histories), self.vocab))
        for i, h in enumerate(histories):
            scores[i, self.next[tuple(h.tolist())]] = 1.0
        return scores


def test_evaluate_cases_runs_both_protocols_for_every_scorer() -> None:
    split = _split([[2, 3, 4, 5, 6], [3, 4, 6, 2], [7, 8, 9], [2, 3]])
    vocab = 12
    result = evaluate_cases(
        split,
        split.cases("test"),
        {"oracle": Oracle(split, vocab), "constant": lambda h: np.ones((len(h), vocab))},
        vocab,
        negatives=5,
        seed=0,
        batch_size=2,
    )
    assert result.cases == 3 and result.mean_negatives == 5
    for protocol in ("full", "sampled"):
        assert result.metrics[protocol]["oracle"]["hr@1"] == 1.0
        assert result.metrics[protocol]["oracle"]["macro_f1"] == 1.0
        assert result.metrics[protocol]["constant"]["hr@5"] == 0.0  # all tied: last among 6 candidates
    assert result.metrics["full"]["constant"]["hr@10"] == 1.0  # 10 candidate actions: rank 9


def test_item_knn_hand_computed() -> None:
    # user 0: 2 3 4, user 1: 3 5; window 2, pairs d events apart weigh 0.5 ** (d - 1), reverse pairs 0.25x
    train = [np.array([2, 3, 4]), np.array([3, 5])]
    knn = ItemKNN(train, vocab_size=7, window=2, recent=2, decay=0.5, gap_decay=0.5, backward=0.25)
    count = np.array([0, 0, 1, 2, 1, 1, 0], dtype=np.float64)  # occurrences
    forward = {
        (2, 3): 1.0,
        (3, 4): 1.0,
        (3, 5): 1.0,
        (2, 4): 0.5,
    }  # (earlier, later): weighted co-occurrences
    sim = np.zeros((7, 7))
    for (i, j), w in forward.items():
        sim[i, j] += w / math.sqrt(count[i] * count[j])
        sim[j, i] += 0.25 * w / math.sqrt(count[i] * count[j])
    floor = sim[sim > 0].min() * 0.5  # the smallest similarity at the oldest recent event's weight
    backoff = floor * count / (count.sum() + 1)
    scores = knn([np.array([2, 3]), np.array([6]), np.array([], dtype=np.int64)])
    assert scores[0] == pytest.approx(backoff + 0.5 * sim[2] + 1.0 * sim[3])  # 3 is the last event: weight 1
    assert scores[1] == pytest.approx(backoff) and scores[2] == pytest.approx(backoff)  # nothing known
    assert scores[0, 4] > scores[0, 5] > scores[0, 2]  # 4 followed 2 and 3; 5 followed 3; 2 only preceded 3
    assert np.all(scores[:, :2] == 0)  # PAD and UNK never scored
    assert recency_weights(3, 0.5).tolist() == [0.25, 0.5, 1.0]


def test_history_mask_keeps_the_target_and_only_the_window() -> None:
    valid = np.arange(8)[None, :] > 1
    histories = [np.array([2, 3, 4]), np.array([5, 5])]
    mask = history_mask(histories, np.array([3, 6]), valid, window=2)
    assert mask[0].tolist() == [False, False, True, True, False, True, True, True]  # 2 is outside the window
    assert mask[1].tolist() == [False, False, True, True, True, False, True, True]


def test_exclude_history_ranks_the_target_among_unseen_actions() -> None:
    split = _split([[2, 3, 4, 5], [3, 2, 6]])
    vocab = 8
    # scores the history highest, then the target: ranked 3rd (user 0) and 3rd (user 1) among all actions,
    # first once the window (its last 2 events) is excluded
    repeat_then_target = Oracle(split, vocab)

    def scorer(histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = repeat_then_target(histories)
        for i, h in enumerate(histories):
            scores[i, h[-2:]] = 2.0
        return scores

    result = evaluate_cases(
        split, split.cases("test"), {"s": scorer}, vocab, ("full", EXCLUDE_HISTORY), window=2
    )
    assert result.metrics["full"]["s"]["hr@1"] == 0.0 and result.metrics["full"]["s"]["hr@5"] == 1.0
    assert result.metrics["full"]["s"]["mrr@5"] == pytest.approx(1 / 3)
    assert result.metrics[EXCLUDE_HISTORY]["s"]["hr@1"] == 1.0
