"""Training losses over the states at a batch's real positions: full softmax, sampled softmax, BCE.

ce:      cross-entropy over every action (what the full-ranking protocol measures).
sampled: cross-entropy over the target and `negatives` actions shared by every position of the batch,
         drawn uniformly or by popularity (with the logQ correction: each candidate's score minus the log of
         its expected count among the negatives); a negative equal to the target is masked out. Far cheaper
         per step than ce on a large vocabulary, and trains what the sampled protocol measures.
bce:     binary cross-entropy of the target against one uniform negative per position (SASRec's loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from app.manifest import UNK_ID
from training.config import TrainConfig
from training.model import NextActionModel, PrefixHistory


class Loss:
    """Computes one batch's mean loss and its number of scored positions; holds the negative sampler."""

    def __init__(self, config: TrainConfig, vocab_size: int, counts: torch.Tensor | None = None) -> None:
        self.kind, self.negatives, self.logq = config.loss, config.loss_negatives, config.logq
        self.vocab_size = vocab_size
        weights = torch.ones(vocab_size, dtype=torch.float64)  # (V,)
        if config.loss_sampler == "popularity" and counts is not None:
            weights = counts.to(torch.float64).clamp(min=0)
        weights[: UNK_ID + 1] = 0.0  # PAD and UNK are never negatives
        self.q = (weights / weights.sum()).to(torch.float32)  # (V,) sampling distribution
        self.uniform = config.loss_sampler == "uniform" or counts is None

    def sample(self, n: int) -> torch.Tensor:
        """n negative ids (with replacement) from the sampling distribution, on the training device."""
        if self.uniform:
            return torch.randint(UNK_ID + 1, self.vocab_size, (n,), device=self.q.device)
        return torch.multinomial(self.q, n, replacement=True)

    def __call__(
        self, model: NextActionModel, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        states, kept, history = model.position_states(inputs, targets)  # (N, H), (N,)
        n = int(kept.numel())
        if self.q.device != kept.device:
            self.q = self.q.to(kept.device)  # once: the sampler lives where the model trains
        if n == 0:  # a zero that reaches every parameter: under DDP every process still steps together
            return sum(p.sum() for p in model.parameters()) * 0.0 + states.sum() * 0.0, 0
        if self.kind == "ce":
            logits = model.logits(states)  # (N, V)
            if history is not None and model.history_bias is not None:
                logits = logits + model.history_bias * history.seen()  # (N, V)
            return F.cross_entropy(logits, kept), n
        h = model.project(states)  # (N, D)
        if self.kind == "bce":
            negatives = self.sample(n).to(kept.device)  # (N,) one per position
            pos = _scores(model, h, kept, history, kept.unsqueeze(1)).squeeze(1)  # (N,)
            neg = _scores(model, h, negatives, history, negatives.unsqueeze(1)).squeeze(1)  # (N,)
            return (F.softplus(-pos) + F.softplus(neg)).mean(), n
        negatives = self.sample(self.negatives).to(kept.device)  # (K,) shared by the batch
        candidates = torch.cat([kept.unsqueeze(1), negatives.unsqueeze(0).expand(n, -1)], dim=1)  # (N, 1 + K)
        logits = _scores(model, h, torch.cat([kept, negatives]), history, candidates, shared=n)  # (N, 1 + K)
        if self.logq and not self.uniform:
            logits = logits - torch.log(self.q[candidates] * self.negatives + 1e-12)
        hit = candidates[:, 1:] == kept.unsqueeze(1)  # (N, K): a negative that is the target
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(hit, -math.inf)], dim=1)
        return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=kept.device)), n


def _scores(
    model: NextActionModel,
    h: torch.Tensor,
    ids: torch.Tensor,
    history: PrefixHistory | None,
    columns: torch.Tensor,
    shared: int = 0,
) -> torch.Tensor:
    """Scores (N, C) of candidate actions `columns` (N, C) from projected states h (N, D).

    With `shared` = N, ids is (N + K,): the N targets then K negatives shared by every row, and columns is
    (N, 1 + K) = [target, negatives...]; otherwise ids (N,) is one candidate per row (C = 1).
    """
    w, b = model.output_rows(ids), model.head.bias[ids]  # (M, D), (M,)
    if shared:
        pos = (h * w[:shared]).sum(-1, keepdim=True) + b[:shared].unsqueeze(1)  # (N, 1)
        neg = h @ w[shared:].T + b[shared:]  # (N, K)
        scores = torch.cat([pos, neg], dim=1)  # (N, 1 + K)
    else:
        scores = ((h * w).sum(-1) + b).unsqueeze(1)  # (N, 1)
    if history is not None and model.history_bias is not None:
        scores = scores + model.history_bias * history.seen(columns)  # (N, C)
    return scores
