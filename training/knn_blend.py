"""`--knn-blend`: the recurrent model's probabilities mixed with item-kNN's, in one exported graph.

    p = (1 - beta) * p_model + beta * p_knn

p_knn is the item-kNN baseline (training/baselines.ItemKNN) as a distribution: each action's score from the
window's last `recent` events (decay ** age times the co-occurrence similarity, popularity scaled below every
similarity for the ties), divided by the row's sum. The similarity table goes into the graph as each action's
`neighbours` most similar actions (a (V, K) table of ids and one of similarities), so model.onnx and step.onnx
keep their inputs and outputs: the window the service already sends is all the kNN part reads.

Sequence models and co-occurrence counts are wrong in different places (a recurrent model needs several
events per action to learn its embedding; a co-occurrence needs one shared user), so the mixture beats both
where item-kNN is strong. beta is chosen on the validation split with the model selected before the refit and
a kNN fitted on the training events only; the served mixture uses the refitted model and a kNN fitted on
training + validation events, as the baselines it is compared with are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from app.manifest import PAD_ID, UNK_ID
from training.baselines import ItemKNN
from training.config import ModelConfig
from training.dataset import history_arrays
from training.splits import EvalCases, Split

NEIGHBOURS = 100  # per action in the graph's table: the most similar ones
BETAS = tuple(round(0.1 * i, 1) for i in range(11))  # the grid beta is chosen from: 0, 0.1, ..., 1


class KnnPrior(nn.Module):
    """Item-kNN as a module: right-padded ids (B, T) and lengths (B,) -> a distribution over actions (B, V)."""

    neighbours: torch.Tensor  # (V, K) int32 (a third less graph than int64), PAD past an action's neighbours
    similarity: torch.Tensor  # (V, K) float32, 0 where PAD
    backoff: torch.Tensor  # (V,) float32, popularity below any similarity; 0 for PAD and UNK
    weights: torch.Tensor  # (R,) float32, decay ** age of the last R events

    def __init__(
        self, vocab_size: int, neighbours: int = NEIGHBOURS, recent: int = 10, decay: float = 0.5
    ) -> None:
        super().__init__()
        self.register_buffer("neighbours", torch.zeros(vocab_size, neighbours, dtype=torch.int32))
        self.register_buffer("similarity", torch.zeros(vocab_size, neighbours))
        self.register_buffer("backoff", torch.zeros(vocab_size))
        self.register_buffer("weights", torch.tensor([decay**r for r in range(recent)], dtype=torch.float32))

    @classmethod
    def fit(cls, train_sequences: Sequence[np.ndarray], vocab_size: int, window: int) -> KnnPrior:
        """The baseline's similarities (fitted on `train_sequences`), each action's top NEIGHBOURS kept."""
        knn = ItemKNN(train_sequences, vocab_size, window)
        prior = cls(vocab_size)
        k = prior.neighbours.shape[1]
        ids = np.zeros((vocab_size, k), dtype=np.int32)  # (V, K) PAD
        sims = np.zeros((vocab_size, k), dtype=np.float32)  # (V, K)
        for item in range(vocab_size):
            lo, hi = knn.row_start[item], knn.row_start[item + 1]
            if hi == lo:
                continue
            order = np.argsort(-knn.similarity[lo:hi], kind="stable")[:k]  # the most similar first
            ids[item, : len(order)] = knn.neighbours[lo:hi][order]
            sims[item, : len(order)] = knn.similarity[lo:hi][order]
        prior.neighbours.copy_(torch.from_numpy(ids))
        prior.similarity.copy_(torch.from_numpy(sims))
        prior.backoff.copy_(torch.from_numpy(knn.backoff.astype(np.float32)))
        return prior

    def forward(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t = action_ids.shape
        recent = self.weights.shape[0]
        last = lengths.clamp(max=t) - 1  # (B,) the last real position; lengths beyond T read the last one
        age = torch.arange(recent, device=action_ids.device)  # (R,)
        pos = last.unsqueeze(1) - age.unsqueeze(0)  # (B, R)
        real = pos >= 0  # (B, R)
        events = torch.where(real, action_ids.gather(1, pos.clamp(min=0)), PAD_ID)  # (B, R)
        weight = self.weights.unsqueeze(0) * real.to(self.weights.dtype)  # (B, R)
        ids = self.neighbours[events].reshape(b, -1).long()  # (B, R * K)
        sims = (self.similarity[events] * weight.unsqueeze(2)).reshape(b, -1)  # (B, R * K)
        scores = self.backoff.unsqueeze(0).expand(b, -1).scatter_add(1, ids, sims)  # (B, V)
        return scores / scores.sum(dim=1, keepdim=True)  # (B, V); PAD and UNK stay exactly 0


class KnnBlend(nn.Module):
    """(1 - beta) * the model's probabilities + beta * item-kNN's: the exported graph of a `--knn-blend` run."""

    def __init__(self, model: nn.Module, prior: KnnPrior, beta: float) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be within [0, 1], got {beta}")
        self.model, self.prior, self.beta = model, prior, float(beta)
        self.config: ModelConfig = model.config  # type: ignore[assignment]

    def forward(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        probs = self.model(action_ids, lengths)  # (B, V)
        return (1.0 - self.beta) * probs + self.beta * self.prior(action_ids, lengths)  # (B, V)

    def final_logits(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, V), PAD and UNK at -inf: what validation ranks and scores."""
        return torch.log(self(action_ids, lengths))  # (B, V)


class BlendStep(nn.Module):
    """The step graph of a blend: the inner step's probabilities mixed with the kNN prior of the window input."""

    def __init__(self, step: nn.Module, prior: KnnPrior, beta: float) -> None:
        super().__init__()
        self.step, self.prior, self.beta = step, prior, float(beta)

    def forward(
        self, action_ids: torch.Tensor, h: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        probs, *states = self.step(action_ids, h, *rest)  # (B, V), state(s)
        history = rest[-1]  # (B, T) the window, right-padded with PAD
        lengths = (history != PAD_ID).sum(dim=1)  # (B,)
        mixed = (1.0 - self.beta) * probs + self.beta * self.prior(history, lengths)  # (B, V)
        return (mixed, *states)


def choose_beta(
    model: nn.Module,
    prior: KnnPrior,
    split: Split,
    cases: EvalCases,
    metric: str,
    candidates: tuple[np.ndarray, np.ndarray] | None = None,
    batch: int = 1024,
) -> tuple[float, list[dict[str, float]]]:
    """The beta of BETAS with the best validation `metric` (hr@10 or ndcg@10) of the mixture, and every
    beta's figures. Ranks count ties against the model, as training/metrics.py does; with `candidates` (the
    sampled validation protocol) the target is ranked among its candidates only. A tie in the metric keeps
    the smaller beta (more of the model)."""
    betas = torch.tensor(BETAS, dtype=torch.float64)  # (G,)
    hits = torch.zeros(len(BETAS), dtype=torch.float64)
    gains = torch.zeros(len(BETAS), dtype=torch.float64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(cases), batch):
            sl = slice(start, start + batch)
            ids, lengths = history_arrays(split, cases.users[sl], cases.positions[sl], model.config.window)
            ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
            pm = model(ids_t, lengths_t).double()  # (b, V)
            pk = prior(ids_t, lengths_t).double()  # (b, V)
            targets = torch.from_numpy(cases.targets[sl])  # (b,)
            known = targets > UNK_ID  # (b,)
            if candidates is not None:
                cand = torch.from_numpy(candidates[0][sl])  # (b, 1 + n) the target first
                real = torch.from_numpy(candidates[1][sl])  # (b, 1 + n)
                pm, pk = pm.gather(1, cand), pk.gather(1, cand)  # (b, 1 + n)
                column = torch.zeros_like(targets)  # the target's column among its candidates
            else:
                real, column = None, targets.clamp(min=0)
            for g, beta in enumerate(betas.tolist()):
                mixed = (1.0 - beta) * pm + beta * pk  # (b, C)
                target = mixed.gather(1, column.unsqueeze(1))  # (b, 1)
                above = mixed >= target  # (b, C)
                if real is not None:
                    above &= real
                rank = above.sum(dim=1) - 1  # (b,) ties count against the model
                hit = known & (rank < 10)
                hits[g] += hit.sum()
                gains[g] += torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), 0.0).sum()
    n = max(len(cases), 1)
    table = [
        {"beta": beta, "hr@10": float(h) / n, "ndcg@10": float(g) / n}
        for beta, h, g in zip(BETAS, hits.tolist(), gains.tolist(), strict=True)
    ]
    best = max(table, key=lambda row: (row[metric], -row["beta"]))
    if not math.isfinite(best[metric]):
        return 0.0, table
    return best["beta"], table
