"""The training loop: Adam, a loss at every real position (training/losses.py), gradient clipping, early stopping,
best weights kept."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.manifest import UNK_ID
from training.batching import grouped_batches
from training.config import ModelConfig, TrainConfig
from training.errors import DataError
from training.losses import Loss
from training.model import NextActionModel
from training.splits import EvalCases, Split
from training.windows import history_batch, training_windows

log = logging.getLogger(__name__)

_VAL_BATCH = 1024
_MAX_AUTO_BATCH = 64
_MIN_STEPS = 20


def auto_batch_size(n_windows: int) -> int:
    """64 windows per batch, fewer when that would leave an epoch with under 20 optimiser steps (small logs)."""
    return max(8, min(_MAX_AUTO_BATCH, n_windows // _MIN_STEPS))


@dataclass(frozen=True)
class EpochLog:
    """One epoch: training loss and speed, validation loss and ranking metrics (full protocol)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_hr10: float
    val_ndcg10: float
    events: int  # training targets seen
    seconds: float  # training only, validation excluded
    lr: float  # learning rate used in this epoch

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainResult:
    """The model with its best epoch's weights, and how training went."""

    model: NextActionModel
    batch_size: int
    epochs: list[EpochLog] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0  # wall time of the whole loop, validation included

    @property
    def events_per_second(self) -> float:
        events = sum(e.events for e in self.epochs)
        seconds = sum(e.seconds for e in self.epochs)
        return events / seconds if seconds > 0 else 0.0


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch generators; the same seed and data give the same model on the same machine."""
    random.seed(seed)
    np.random.seed(seed)  # for third-party code that uses the global generator
    torch.manual_seed(seed)


def validate(model: NextActionModel, split: Split, cases: EvalCases) -> tuple[float, dict[str, float]]:
    """Validation loss (cross-entropy of the known targets) and full-protocol HR@10 and NDCG@10, in eval mode.

    Ranks are counted in torch with the metrics module's rule (ties count against the model, an unknown
    target is a miss): cheap enough to run after every one of 100+ epochs.
    """
    model.eval()
    loss_sum, loss_n = 0.0, 0
    hits, gains = 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(cases), _VAL_BATCH):
            sl = slice(start, start + _VAL_BATCH)
            histories = [
                split.history(u, p) for u, p in zip(cases.users[sl], cases.positions[sl], strict=True)
            ]
            ids, lengths = history_batch(histories, model.config.window)  # (b, T), (b,)
            logits = model.final_logits(torch.from_numpy(ids), torch.from_numpy(lengths))  # (b, V)
            targets = torch.from_numpy(cases.targets[sl])  # (b,)
            known = targets > UNK_ID  # (b,)
            if known.any():
                loss_sum += float(F.cross_entropy(logits[known], targets[known], reduction="sum"))
                loss_n += int(known.sum())
            target_logit = logits.gather(1, targets.unsqueeze(1))  # (b, 1); PAD/UNK columns are -inf
            rank = (logits >= target_logit).sum(dim=1) - 1  # (b,) ties count against the model
            hit = known & (rank < 10)  # (b,)
            hits += float(hit.sum())
            gains += float(torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), 0.0).sum())
    model.train()
    metrics = {"hr@10": hits / len(cases), "ndcg@10": gains / len(cases)} if len(cases) else {}
    return (loss_sum / loss_n if loss_n else math.nan), metrics


def fit(
    split: Split, model_config: ModelConfig, config: TrainConfig, schedule: Sequence[float] | None = None
) -> TrainResult:
    """Train on the split's training events, stop early on the validation metric, return the best model.

    With a `schedule` (one learning rate per epoch, e.g. from an earlier run) it trains exactly that many
    epochs at those rates, without early stopping, and returns the last epoch's weights.
    """
    seed_everything(config.seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    model = NextActionModel(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    chunks = training_windows(split.train_sequences(), model_config.window)
    if not chunks:
        raise DataError("no training sequence has two events: nothing to learn from")
    val_cases = split.cases("validation")
    train_events = np.concatenate(split.train_sequences())
    counts = torch.from_numpy(np.bincount(train_events, minlength=model_config.vocab_size))  # (V,)
    loss_fn = Loss(config, model_config.vocab_size, counts)
    batch_size = config.batch_size or auto_batch_size(len(chunks))
    n_batches = math.ceil(len(chunks) / batch_size)
    log.info(
        "training on %d windows (%d batches of %d per epoch), validating on %d cases",
        len(chunks),
        n_batches,
        batch_size,
        len(val_cases),
    )

    result = TrainResult(model=model, batch_size=batch_size)
    best_score, best_state, stale = -math.inf, copy.deepcopy(model.state_dict()), 0
    started = time.perf_counter()
    n_epochs = len(schedule) if schedule is not None else config.epochs
    desc = "epochs" if schedule is None else "refit epochs"
    epochs = tqdm(range(1, n_epochs + 1), desc=desc, unit="epoch", disable=config.quiet)
    for epoch in epochs:
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule[epoch - 1]
        lr = float(optimizer.param_groups[0]["lr"])
        model.train()
        loss_sum, events, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(
            grouped_batches(chunks, batch_size, rng),
            total=n_batches,
            desc=f"epoch {epoch}",
            unit="batch",
            leave=False,
            disable=config.quiet,
        )
        for inputs, targets in bar:
            loss, kept = loss_fn(model, torch.from_numpy(inputs), torch.from_numpy(targets))
            if kept == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()
            loss_sum += float(loss.detach()) * kept
            events += kept
            bar.set_postfix(
                loss=f"{loss_sum / events:.4f}", ev_s=f"{events / (time.perf_counter() - t0):,.0f}"
            )
        seconds = time.perf_counter() - t0
        val_loss, val = validate(model, split, val_cases)
        entry = EpochLog(
            epoch,
            loss_sum / max(events, 1),
            val_loss,
            val.get("hr@10", math.nan),
            val.get("ndcg@10", math.nan),
            events,
            seconds,
            lr,
        )
        result.epochs.append(entry)
        if len(val_cases):
            epochs.set_postfix(
                loss=f"{entry.train_loss:.4f}",
                val_loss=f"{val_loss:.4f}",
                hr10=f"{entry.val_hr10:.4f}",
                ev_s=f"{entry.events_per_second:,.0f}",
            )
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, val HR@10 %.4f, NDCG@10 %.4f, %.0f events/s",
                epoch,
                entry.train_loss,
                val_loss,
                entry.val_hr10,
                entry.val_ndcg10,
                entry.events_per_second,
            )
        else:  # the refit (validation events are training events now), or a log too small to validate on
            epochs.set_postfix(loss=f"{entry.train_loss:.4f}", ev_s=f"{entry.events_per_second:,.0f}")
            log.info(
                "epoch %d: train loss %.4f, %.0f events/s (no validation cases)",
                epoch,
                entry.train_loss,
                entry.events_per_second,
            )
        if schedule is not None:  # a fixed schedule: the last epoch is the result
            best_state, result.best_epoch = model.state_dict(), epoch
            continue
        score = val.get(config.stop_metric, -entry.train_loss)  # no validation cases: lowest train loss
        if score > best_score:
            best_score, best_state, stale, result.best_epoch = (
                score,
                copy.deepcopy(model.state_dict()),
                0,
                epoch,
            )
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop: no %s improvement for %d epochs", config.stop_metric, stale)
                break
            if stale % config.lr_patience == 0:  # a plateau: smaller steps often find a bit more
                for group in optimizer.param_groups:
                    group["lr"] *= config.lr_decay
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result


def refit(split: Split, model_config: ModelConfig, config: TrainConfig, selected: TrainResult) -> TrainResult:
    """A fresh model trained on training + validation events for the selected run's best epoch count, at the
    learning rates that run used: the model that is tested and served has seen every event before the test
    targets, as the baselines have. `split` must already count validation events as training."""
    schedule = [e.lr for e in selected.epochs[: selected.best_epoch]]
    log.info("refit on training + validation events: %d epochs", len(schedule))
    return fit(split, model_config, config, schedule=schedule)
