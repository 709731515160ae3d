"""Model-quality options: the losses, length-grouped batches, the feed-forward block, and their exports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.manifest import STEP_FILE, read_manifest
from tests.conftest import EXAMPLES, train_artifact
from tests.test_training_train import _cyclic_split
from training.batching import grouped_batches, length_grouped
from training.config import Loss as LossName
from training.config import ModelConfig, TrainConfig
from training.losses import Loss
from training.model import NextActionModel
from training.train import fit


def test_length_grouped_batches_cover_every_window_once_with_little_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 10, size=1000)
    batches = length_grouped(lengths, 32, rng)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    spread = [int(lengths[b].max() - lengths[b].min()) for b in batches]
    assert max(spread) <= 1  # over 100 windows per length: a batch spans at most two adjacent lengths
    again = length_grouped(lengths, 32, rng)
    assert [b.tolist() for b in again] != [b.tolist() for b in batches]  # another epoch, another order
    chunks = [np.arange(2, 2 + n) for n in (3, 5, 3, 5)]
    shapes = sorted(i.shape for i, _ in grouped_batches(chunks, 2, rng))
    assert shapes == [(2, 2), (2, 4)]  # inputs: each window but its last event, no padding needed


class FixedNegatives(Loss):
    """The sampled loss with chosen negatives, to compare with a hand computation."""

    def __init__(self, config: TrainConfig, vocab_size: int, negatives: list[int]) -> None:
        super().__init__(config, vocab_size)
        self.fixed = torch.tensor(negatives)

    def sample(self, n: int) -> torch.Tensor:
        return self.fixed[:n]


def _tiny(**kw: object) -> NextActionModel:
    torch.manual_seed(0)
    model = NextActionModel(
        ModelConfig(vocab_size=9, embedding_dim=4, hidden_dim=6, dropout=0.0, window=5, **kw)
    )
    return model.eval()  # no dropout: the same states in the loss and in the hand computation


@torch.no_grad()
def test_sampled_and_bce_losses_against_the_full_logits() -> None:
    model = _tiny(history_bias=True, tied=True)
    model.history_bias.fill_(-0.7)  # type: ignore[union-attr]
    inputs = torch.tensor([[2, 3, 4], [5, 6, 0]])
    targets = torch.tensor([[3, 4, 5], [6, 3, 0]])  # the last position of row 1 is padding
    full, kept = model.position_logits(inputs, targets)  # (5, V) with the history bias
    assert kept.tolist() == [3, 4, 5, 6, 3]

    sampled = FixedNegatives(TrainConfig(loss="sampled", loss_negatives=3), 9, [4, 7, 8])
    loss, n = sampled(model, inputs, targets)
    cols = torch.tensor([4, 7, 8])
    logits = torch.cat([full.gather(1, kept.unsqueeze(1)), full[:, cols]], dim=1)  # (5, 4)
    logits[1, 1] = -math.inf  # negative 4 is the second position's target: masked
    assert n == 5 and float(loss) == pytest.approx(
        float(F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)))
    )

    bce = FixedNegatives(TrainConfig(loss="bce"), 9, [8, 7, 2, 2, 5])
    loss, n = bce(model, inputs, targets)
    pos = full.gather(1, kept.unsqueeze(1)).squeeze(1)  # (5,)
    neg = full[torch.arange(5), torch.tensor([8, 7, 2, 2, 5])]  # (5,)
    assert n == 5 and float(loss) == pytest.approx(float((F.softplus(-pos) + F.softplus(neg)).mean()))

    ce, n = Loss(TrainConfig(loss="ce"), 9)(model, inputs, targets)
    assert float(ce) == pytest.approx(float(F.cross_entropy(full, kept)))


def test_popularity_sampler_with_logq_never_draws_pad_or_unk() -> None:
    counts = torch.tensor([50, 50, 1, 0, 8, 1, 1, 1, 30])
    loss = Loss(TrainConfig(loss="sampled", loss_sampler="popularity"), 9, counts)
    drawn = loss.sample(2000)
    assert drawn.min() >= 2 and not (drawn == 3).any()  # PAD/UNK and a never-seen action are not drawn
    assert (drawn == 8).sum() > (drawn == 4).sum() > (drawn == 2).sum()


@pytest.mark.parametrize("loss", ["sampled", "bce"])
def test_every_loss_learns_the_cycle(loss: LossName) -> None:
    split = _cyclic_split()
    model_config = ModelConfig(
        vocab_size=10, embedding_dim=8, hidden_dim=16, dropout=0.0, window=10, tied=True
    )
    config = TrainConfig(epochs=8, lr=0.03, patience=8, quiet=True, seed=3, loss=loss, loss_negatives=4)
    result = fit(split, model_config, config)
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss
    assert max(e.val_ndcg10 for e in result.epochs) > 0.9


def test_input_dropout_is_separate_and_feed_forward_block_changes_the_states() -> None:
    model = _tiny(input_dropout=0.5, feed_forward=True)
    assert model.input_dropout.p == 0.5 and model.dropout.p == 0.0 and model.block is not None
    states = model.states(torch.tensor([[2, 3, 4]]))  # (1, 3, H)
    assert torch.allclose(states.mean(-1), torch.zeros(1, 3), atol=1e-5)  # LayerNorm last: zero mean


@pytest.mark.parametrize(
    ("cell", "options"),
    [
        (
            "lstm",
            [
                "--feed-forward",
                "--tied",
                "--loss",
                "sampled",
                "--loss-negatives",
                "50",
                "--input-dropout",
                "0.3",
            ],
        ),
        ("gru", ["--feed-forward", "--residual", "--loss", "bce", "--loss-sampler", "popularity"]),
    ],
)
def test_new_options_pass_both_parity_gates(cell: str, options: list[str], tmp_path: Path) -> None:
    out = train_artifact(
        tmp_path / "a", EXAMPLES / "taobao_sample.csv", "--action-col", "behavior", "--window", "8",
        "--epochs", "1", "--embedding-dim", "8", "--hidden-dim", "12", "--model", cell, *options,
    )  # fmt: skip
    manifest = read_manifest(out)
    assert manifest.step is not None and (out / STEP_FILE).is_file()  # step.onnx passed its gate
    assert manifest.step.parity_max_abs_diff <= 1e-5
    assert set(manifest.metrics) == {"full", "full-exclude-history", "sampled"}


def test_validate_agrees_with_the_metrics_module() -> None:
    from training.predict import model_scorer
    from training.protocols import evaluate_cases
    from training.train import validate

    split = _cyclic_split()
    torch.manual_seed(0)
    model = NextActionModel(ModelConfig(vocab_size=40, embedding_dim=4, hidden_dim=6, window=10)).eval()
    cases = split.cases("validation")
    _, fast = validate(model, split, cases)
    slow = evaluate_cases(split, cases, {"m": model_scorer(model, 10)}, 40, ("full",)).metrics["full"]["m"]
    assert 0 < slow["hr@10"] < 1  # an untrained model over 38 actions: some hits, some misses
    assert fast["hr@10"] == pytest.approx(slow["hr@10"]) and fast["ndcg@10"] == pytest.approx(slow["ndcg@10"])
