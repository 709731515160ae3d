"""PyTorch-side predictions: what model.onnx computes, from a model, a checkpoint or an artifact directory.

Used by the training loop and the evaluation, and by tests that compare the service (ONNX Runtime) with
training (PyTorch) on the same action sequences:

    from training import predict
    probs = predict("artifacts/demo", [["pv", "pv", "cart"], []])   # (2, V) float32, rows sum to 1
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import load_checkpoint
from training.ensemble import AnyModel
from training.protocols import Scorer
from training.vocab import Vocabulary
from training.windows import history_batch


def torch_probabilities(model: AnyModel, action_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The model's probabilities (B, V) float32 for right-padded ids (B, T) and lengths (B,), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = model(
                torch.from_numpy(np.ascontiguousarray(action_ids, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)),
            )  # (B, V)
    finally:
        model.train(was_training)
    return out.numpy()


def model_scorer(model: AnyModel, window: int) -> Scorer:
    """A protocol scorer: each history's last `window` events -> probabilities (B, V)."""

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        ids, lengths = history_batch(histories, window)  # (B, T), (B,)
        return torch_probabilities(model, ids, lengths)

    return score


def encode_sequences(
    vocabulary: Vocabulary, sequences: Sequence[Sequence[str]], window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Action strings -> (action_ids (B, T), lengths (B,)) as the service sends them: the last `window` events,
    unknown actions as UNK, right-padded."""
    return history_batch([vocabulary.encode(list(s)) for s in sequences], window)


def predict(
    source: str | Path | tuple[AnyModel, Vocabulary], sequences: Sequence[Sequence[str]]
) -> np.ndarray:
    """Next-action probabilities (B, V) float32 for action-string sequences, computed with PyTorch.

    `source` is an artifact directory, a checkpoint.pt, or a (model, vocabulary) pair. Each sequence is cut
    to its last `window` events first, like the service does; column i is the action `vocabulary[i]`.
    """
    model, vocabulary = load_checkpoint(Path(source)) if isinstance(source, str | Path) else source
    ids, lengths = encode_sequences(vocabulary, sequences, model.config.window)
    return torch_probabilities(model, ids, lengths)
