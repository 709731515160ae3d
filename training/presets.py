"""Named, measured configurations: `train --preset NAME` (training/__main__.py) and the first trials of `--tune`
(training/tune.py), which starts from the default and every preset before it searches."""

from __future__ import annotations

from dataclasses import dataclass
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


#: `--preset auto` (the default of `train`): a log with at least AUTO_MIN_ACTIONS actions gets `full-ranking`
#: when it has fewer than AUTO_DENSE_EVENTS training events per action (a sparse catalogue: the Amazon sets,
#: 14 to 16 per action, and the Taobao items, 1.3), and the plain defaults with the kNN blend when it has more
#: (MovieLens, 60 per action, where the E256 full softmax beats the E64 preset). Smaller catalogues (behaviour
#: types, categories: Taobao's 4 behaviours) keep the plain defaults. Measured: docs/model-quality.md, "The
#: default configuration".
AUTO_MIN_ACTIONS = 1_000
AUTO_DENSE_EVENTS = 30.0
AUTO_DENSE: dict[str, Any] = {"knn_blend": "auto"}


@dataclass(frozen=True)
class AutoChoice:
    """What `--preset auto` chose for a log, and why."""

    name: str  # "full-ranking", "defaults+blend" or "defaults"
    values: dict[str, Any]  # argparse destinations -> values, applied where the command line gave none
    actions: int
    events_per_action: float

    @property
    def reason(self) -> str:
        return (
            f"{self.actions:,} actions, {self.events_per_action:,.1f} training events per action; the rule: "
            f"full-ranking below {AUTO_DENSE_EVENTS:g} per action, from {AUTO_MIN_ACTIONS:,} actions"
        )


def auto_preset(actions: int, train_events: int) -> AutoChoice:
    """The configuration `--preset auto` gives a log of `actions` distinct actions and `train_events` training
    events (see AUTO_MIN_ACTIONS)."""
    density = train_events / max(actions, 1)
    if actions < AUTO_MIN_ACTIONS:
        return AutoChoice("defaults", {}, actions, density)
    if density < AUTO_DENSE_EVENTS:
        return AutoChoice("full-ranking", PRESETS["full-ranking"], actions, density)
    return AutoChoice("defaults+blend", AUTO_DENSE, actions, density)
