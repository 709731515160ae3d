"""ONNX Runtime side of training: open an exported graph on the CPU and score histories with it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.manifest import IONames
from training.protocols import Scorer
from training.windows import history_batch

_IO = IONames()


def open_session(path: Path) -> ort.InferenceSession:
    """A CPU session for `path`, quiet (warnings only as errors); the service picks its own providers."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(
    session: ort.InferenceSession, action_ids: np.ndarray, lengths: np.ndarray, io: IONames = _IO
) -> np.ndarray:
    """probabilities (B, V) for action_ids (B, T) and lengths (B,)."""
    feed = {
        io.action_ids: np.asarray(action_ids, dtype=np.int64),
        io.lengths: np.asarray(lengths, dtype=np.int64),
    }
    (probabilities,) = session.run([io.probabilities], feed)
    return probabilities


def onnx_scorer(session: ort.InferenceSession, window: int, io: IONames = _IO) -> Scorer:
    """A protocol scorer running the exported graph on each history's last `window` events."""

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        ids, lengths = history_batch(histories, window)  # (B, T), (B,)
        return run(session, ids, lengths, io)

    return score
