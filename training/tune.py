"""`--tune`: an Optuna search (seeded TPE sampler, median pruner on the per-epoch validation metric) over the
loss, the dimension, the dropouts, the learning rate, the batch size, tying, the negative sampler, the residual
path and the number of negatives, within a wall-clock budget. Its first trials are the searched parameters of
the default configuration and of every preset (training/presets.py) that lie in the search space, so the
search starts from what was measured best on the dev data sets (their epochs, patience and blend are the
command line's, as for every trial).

Trials are scored on the validation split only (never the test split), under the run's validation protocol
(`--protocol full|sampled`), by the best epoch's `--tune-metric`. The pipeline then trains the best
configuration as usual (early stopping, refit, export); every trial is recorded in the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from tqdm import tqdm

from training import distributed
from training.config import ModelConfig, SearchSpace, TrainConfig, TuneOptions
from training.errors import TrainingError
from training.presets import tune_starts
from training.splits import Split
from training.train import EpochLog, fit

log = logging.getLogger(__name__)

COMPLETE, PRUNED, BUDGET = "complete", "pruned", "budget"  # budget: stopped when the search's time ran out


@dataclass(frozen=True)
class TrialRecord:
    """One trial: its parameters, its best validation metric, how many epochs and seconds it took, and how it
    ended (complete, pruned by the median rule, or stopped by the time budget with its best epoch so far)."""

    number: int
    params: dict[str, Any]
    value: float
    epochs: int
    best_epoch: int
    seconds: float
    state: str
    origin: str = "search"  # "search": drawn by the sampler; else the default or preset it started from


@dataclass
class TuneResult:
    """Every trial in order, and why the search stopped ("trials": all were run; "budget": time ran out)."""

    metric: str
    protocol: str
    budget: float
    max_trials: int
    trials: list[TrialRecord] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "trials"

    @property
    def best(self) -> TrialRecord | None:
        """The highest-scoring trial that was not pruned (a budget-stopped one counts with its best epoch)."""
        scored = [t for t in self.trials if t.state != PRUNED and math.isfinite(t.value)]
        return max(scored, key=lambda t: t.value, default=None)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "metric": self.metric,
            "protocol": self.protocol,
            "budget_seconds": self.budget,
            "max_trials": self.max_trials,
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "best_trial": best.number if best else None,
            "best_params": best.params if best else None,
            "trials": [dataclasses.asdict(t) for t in self.trials],
        }


def parse_space(text: str | None) -> SearchSpace:
    """`--tune-space` JSON (some of SearchSpace's fields, lists for tuples) -> SearchSpace; errors name the key."""
    if not text:
        return SearchSpace()
    try:
        given = json.loads(text)
    except json.JSONDecodeError as e:
        raise TrainingError(f"--tune-space: not JSON: {e}") from e
    known = {f.name for f in dataclasses.fields(SearchSpace)}
    if not isinstance(given, dict) or not set(given) <= known:
        extra = sorted(set(given) - known) if isinstance(given, dict) else given
        raise TrainingError(f"--tune-space: unknown keys {extra}; known: {sorted(known)}")
    for key in ("losses", "batch_sizes", "tied", "samplers", "residual", "negatives"):
        if key in given and not isinstance(given[key], list):
            raise TrainingError(f"--tune-space: {key} must be a list of choices, got {given[key]!r}")
    space = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    for name in ("dims", "input_dropout", "dropout", "lr"):
        low, high = getattr(space, name)
        if not 0 <= low <= high or (name in ("dims", "lr") and low <= 0):
            raise TrainingError(
                f"--tune-space: {name} must be [low, high] with 0 < low <= high, got {low, high}"
            )
    if not space.losses or not set(space.losses) <= {"ce", "sampled", "bce"}:
        raise TrainingError(f"--tune-space: losses must be among ce, sampled, bce, got {list(space.losses)}")
    if not space.batch_sizes or min(space.batch_sizes) < 1 or not space.tied:
        raise TrainingError("--tune-space: batch_sizes must be >= 1 and tied non-empty")
    if not space.samplers or not set(space.samplers) <= {"uniform", "popularity"}:
        raise TrainingError(
            f"--tune-space: samplers must be among uniform, popularity, got {list(space.samplers)}"
        )
    if not space.residual or not space.negatives or min(space.negatives) < 1:
        raise TrainingError("--tune-space: negatives must be >= 1 and residual non-empty")
    return space


def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """One configuration drawn from `space` (parameter names as in the report)."""
    return {
        "loss": trial.suggest_categorical("loss", list(space.losses)),
        "dim": trial.suggest_int("dim", *space.dims, log=True),
        "input_dropout": trial.suggest_float("input_dropout", *space.input_dropout),
        "dropout": trial.suggest_float("dropout", *space.dropout),
        "lr": trial.suggest_float("lr", *space.lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_sizes)),
        "tied": trial.suggest_categorical("tied", list(space.tied)),
        "sampler": trial.suggest_categorical("sampler", list(space.samplers)),
        "residual": trial.suggest_categorical("residual", list(space.residual)),
        "negatives": trial.suggest_categorical("negatives", list(space.negatives)),
    }


def apply(
    params: dict[str, Any], model_args: dict[str, Any], config: TrainConfig
) -> tuple[dict[str, Any], TrainConfig]:
    """The run's model arguments and training configuration with a trial's parameters in place."""
    model_args = model_args | {
        "embedding_dim": params["dim"],
        "hidden_dim": params["dim"],
        "input_dropout": params["input_dropout"],
        "dropout": params["dropout"],
        "tied": params["tied"],
        "residual": params["residual"],
    }
    config = dataclasses.replace(
        config,
        loss=params["loss"],
        lr=params["lr"],
        batch_size=params["batch_size"],
        loss_sampler=params["sampler"],
        loss_negatives=params["negatives"],
    )
    return model_args, config


def _metric(entry: EpochLog, metric: str) -> float:
    return entry.val_ndcg10 if metric == "ndcg@10" else entry.val_hr10


def tune_search(
    split: Split, vocab_size: int, model_args: dict[str, Any], config: TrainConfig, options: TuneOptions
) -> TuneResult:
    """Run the search on the split's training events, scored on its validation events; returns every trial."""
    if distributed.current().distributed:
        raise TrainingError("--tune runs in one process: start it without torchrun")
    if not len(split.cases("validation")):
        raise TrainingError(
            "--tune needs validation cases (users with at least 3 events), and the log has none"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    )
    starts = tune_starts(options.space)
    for _, params in starts:
        study.enqueue_trial(params)  # asked first, in this order
    result = TuneResult(options.metric, config.val_protocol, options.budget, options.trials)
    trial_config = dataclasses.replace(config, quiet=True, stop_metric=options.metric, ensemble=1)
    started = time.monotonic()
    deadline = started + options.budget
    bar = tqdm(total=options.trials, desc="tune", unit="trial", disable=config.quiet)
    for number in range(options.trials):
        if number and time.monotonic() >= deadline:  # the first trial always runs (at least one epoch)
            result.stopped = BUDGET
            break
        trial = study.ask()
        params = suggest(trial, options.space)
        args, cfg = apply(params, model_args, trial_config)
        state = COMPLETE

        def hook(entry: EpochLog, trial: optuna.Trial = trial) -> bool:
            nonlocal state
            trial.report(_metric(entry, options.metric), entry.epoch)
            if trial.should_prune():
                state = PRUNED
            elif time.monotonic() >= deadline:
                state = BUDGET
            return state != COMPLETE

        t0 = time.monotonic()
        run = fit(split, ModelConfig(vocab_size=vocab_size, **args), cfg, on_epoch=hook)
        value = max((_metric(e, options.metric) for e in run.epochs), default=math.nan)
        if state == PRUNED:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value if math.isfinite(value) else 0.0)
        origin = starts[number][0] if number < len(starts) else "search"
        record = TrialRecord(
            number, params, value, len(run.epochs), run.best_epoch, time.monotonic() - t0, state, origin
        )
        result.trials.append(record)
        best = result.best
        bar.update(1)
        bar.set_postfix(best=f"{best.value:.4f}" if best else "-")
        log.info(
            "trial %d (%s): %s %.4f after %d epochs (%.0f s, %s); best %s; %s",
            number,
            origin,
            options.metric,
            value,
            len(run.epochs),
            record.seconds,
            state,
            f"{best.value:.4f} (trial {best.number})" if best else "-",
            ", ".join(f"{k}={_short(v)}" for k, v in params.items()),
        )
        if state == BUDGET:
            result.stopped = BUDGET
            break
    bar.close()
    result.seconds = time.monotonic() - started
    if result.best is None:
        raise TrainingError("--tune: no trial was scored (no validation metric); check the validation split")
    return result


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
