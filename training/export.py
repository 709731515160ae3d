"""One input/output spec -> ONNX -> parity gate: model.onnx is written only if ONNX Runtime agrees with PyTorch.

The graph takes `action_ids` int64 (batch, time), right-padded with PAD_ID, and `lengths` int64 (batch,),
and returns `probabilities` float32 (batch, vocab) with PAD and UNK at exactly 0. Batch and time are dynamic.
It is exported with the torch.export-based (dynamo) exporter; the gate checks the things recurrent exports
are known to get wrong (gate layout, a time axis frozen to the example's length) on every export.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.manifest import MODEL_FILE, PAD_ID, UNK_ID, IONames
from training.ensemble import AnyModel
from training.errors import ParityError
from training.predict import torch_probabilities
from training.runtime import open_session, run

IO = IONames()
TOLERANCE = 1e-5
BATCH_SIZES = (1, 7, 64)


@dataclass(frozen=True)
class ParityCase:
    """One gate input: right-padded ids (B, T) and lengths (B,)."""

    action_ids: np.ndarray
    lengths: np.ndarray

    def describe(self) -> str:
        b, t = self.action_ids.shape
        return f"batch={b}, time={t}, lengths={sorted(set(self.lengths.tolist()))[:6]}"


def parity_cases(vocab_size: int, window: int, seed: int = 0) -> list[ParityCase]:
    """Random inputs at batch sizes 1, 7, 64 and time lengths 1, window/2, window, plus one longer than the
    window; row 0 of each is full length, the others random lengths from 0 (padded rows, empty histories)."""
    rng = np.random.default_rng(seed)
    cases: list[ParityCase] = []
    times = sorted({1, max(1, window // 2), window})
    shapes = [(b, t) for b in BATCH_SIZES for t in times] + [(7, 2 * window + 3)]
    for b, t in shapes:
        ids = rng.integers(UNK_ID, vocab_size, size=(b, t), dtype=np.int64)  # (B, T), UNK included
        lengths = rng.integers(0, t + 1, size=b, dtype=np.int64)  # (B,)
        lengths[0] = t
        ids[np.arange(t)[None, :] >= lengths[:, None]] = PAD_ID  # right padding
        cases.append(ParityCase(ids, lengths))
    return cases


def _clear_rnn_dispatch_caches() -> None:
    """Work around torch 2.13: the exporter swaps in a while_loop LSTM/GRU decomposition (dynamic time) through
    `op.py_kernels` without invalidating the op's dispatch cache, so from the second export in a process on,
    the unrolled decomposition is used and the time axis is frozen to the example's length. The parity gate
    catches that ("Got: 1 Expected: 50"); clearing the cache before each export avoids it."""
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        cache = getattr(op, "_dispatch_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def export_onnx(model: AnyModel, path: Path) -> Path:
    """Export `model` (a fresh copy, in eval mode) to `path` with dynamic batch and time axes; no check."""
    _clear_rnn_dispatch_caches()
    fresh = copy.deepcopy(model).eval()  # the export must not touch the caller's module
    window = fresh.config.window
    ids = torch.full(
        (3, max(2, window)), PAD_ID + 2, dtype=torch.int64
    )  # (3, T) example, not used for shapes
    lengths = torch.tensor([ids.shape[1], 1, 0], dtype=torch.int64)  # (3,)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # the exporter logs optional-operator notes as warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notes from torch.export internals, not our code
            program = torch.onnx.export(
                fresh,
                (ids, lengths),
                None,
                input_names=[IO.action_ids, IO.lengths],
                output_names=[IO.probabilities],
                dynamic_shapes={"action_ids": {0: batch, 1: time}, "lengths": {0: batch}},
                dynamo=True,
                optimize=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    if program is None:
        raise ParityError(f"{path}: the exporter returned no program")
    program.save(str(path))
    return path


def check_parity(model: AnyModel, onnx_path: Path, tolerance: float = TOLERANCE, seed: int = 0) -> float:
    """Run the gate: ONNX Runtime vs PyTorch on `parity_cases`; returns the largest absolute difference.

    Raises ParityError naming the file, the input shape and the measured difference when they disagree by
    more than `tolerance`, when ONNX Runtime cannot run a shape, or when PAD/UNK get probability above 0.
    """
    session = open_session(onnx_path)
    worst = 0.0
    for case in parity_cases(model.config.vocab_size, model.config.window, seed):
        expected = torch_probabilities(model, case.action_ids, case.lengths)  # (B, V)
        try:
            got = run(session, case.action_ids, case.lengths, IO)  # (B, V)
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise ParityError(
                f"{onnx_path}: ONNX Runtime cannot run the graph at {case.describe()}: {e}"
            ) from e
        if got.shape != expected.shape or got.dtype != np.float32:
            raise ParityError(
                f"{onnx_path}: output {got.dtype}{list(got.shape)} at {case.describe()}, "
                f"expected float32{list(expected.shape)}"
            )
        diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
        if not np.isfinite(diff) or diff > tolerance:
            raise ParityError(
                f"{onnx_path}: ONNX Runtime and PyTorch disagree: max |difference| {diff:.3g} "
                f"> {tolerance:g} at {case.describe()}"
            )
        if np.any(got[:, [PAD_ID, UNK_ID]] != 0):
            raise ParityError(
                f"{onnx_path}: padding/unknown ids get probability "
                f"{float(got[:, [PAD_ID, UNK_ID]].max()):.3g} at {case.describe()}, expected 0"
            )
        worst = max(worst, diff)
    return worst


def export_model(model: AnyModel, out_dir: Path, tolerance: float = TOLERANCE) -> tuple[Path, float]:
    """Export, gate and only then move into place as out_dir/model.onnx; returns (path, max difference)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / MODEL_FILE
    tmp = out_dir / (MODEL_FILE + ".tmp")
    try:
        export_onnx(model, tmp)
        diff = check_parity(model, tmp, tolerance)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    return final, diff


def model_version(onnx_path: Path) -> str:
    """The manifest's model_version: the first 16 hex digits of the sha256 of model.onnx."""
    return hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()[:16]
