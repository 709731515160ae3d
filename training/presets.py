"""Named, measured configurations: `train --preset NAME` (training/__main__.py) and the first trials of `--tune`
(training/tune.py), which starts from the default and every preset before it searches."""

from __future__ import annotations

from typing import Any

from training.config import ModelConfig, SearchSpace, TrainConfig

#: Measured configurations (docs/model-quality.md, "Presets"): `--preset NAME` makes these the defaults of
#: `train`, so any option given on the command line still wins. Keys are argparse destinations.
# what both presets share: a small tied model, dropout on the input embeddings more than on the states
_TIED_E64: dict[str, Any] = {
    "embedding_dim": 64,
    "hidden_dim": 64,
    "tied": True,
    "input_dropout": 0.5,
    "dropout": 0.1,
    "lr": 0.01,
}

PRESETS: dict[str, dict[str, Any]] = {
    # popularity-sampled negatives with logQ, the residual path, tied E64, and the item-kNN blend with beta
    # chosen on validation: ahead of every baseline under both protocols on Beauty, Sports and Toys
    "full-ranking": {
        "loss": "sampled",
        "loss_sampler": "popularity",
        "logq": True,
        "loss_negatives": 2000,
        "residual": True,
        **_TIED_E64,
        "epochs": 40,
        "patience": 5,
        "lr_patience": 2,
        "knn_blend": "auto",
    },
    # uniform shared negatives, tied E64: the highest sampled-protocol figures on Beauty, Sports and Toys
    "sampled-protocol": {
        "loss": "sampled",
        "loss_sampler": "uniform",
        "loss_negatives": 1000,
        **_TIED_E64,
        "epochs": 25,
        "patience": 10,
        "lr_patience": 3,
    },
}


def _as_trial(values: dict[str, Any]) -> dict[str, Any] | None:
    """A configuration (argparse destinations over the defaults) as `--tune` parameters; None when its
    embedding and hidden sizes differ (the search ties them)."""
    model, train = ModelConfig(vocab_size=3), TrainConfig()
    get = values.get
    dim = get("embedding_dim", model.embedding_dim)
    if dim != get("hidden_dim", model.hidden_dim):
        return None
    dropout = get("dropout", model.dropout)
    input_dropout = get("input_dropout", model.input_dropout)
    return {
        "loss": get("loss", train.loss),
        "dim": dim,
        "input_dropout": dropout if input_dropout is None else input_dropout,
        "dropout": dropout,
        "lr": get("lr", train.lr),
        "batch_size": get("batch_size", train.batch_size) or 64,  # None: 64 on any log worth tuning
        "tied": get("tied", model.tied),
        "sampler": get("loss_sampler", train.loss_sampler),
        "residual": get("residual", model.residual),
        "negatives": get("loss_negatives", train.loss_negatives),
    }


def in_space(params: dict[str, Any], space: SearchSpace) -> bool:
    """Whether every parameter lies in the search space (a narrowed `--tune-space` may exclude a start)."""
    ranges = {
        "dim": space.dims,
        "input_dropout": space.input_dropout,
        "dropout": space.dropout,
        "lr": space.lr,
    }
    choices = {
        "loss": space.losses,
        "batch_size": space.batch_sizes,
        "tied": space.tied,
        "sampler": space.samplers,
        "residual": space.residual,
        "negatives": space.negatives,
    }
    return all(lo <= params[k] <= hi for k, (lo, hi) in ranges.items()) and all(
        params[k] in options for k, options in choices.items()
    )


def tune_starts(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """(name, parameters) of the configurations `--tune` tries first: the default, then every preset, each
    only where it lies in `space` (the searched parameters only: epochs, patience and the blend are the run's)."""
    named = [("default", _as_trial({}))] + [(name, _as_trial(v)) for name, v in PRESETS.items()]
    return [(name, p) for name, p in named if p is not None and in_space(p, space)]
