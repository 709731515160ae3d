"""The two configuration objects of a training run, built once from the command line and passed in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Cell = Literal["lstm", "gru"]
SplitName = Literal["leave-one-out", "time"]
StopMetric = Literal["hr@10", "ndcg@10"]
ValProtocol = Literal["full", "sampled"]
Loss = Literal["ce", "sampled", "bce"]
Sampler = Literal["uniform", "popularity"]

#: Seed of the sampled protocol's negatives: fixed so that `train` and `evaluate` draw the same ones.
EVAL_SEED = 0


@dataclass(frozen=True)
class DataOptions:
    """Where the events are and which columns play which role."""

    path: Path
    user_col: str = "user_id"
    action_cols: tuple[str, ...] = ("action",)
    time_col: str | None = "timestamp"  # None: file order is the time order
    time_col_required: bool = False  # True when named explicitly: then its absence is an error
    split: SplitName = "leave-one-out"
    val_fraction: float = 0.1  # time split: share of events (latest but test) used for validation
    test_fraction: float = 0.1  # time split: share of the latest events used for testing
    side_col: str | None = None  # train --side-col: a column describing the action (training/side.py)


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape; saved in checkpoint.pt and mirrored in the manifest."""

    vocab_size: int
    cell: Cell = "lstm"
    embedding_dim: int = 256
    hidden_dim: int = 256
    num_layers: int = 1
    dropout: float = 0.4
    window: int = 50
    tied: bool = False  # score actions with the input embedding table (hidden -> E, then E @ embedding.T)
    history_bias: bool = True  # learn one score offset for actions already in the window
    residual: bool = False  # add a projection of each event's embedding to the recurrent output after it
    input_dropout: float | None = None  # dropout on the input embeddings; None: `dropout` (hidden states)
    feed_forward: bool = False  # LayerNorm and a residual feed-forward block on the recurrent output
    # Side information (`--side-col`): side_of[id] is the action's side value (1..S; 0 none), e.g. an item's
    # category. Each action's embedding (and output row) is its own plus its side value's, so actions seen
    # rarely share what their category learned. Folded into plain tables before export (training/side.py):
    # the exported graphs, and the config saved with them, never have it.
    side_of: tuple[int, ...] | None = None
    side_own_scale: float = (
        0.3  # with side_of: each action's own embedding starts at this fraction of its side value's
    )


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: everything `train` needs beyond the data and the network's shape."""

    epochs: int = 30
    batch_size: int | None = None  # None: 64, fewer on small logs (see train.auto_batch_size)
    lr: float = 2e-3
    weight_decay: float = 0.0
    clip_norm: float = 5.0
    patience: int = 3
    lr_decay: float = 0.3  # multiply the learning rate by this after an epoch without validation improvement
    stop_metric: StopMetric = "ndcg@10"
    min_count: int = 1
    seed: int = 0
    quiet: bool = False
    negatives: int = 100
    refit: bool = True  # after early stopping, retrain on training + validation events before testing
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default (one per core)
    step: bool = True  # also export step.onnx (incremental state in the service), gated against model.onnx
    device: str = "auto"  # auto (cuda when available), cuda or cpu
    amp: str = (
        "auto"  # mixed precision on a GPU: auto (bf16, else fp16), bf16, fp16 or off; always off on CPU
    )
    loader_workers: int = 0  # DataLoader processes building batches (0: in the training process)
    loss: Loss = (
        "ce"  # ce: full softmax; sampled: softmax over the target and shared negatives; bce: 1 negative
    )
    loss_negatives: int = 1000  # sampled: negatives shared by every position of a batch
    loss_sampler: Sampler = "uniform"  # sampled: how the negatives are drawn
    logq: bool = (
        True  # sampled: subtract log(expected count) from every candidate's score (popularity sampler)
    )
    lr_patience: int = 1  # multiply the learning rate by lr_decay after this many epochs without improvement
    val_protocol: ValProtocol = (
        "full"  # validation ranking for early stopping and --tune (sampled: 100 negatives)
    )
    ensemble: int = (
        1  # members trained with seeds seed .. seed + ensemble - 1, averaged in one exported graph
    )
    quantize: str = "none"  # int8: the output layer of model.onnx/step.onnx in int8 (training/quantize.py)
    knn_blend: str = (
        "off"  # off, auto (beta chosen on validation) or a beta in [0, 1] (training/knn_blend.py)
    )


@dataclass(frozen=True)
class SearchSpace:
    """What `--tune` searches: one dimension for the embedding and the hidden state, log-uniform between
    `dims`; uniform dropouts; a log-uniform learning rate; the listed losses, batch sizes, tying, negative
    samplers, residual paths and negative counts (the last three matter only to the sampled losses)."""

    losses: tuple[Loss, ...] = ("ce", "sampled")
    dims: tuple[int, int] = (32, 256)
    input_dropout: tuple[float, float] = (0.0, 0.6)
    dropout: tuple[float, float] = (0.0, 0.5)
    lr: tuple[float, float] = (1e-3, 3e-2)
    batch_sizes: tuple[int, ...] = (32, 64, 128, 256)
    tied: tuple[bool, ...] = (True, False)
    samplers: tuple[Sampler, ...] = ("uniform", "popularity")
    residual: tuple[bool, ...] = (False, True)
    negatives: tuple[int, ...] = (1000, 2000)


@dataclass(frozen=True)
class TuneOptions:
    """`--tune`: the search's budget, its metric (on the validation split, under TrainConfig.val_protocol)."""

    budget: float = 3600.0  # wall-clock seconds for the search; the final training is outside it
    trials: int = 100  # at most this many trials
    metric: StopMetric = "ndcg@10"
    space: SearchSpace = SearchSpace()
