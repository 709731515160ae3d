"""Training the members of a run: one model, or `--ensemble K` of them (seeds seed .. seed + K - 1), each with
early stopping and its own refit, as a single run has."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

from training.config import ModelConfig, TrainConfig
from training.ensemble import AnyModel, EnsembleModel
from training.model import NextActionModel
from training.splits import Split
from training.train import TrainResult, fit, refit, validate, validation_candidates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberSummary:
    """One member's run: its seed, epochs, the validation figures of its best epoch, and the refit."""

    seed: int
    epochs_run: int
    best_epoch: int
    val_hr10: float
    val_ndcg10: float
    refit_epochs: int
    seconds: float  # selection and refit


@dataclass
class Fitted:
    """What the pipeline tests and exports: the model (one member, or the ensemble of every member's refit),
    the first member's selection run (its curves go into the report), and per-member figures."""

    model: AnyModel
    first: TrainResult
    selection: AnyModel | None = None  # the model(s) before the refit: what validation may score honestly
    members: list[MemberSummary] = field(default_factory=list)
    ensemble_validation: dict[str, float] = field(default_factory=dict)  # the members' mean, on validation
    refit_epochs: int = 0
    seconds: float = 0.0
    events: int = 0
    train_seconds: float = 0.0  # training only, validation excluded

    @property
    def events_per_second(self) -> float:
        return self.events / self.train_seconds if self.train_seconds > 0 else 0.0


def fit_members(split: Split, final_split: Split, model_config: ModelConfig, config: TrainConfig) -> Fitted:
    """Train `config.ensemble` members (seeds seed, seed + 1, ...), each with early stopping and (with
    `config.refit`) its own refit on training + validation events; one member is returned as it is."""
    selected: list[TrainResult] = []
    finals: list[NextActionModel] = []
    fitted: Fitted | None = None
    for k in range(config.ensemble):
        member_config = dataclasses.replace(config, seed=config.seed + k)
        if config.ensemble > 1:
            log.info("ensemble member %d of %d (seed %d)", k + 1, config.ensemble, member_config.seed)
        result = fit(split, model_config, member_config)
        model, seconds, refit_epochs = result.model, result.seconds, 0
        run_epochs = list(result.epochs)
        if config.refit and len(split.cases("validation")) and result.best_epoch:
            final = refit(final_split, model_config, member_config, result)
            model, seconds, refit_epochs = final.model, seconds + final.seconds, len(final.epochs)
            run_epochs += final.epochs
        best = result.epochs[result.best_epoch - 1] if result.best_epoch else None
        summary = MemberSummary(
            seed=member_config.seed,
            epochs_run=len(result.epochs),
            best_epoch=result.best_epoch,
            val_hr10=best.val_hr10 if best else math.nan,
            val_ndcg10=best.val_ndcg10 if best else math.nan,
            refit_epochs=refit_epochs,
            seconds=seconds,
        )
        if fitted is None:
            fitted = Fitted(model=model, first=result, refit_epochs=refit_epochs)
        fitted.members.append(summary)
        fitted.seconds += seconds
        fitted.events += sum(e.events for e in run_epochs)
        fitted.train_seconds += sum(e.seconds for e in run_epochs)
        selected.append(result)
        finals.append(model)
    assert fitted is not None  # config.ensemble >= 1
    fitted.selection = (
        selected[0].model if config.ensemble == 1 else EnsembleModel([r.model for r in selected])
    )
    if config.ensemble > 1:
        fitted.model = EnsembleModel(finals).eval()
        cases = split.cases("validation")
        if len(cases):  # the selected (pre-refit) members together, on the validation targets they chose by
            chosen = EnsembleModel([r.model for r in selected])
            candidates = validation_candidates(split, cases, model_config.vocab_size, config)
            _, fitted.ensemble_validation = validate(chosen, split, cases, candidates=candidates)
    return fitted
