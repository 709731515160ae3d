"""The artifact contract: manifest.json's schema. Owned by the service, imported by training.

This module must stay importable with pydantic alone (no numpy, no onnxruntime, no torch).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
STEP_FILE = "step.onnx"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.md"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1


class ManifestError(Exception):
    """An artifact directory that cannot be used; the message names the file and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class IONames(_Strict):
    """Names of the ONNX graph's inputs and output."""

    action_ids: str = "action_ids"  # int64 (batch, time), padded with PAD_ID on `padding_side`
    lengths: str = "lengths"  # int64 (batch,), real events per row, 0 allowed
    probabilities: str = "probabilities"  # float32 (batch, vocab), PAD/UNK masked to 0


class StepSpec(_Strict):
    """The optional single-step graph (step.onnx): a carried recurrent state plus S new events -> new state.

    Inputs: `action_ids` int64 (batch, steps), every row the same number of real events (no padding);
    `h` (and for an LSTM `c`) float32 (num_layers, batch, hidden_dim), zeros for an empty history.
    With a history bias, also `history` int64 (batch, time): the whole window's ids, right-padded with 0.
    Outputs: `probabilities` float32 (batch, vocab) after the last step, masked like model.onnx, and the
    new state `h_out` (and `c_out`). Its probabilities equal model.onnx's for the same history.
    """

    file: str = STEP_FILE
    sha256: str = Field(description="sha256 of the step graph's bytes, first 16 hex digits.")
    action_ids: str = "action_ids"
    h: str = "h"
    c: str | None = Field("c", description="Cell-state input; None for a GRU.")
    probabilities: str = "probabilities"
    h_out: str = "h_out"
    c_out: str | None = "c_out"
    history: str | None = Field(
        None,
        description="Input int64 (batch, time): the window's action ids after the new events, right-padded with 0, "
        "for models with a history bias (which scores the window's action set); None: no such input.",
    )
    state_shape: tuple[int, int] = Field(description="(num_layers, hidden_dim) of each of h and c.")
    parity_max_abs_diff: float = Field(
        ge=0, description="Largest difference from model.onnx seen by the gate."
    )


class QuantizationSpec(_Strict):
    """How the output layer of model.onnx (and step.onnx) was quantized after export; None: float32 throughout.

    Written by `python -m training quantize` or `train --quantize int8`. The service runs the graphs as they
    are; this records what its gate measured against the float32 graphs it replaced.
    """

    scheme: Literal["int8"] = Field(
        description="int8: output layer weights int8 per action (7-bit range), hidden state int8 per row."
    )
    layers: int = Field(ge=1, description="Output layers quantized in model.onnx (one per ensemble member).")
    max_abs_diff: float = Field(
        ge=0, description="Largest |probability difference| from the float32 model.onnx seen by the gate."
    )
    top10_overlap: float = Field(
        ge=0, le=1, description="Mean share of the float32 model's top 10 actions kept, over the gate's rows."
    )
    float_model_version: str = Field(description="model_version of the float32 model.onnx it came from.")


class DataSummary(_Strict):
    file: str
    rows: int = Field(ge=0, description="Events after cleaning.")
    users: int = Field(ge=0)
    actions: int = Field(ge=0, description="Distinct action tokens seen in the data.")
    action_columns: list[str]
    time_start: str | None = None
    time_end: str | None = None


class TrainingSummary(_Strict):
    split: Literal["leave-one-out", "time"]
    epochs_run: int
    best_epoch: int
    seconds: float
    events_per_second: float
    seed: int
    batch_size: int
    learning_rate: float


class Manifest(_Strict):
    """Everything the service needs to use model.onnx, and what it was measured at."""

    format_version: int = FORMAT_VERSION
    model_version: str = Field(description="Content hash of model.onnx (sha256, first 16 hex digits).")
    created_at: datetime
    cell: Literal["lstm", "gru"]
    embedding_dim: int = Field(ge=1)
    hidden_dim: int = Field(ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    window: int = Field(ge=1, description="Events the model was trained to look back on.")
    padding_side: Literal["right", "left"] = "right"
    io: IONames = IONames()
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    vocabulary: list[str] = Field(
        min_length=3, description="Action tokens in id order; [0]=<pad>, [1]=<unk>."
    )
    data: DataSummary
    training: TrainingSummary
    # metrics[protocol][scorer][metric], e.g. metrics["sampled"]["model"]["hr@10"]; scorer in model/popularity/markov
    metrics: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    versions: dict[str, str] = Field(
        default_factory=dict, description="Library versions used to train/export."
    )
    step: StepSpec | None = Field(None, description="Optional single-step graph for incremental state.")
    quantization: QuantizationSpec | None = Field(
        None,
        description="Set when the output layer was quantized to int8 after export; metrics stay float32's.",
    )

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)


def read_manifest(artifact_dir: Path) -> Manifest:
    """Load and validate manifest.json; every failure names the file."""
    path = Path(artifact_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{path}: manifest file not found (train a model first: python -m training train ...)"
        )
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValueError as e:
        raise ManifestError(f"{path}: invalid manifest: {e}") from e
    if manifest.format_version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest.format_version} not supported (want {FORMAT_VERSION})"
        )
    if manifest.vocabulary[PAD_ID] != PAD_TOKEN or manifest.vocabulary[UNK_ID] != UNK_TOKEN:
        raise ManifestError(f"{path}: vocabulary must start with {PAD_TOKEN!r}, {UNK_TOKEN!r}")
    return manifest


def write_manifest(artifact_dir: Path, manifest: Manifest) -> Path:
    path = Path(artifact_dir) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
