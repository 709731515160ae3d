"""The training loop: Adam, a loss at every real position (training/losses.py), gradient clipping, early stopping,
best weights kept."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.manifest import UNK_ID
from training import distributed
from training.batching import length_grouped
from training.config import EVAL_SEED, ModelConfig, TrainConfig
from training.dataset import WindowIndex, epoch_batches, history_arrays
from training.device import amp_dtype, autocast, grad_scaler, prepare_device, resolve_device
from training.errors import DataError
from training.losses import Loss
from training.model import NextActionModel
from training.protocols import sample_negatives
from training.splits import EvalCases, Split

log = logging.getLogger(__name__)

_VAL_BATCH = 1024
_MAX_AUTO_BATCH = 64
_MIN_STEPS = 20
VAL_NEGATIVES = 100  # the sampled validation protocol: negatives per case, drawn once per run (EVAL_SEED)


def auto_batch_size(n_windows: int) -> int:
    """64 windows per batch, fewer when that would leave an epoch with under 20 optimiser steps (small logs)."""
    return max(8, min(_MAX_AUTO_BATCH, n_windows // _MIN_STEPS))


@dataclass(frozen=True)
class EpochLog:
    """One epoch: training loss and speed, validation loss and ranking metrics (under `protocol`)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_hr10: float
    val_ndcg10: float
    events: int  # training targets seen
    seconds: float  # training only, validation excluded
    lr: float  # learning rate used in this epoch
    protocol: str = "full"  # the validation ranking of val_hr10/val_ndcg10: full or sampled

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


def train_counts(split: Split, vocab_size: int) -> np.ndarray:
    """(V,) int64, how often each action id is a training event, from the flat ids (no array per user)."""
    per_user = np.diff(split.offsets)  # (U,)
    position = np.arange(len(split.ids)) - np.repeat(split.offsets[:-1], per_user)  # (E,) index in its user
    in_train = position < np.repeat(split.boundaries.train_end, per_user)  # (E,)
    return np.bincount(split.ids[in_train], minlength=vocab_size)


def validate(
    model: NextActionModel,
    split: Split,
    cases: EvalCases,
    device: torch.device | None = None,
    amp: torch.dtype | None = None,
    candidates: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[float, dict[str, float]]:
    """Validation loss (cross-entropy of the known targets) and HR@10 and NDCG@10, in eval mode, summed over
    every process's share of the cases: under the full protocol, or with `candidates` (the target and its
    sampled negatives (N, 1 + n), and which columns are real (N, 1 + n), from protocols.sample_negatives)
    under the sampled protocol.

    Ranks are counted in torch with the metrics module's rule (ties count against the model, an unknown
    target is a miss): cheap enough to run after every one of 100+ epochs.
    """
    device = device or torch.device("cpu")
    model.eval()
    loss_sum, loss_n = 0.0, 0
    hits, gains = 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(cases), _VAL_BATCH):
            sl = slice(start, start + _VAL_BATCH)
            ids, lengths = history_arrays(split, cases.users[sl], cases.positions[sl], model.config.window)
            with autocast(device, amp):
                logits = model.final_logits(
                    torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device)
                ).float()  # (b, V)
            targets = torch.from_numpy(cases.targets[sl]).to(device)  # (b,)
            known = targets > UNK_ID  # (b,)
            if known.any():
                loss_sum += float(F.cross_entropy(logits[known], targets[known], reduction="sum"))
                loss_n += int(known.sum())
            target_logit = logits.gather(1, targets.unsqueeze(1))  # (b, 1); PAD/UNK columns are -inf
            if candidates is None:
                rank = (logits >= target_logit).sum(dim=1) - 1  # (b,) ties count against the model
            else:
                cand = torch.from_numpy(candidates[0][sl]).to(device)  # (b, 1 + n), the target first
                real = torch.from_numpy(candidates[1][sl]).to(device)  # (b, 1 + n)
                above = (logits.gather(1, cand) >= target_logit) & real  # (b, 1 + n)
                rank = above.sum(dim=1) - 1  # (b,) the target counts itself once; ties against the model
            hit = known & (rank < 10)  # (b,)
            hits += float(hit.sum())
            gains += float(torch.where(hit, 1.0 / torch.log2(rank.double() + 2.0), 0.0).sum())
    model.train()
    loss_sum, loss_n, hits, gains, n = distributed.all_sum(
        [loss_sum, float(loss_n), hits, gains, float(len(cases))], device
    )  # every process's share summed: the same figures on every process
    metrics = {"hr@10": hits / n, "ndcg@10": gains / n} if n else {}
    return (loss_sum / loss_n if loss_n else math.nan), metrics


def validation_candidates(
    split: Split, cases: EvalCases, vocab_size: int, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray] | None:
    """The sampled validation protocol's candidates (drawn once, fixed seed), or None for the full protocol."""
    if config.val_protocol != "sampled" or not len(cases):
        return None
    return sample_negatives(split, cases, vocab_size, VAL_NEGATIVES, EVAL_SEED)


EpochHook = Callable[[EpochLog], bool]  # called after each validated epoch; True stops the run there


def fit(
    split: Split,
    model_config: ModelConfig,
    config: TrainConfig,
    schedule: Sequence[float] | None = None,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train on the split's training events, stop early on the validation metric, return the best model.

    With a `schedule` (one learning rate per epoch, e.g. from an earlier run) it trains exactly that many
    epochs at those rates, without early stopping, and returns the last epoch's weights. The model is
    returned on the CPU, whatever device it was trained on. `on_epoch` (the tuner's pruner and time budget)
    sees every epoch's log and may end the run early; the best epoch so far is kept.
    """
    world = distributed.current()
    device = resolve_device(config.device, world.local_rank)
    prepare_device(device)
    amp = amp_dtype(device, config.amp)
    seed_everything(config.seed)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    model = NextActionModel(model_config).to(device)
    counts = torch.from_numpy(train_counts(split, model_config.vocab_size))  # (V,) the popularity sampler's
    step = distributed.training_step(model, device, Loss(config, model_config.vocab_size, counts))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, amp)
    windows = WindowIndex.from_split(split, model_config.window, world.users(len(split.sequences)))
    n_windows = int(distributed.all_sum([float(len(windows))], device)[0])
    if not n_windows:
        raise DataError("no training sequence has two events: nothing to learn from")
    val_cases = split.cases("validation")
    shard = world.users(len(split.sequences))
    if shard is not None:
        val_cases = val_cases.subset(shard[val_cases.users])
    candidates = validation_candidates(split, val_cases, model_config.vocab_size, config)
    batch_size = config.batch_size or auto_batch_size(n_windows)
    n_batches = distributed.all_min(math.ceil(len(windows) / batch_size), device)  # the same on every rank
    log.info(
        "training on %d windows (%d batches of %d per epoch%s), validating on %d cases, on %s%s",
        n_windows,
        n_batches,
        batch_size,
        f" on each of {world.size} processes" if world.distributed else "",
        int(distributed.all_sum([float(len(val_cases))], device)[0]),
        device,
        f" with {amp} autocast" if amp is not None else "",
    )
    pin = device.type == "cuda"

    result = TrainResult(model=model, batch_size=batch_size)
    best_score, best_state, stale = -math.inf, copy.deepcopy(model.state_dict()), 0
    started = time.perf_counter()
    n_epochs = len(schedule) if schedule is not None else config.epochs
    desc = "epochs" if schedule is None else "refit epochs"
    quiet = config.quiet or not world.main
    epochs = tqdm(range(1, n_epochs + 1), desc=desc, unit="epoch", disable=quiet)
    for epoch in epochs:
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule[epoch - 1]
        lr = float(optimizer.param_groups[0]["lr"])
        model.train()
        loss_sum, seen, t0 = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
        order = length_grouped(windows.lengths, batch_size, rng)[:n_batches]  # windows of one length together
        bar = tqdm(
            epoch_batches(windows, order, config.loader_workers, pin),
            total=n_batches,
            desc=f"epoch {epoch}",
            unit="batch",
            leave=False,
            disable=quiet,
        )
        for b, (inputs, targets) in enumerate(bar):
            with autocast(device, amp):
                loss, kept = step(
                    inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                )  # the mean loss over the batch's kept positions, their number
            if kept == 0 and not world.distributed:  # every process must step together under DDP
                continue
            loss = loss.float()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach().double() * kept
            seen += kept
            if not quiet and b % 20 == 0:  # reading the loss waits for the device: not every step
                bar.set_postfix(
                    loss=f"{float(loss_sum) / max(seen, 1):.4f}",
                    ev_s=f"{seen / (time.perf_counter() - t0):,.0f}",
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        total_loss, events = distributed.all_sum([float(loss_sum), float(seen)], device)
        events = int(events)
        val_loss, val = validate(model, split, val_cases, device, amp, candidates)
        entry = EpochLog(
            epoch,
            total_loss / max(events, 1),
            val_loss,
            val.get("hr@10", math.nan),
            val.get("ndcg@10", math.nan),
            events,
            seconds,
            lr,
            config.val_protocol,
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
        if on_epoch is not None and on_epoch(entry):
            break
        if stale and stale % config.lr_patience == 0:  # a plateau: smaller steps often find a bit more
            for group in optimizer.param_groups:
                group["lr"] *= config.lr_decay
    model.load_state_dict(best_state)
    model.eval()
    result.model = model.cpu()  # export, parity gate and evaluation run on the CPU
    result.seconds = time.perf_counter() - started
    return result


def refit(split: Split, model_config: ModelConfig, config: TrainConfig, selected: TrainResult) -> TrainResult:
    """A fresh model trained on training + validation events for the selected run's best epoch count, at the
    learning rates that run used: the model that is tested and served has seen every event before the test
    targets, as the baselines have. `split` must already count validation events as training."""
    schedule = [e.lr for e in selected.epochs[: selected.best_epoch]]
    log.info("refit on training + validation events: %d epochs", len(schedule))
    return fit(split, model_config, config, schedule=schedule)
