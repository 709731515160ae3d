"""`--knn-blend`: the recurrent model's probabilities mixed with item-kNN's, in one exported graph.

    p = (1 - beta - gamma) * p_model + beta * p_knn + gamma * p_recent    (then divided by its sum)

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

p_recent is the window's own recent actions (`recent_views`): decay ** age summed over each action's
occurrences, the last event left out (on logs of repeated views the target is often an action viewed a few
events before, almost never the one just done), divided by the row's sum (a window with nothing else adds
nothing, and the mixture is renormalised). `--knn-blend auto` chooses gamma with beta, on the same grid, but
only where validation targets repeat an earlier action of their window; elsewhere (every Amazon file, where
nobody reviews an item twice) gamma is 0 and the graphs are those of the two-part blend.
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
#: (beta, gamma) pairs with beta + gamma <= 1, where the recent views may help; not (0, 1): the recent views
#: alone score nothing on a window of one event, and the mixture must stay a distribution
MIXTURES = tuple(
    (b, round(0.1 * g, 1))
    for b in BETAS
    for g in range(11)
    if b + 0.1 * g <= 1.0 + 1e-9 and (b, g) != (0.0, 10)
)
RECENT_DECAY = 0.5  # p_recent's weight per step of age (bench/recent_blend.py measured it)


def recent_views(action_ids: torch.Tensor, lengths: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """The window's recent actions as a distribution (B, V) shaped like `template`: each action by the sum of
    RECENT_DECAY ** age over its occurrences, ages counted back from the last real position, the last event
    itself (age 0), padding and UNK left out; a row with nothing to score is all 0."""
    t = action_ids.shape[1]
    last = lengths.clamp(max=t) - 1  # (B,)
    age = last.unsqueeze(1) - torch.arange(t, device=action_ids.device).unsqueeze(0)  # (B, T)
    keep = (age >= 1) & (action_ids > UNK_ID)  # (B, T)
    weight = torch.where(keep, torch.pow(RECENT_DECAY, age.clamp(min=0).to(template.dtype)), 0.0)  # (B, T)
    scores = torch.zeros_like(template).scatter_add(1, action_ids.long(), weight)  # (B, V)
    total = scores.sum(dim=1, keepdim=True)  # (B, 1)
    return scores / torch.where(total > 0, total, torch.ones_like(total))


def mix(
    pm: torch.Tensor, pk: torch.Tensor, beta: float, gamma: float, ids: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """(1 - beta - gamma) * pm + beta * pk + gamma * p_recent, renormalised when gamma > 0 (B, V)."""
    mixed = (1.0 - beta - gamma) * pm + beta * pk
    if not gamma:
        return mixed
    mixed = mixed + gamma * recent_views(ids, lengths, pm)
    return mixed / mixed.sum(dim=1, keepdim=True)


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
    """(1 - beta - gamma) * the model's probabilities + beta * item-kNN's + gamma * the recent views': the
    exported graph of a `--knn-blend` run."""

    def __init__(self, model: nn.Module, prior: KnnPrior, beta: float, gamma: float = 0.0) -> None:
        super().__init__()
        if not (0.0 <= beta <= 1.0 and 0.0 <= gamma < 1.0 and beta + gamma <= 1.0 + 1e-9):
            raise ValueError(f"beta in [0, 1] and gamma in [0, 1) with a sum <= 1, got {beta}, {gamma}")
        self.model, self.prior, self.beta, self.gamma = model, prior, float(beta), float(gamma)
        self.config: ModelConfig = model.config  # type: ignore[assignment]

    def forward(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        probs = self.model(action_ids, lengths)  # (B, V)
        return mix(probs, self.prior(action_ids, lengths), self.beta, self.gamma, action_ids, lengths)

    def final_logits(self, action_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, V), PAD and UNK at -inf: what validation ranks and scores."""
        return torch.log(self(action_ids, lengths))  # (B, V)


class BlendStep(nn.Module):
    """The step graph of a blend: the inner step's probabilities mixed with the kNN prior of the window input."""

    def __init__(self, step: nn.Module, prior: KnnPrior, beta: float, gamma: float = 0.0) -> None:
        super().__init__()
        self.step, self.prior, self.beta, self.gamma = step, prior, float(beta), float(gamma)

    def forward(
        self, action_ids: torch.Tensor, h: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        probs, *states = self.step(action_ids, h, *rest)  # (B, V), state(s)
        history = rest[-1]  # (B, T) the window, right-padded with PAD
        lengths = (history != PAD_ID).sum(dim=1)  # (B,)
        mixed = mix(probs, self.prior(history, lengths), self.beta, self.gamma, history, lengths)  # (B, V)
        return (mixed, *states)


def repeats(split: Split, cases: EvalCases, window: int) -> float:
    """The share of `cases` whose (known) target is an earlier action of its window, the last event left out:
    where the recent views can help (0 on every Amazon file)."""
    if not len(cases):
        return 0.0
    ids, lengths = history_arrays(split, cases.users, cases.positions, window)  # (N, T), (N,)
    before_last = np.arange(ids.shape[1])[None, :] < (np.minimum(lengths, ids.shape[1]) - 1)[:, None]
    hit = ((ids == cases.targets[:, None]) & before_last).any(axis=1) & (cases.targets > UNK_ID)
    return float(hit.mean())


def choose_beta(
    model: nn.Module,
    prior: KnnPrior,
    split: Split,
    cases: EvalCases,
    metric: str,
    candidates: tuple[np.ndarray, np.ndarray] | None = None,
    batch: int = 1024,
    recent: bool = False,
) -> tuple[float, float, list[dict[str, float]]]:
    """The (beta, gamma) with the best validation `metric` (hr@10 or ndcg@10) of the mixture, and every
    pair's figures: beta over BETAS with gamma 0, or with `recent` every pair of MIXTURES. Ranks count ties
    against the model, as training/metrics.py does; with `candidates` (the sampled validation protocol) the
    target is ranked among its candidates only. A tie in the metric keeps the smaller beta + gamma (more of
    the model), then the smaller gamma."""
    pairs = MIXTURES if recent else tuple((b, 0.0) for b in BETAS)
    hits = torch.zeros(len(pairs), dtype=torch.float64)
    gains = torch.zeros(len(pairs), dtype=torch.float64)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(cases), batch):
            sl = slice(start, start + batch)
            ids, lengths = history_arrays(split, cases.users[sl], cases.positions[sl], model.config.window)
            ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
            pm = model(ids_t, lengths_t).double()  # (b, V)
            pk = prior(ids_t, lengths_t).double()  # (b, V)
            pr = recent_views(ids_t, lengths_t, pm) if recent else None  # (b, V)
            targets = torch.from_numpy(cases.targets[sl])  # (b,)
            known = targets > UNK_ID  # (b,)
            if candidates is not None:
                cand = torch.from_numpy(candidates[0][sl])  # (b, 1 + n) the target first
                real = torch.from_numpy(candidates[1][sl])  # (b, 1 + n)
                pm, pk = pm.gather(1, cand), pk.gather(1, cand)  # (b, 1 + n)
                pr = pr.gather(1, cand) if pr is not None else None
                column = torch.zeros_like(targets)  # the target's column among its candidates
            else:
                real, column = None, targets.clamp(min=0)
            for g, (beta, gamma) in enumerate(pairs):
                mixed = (1.0 - beta - gamma) * pm + beta * pk  # (b, C); a positive row factor ranks alike
                if gamma:
                    mixed = mixed + gamma * pr
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
        {"beta": beta, "gamma": gamma, "hr@10": float(h) / n, "ndcg@10": float(g) / n}
        for (beta, gamma), h, g in zip(pairs, hits.tolist(), gains.tolist(), strict=True)
    ]
    best = max(table, key=lambda row: (row[metric], -(row["beta"] + row["gamma"]), -row["gamma"]))
    if not math.isfinite(best[metric]):
        return 0.0, 0.0, table
    return best["beta"], best["gamma"], table
