"""nextact's offline side: event log -> vocabulary -> windows -> LSTM/GRU -> metrics -> model.onnx + manifest.json.

Command line: ``python -m training train|evaluate --help``. Python API (imports torch on first use):
``training.predict(artifact_dir_or_checkpoint, [["a", "b"], ...])`` returns what model.onnx computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.predict import predict

__all__ = ["predict"]


def __getattr__(name: str) -> Any:
    if name == "predict":  # lazy: importing the package must not import torch
        from training.predict import predict

        return predict
    raise AttributeError(f"module 'training' has no attribute {name!r}")
