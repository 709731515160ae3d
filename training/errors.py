"""Exceptions raised by the training package; each message names the file, line, column or value at fault."""

from __future__ import annotations


class TrainingError(Exception):
    """Base class: the command line prints the message and exits with status 2, no traceback."""


class DataError(TrainingError):
    """An event log that cannot be read or used (missing column, unreadable value, no usable events)."""


class ArtifactError(TrainingError):
    """An artifact directory or checkpoint that cannot be used."""


class ParityError(TrainingError):
    """ONNX Runtime and PyTorch disagree on the exported graph; the export was aborted."""
