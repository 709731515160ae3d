"""The artifact at serving time: one ONNX Runtime session, the execution-provider choice, encode/pad/top-k.

Everything the request path needs per prediction is built once here (the action -> id index, the token
array, the input names), so a request allocates only its own id row and its top-k result.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.filters import Filters, apply
from app.manifest import MODEL_FILE, Manifest, ManifestError, StepSpec, read_manifest

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
Device = Literal["auto", "cpu", "cuda"]


class ModelLoadError(Exception):
    """The artifact cannot be served; the message names the file (or the device) and what is wrong."""


@dataclass(frozen=True, slots=True)
class StepRequest:
    """One incremental prediction: the window after the append, k, and the stored state if it is usable.

    `state` (from the model `version`) covers the window without its last `new` actions; without it, or for
    another version, the window is rebuilt from the zero state.
    """

    actions: list[str]
    k: int
    state: bytes | None = None
    new: int = 0
    version: str = ""
    filters: Filters | None = None


@dataclass(frozen=True, slots=True)
class Prediction:
    """One window's top-k, decoded, plus what the window looked like to the model."""

    model_version: str
    unknown_actions: int
    actions: list[str]
    probabilities: list[float]
    # the model's own top `rank_depth` ids before any filter (live quality scores the next event against it)
    ranked: np.ndarray | None = field(default=None, compare=False, repr=False)


class ServingModel:
    """A loaded artifact: manifest, ONNX Runtime session and the lookup tables for encoding and decoding."""

    def __init__(
        self,
        artifact_dir: Path,
        manifest: Manifest,
        session: Any,
        device: Device,
        step: Any = None,
        rank_depth: int = 0,
    ) -> None:
        self.artifact_dir = artifact_dir
        self.rank_depth = rank_depth  # > 0: every Prediction carries its unfiltered top-`rank_depth` ids
        self.manifest = manifest
        self.session = session
        self.step = step  # the step graph's session (incremental state), or None
        self.device = device
        self.providers: list[str] = list(session.get_providers())
        self.provider = self.providers[0]
        special = {manifest.pad_id, manifest.unk_id}
        # "<pad>"/"<unk>" sent as action strings are unknown actions, never padding
        self._index = {a: i for i, a in enumerate(manifest.vocabulary) if i not in special}
        self._tokens = np.array(manifest.vocabulary, dtype=object)
        self._special = np.array(sorted(special), dtype=np.int64)
        self._inputs = (manifest.io.action_ids, manifest.io.lengths)
        self._outputs = [manifest.io.probabilities]

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def knows(self, action: str) -> bool:
        """Whether `action` is in the vocabulary (else it is scored as <unk>)."""
        return action in self._index

    def action_id(self, action: str) -> int | None:
        """The action's id in this model's vocabulary; None if unknown (or a special token's string)."""
        return self._index.get(action)

    def encode(self, actions: Sequence[str]) -> tuple[np.ndarray, int]:
        """Ids of the last `window` actions (unknown ones -> unk id) and how many of them were unknown."""
        window = self.manifest.window
        if len(actions) > window:
            actions = actions[-window:]
        unk, get = self.manifest.unk_id, self._index.get
        ids = [
            get(a, unk) for a in actions
        ]  # a list first: about half the time of np.fromiter on a generator
        return np.array(ids, dtype=np.int64), ids.count(unk)  # (T,)

    def probabilities(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """Pad the id rows to the longest one and run the graph: (B, V) float32."""
        longest = max(1, max((len(r) for r in rows), default=0))  # a (B, 0) input is not a valid graph input
        ids = np.full((len(rows), longest), self.manifest.pad_id, dtype=np.int64)  # (B, T)
        lengths = np.empty(len(rows), dtype=np.int64)  # (B,)
        right = self.manifest.padding_side == "right"
        for i, row in enumerate(rows):
            n = len(row)
            lengths[i] = n
            if n:
                if right:
                    ids[i, :n] = row
                else:
                    ids[i, longest - n :] = row
        (probs,) = self.session.run(self._outputs, {self._inputs[0]: ids, self._inputs[1]: lengths})
        return np.asarray(probs)  # (B, V)

    def top_k(self, row: np.ndarray, k: int) -> tuple[list[str], list[float]]:
        """The k most probable actions of one (V,) row, descending, ties by id; never pad or unk."""
        row = row.copy()[None, :]  # (1, V)
        row[:, self._special] = -1.0
        top, values = _top_k(row, min(k, self.vocab_size - len(self._special)))
        return self._tokens[top[0]].tolist(), values[0].tolist()

    def predict(
        self, requests: Sequence[tuple[Sequence[str], int] | tuple[Sequence[str], int, Filters | None]]
    ) -> list[Prediction]:
        """Score a batch of (window actions, k[, filters]) in one session run; one Prediction each, in order."""
        encoded = [self.encode(r[0]) for r in requests]
        probs = self.probabilities([ids for ids, _ in encoded])  # (B, V)
        filters = [r[2] if len(r) > 2 else None for r in requests]  # type: ignore[misc]
        return self._decode(
            probs,
            [r[1] for r in requests],
            [unknown for _, unknown in encoded],
            filters,
            [r[0] for r in requests],
        )

    def _decode(
        self,
        probs: np.ndarray,
        ks: Sequence[int],
        unknowns: Sequence[int],
        filters: Sequence[Filters | None] | None = None,
        windows: Sequence[Sequence[str]] | None = None,
    ) -> list[Prediction]:
        """Top-k of each (V,) row of probs (overwritten), as Predictions; filtered rows from their own copy."""
        probs[:, self._special] = -1.0  # keeps pad/unk out of any top-k
        real = probs.shape[1] - len(self._special)
        filtered: dict[int, tuple[list[str], list[float]]] = {}
        if filters is not None and windows is not None:
            for i, f in enumerate(filters):
                if f is not None:
                    filtered[i] = self._filtered(probs[i].copy(), ks[i], f, windows[i])
        k_max = min(max(max(ks), self.rank_depth), real)
        top, values = _top_k(probs, k_max)  # (B, k_max) each, most probable first, ties by id
        tokens = self._tokens[top]  # (B, k_max) action strings
        depth = self.rank_depth
        out = []
        for i, (k, unknown) in enumerate(zip(ks, unknowns, strict=True)):
            actions, values_i = filtered.get(i) or (tokens[i, :k].tolist(), values[i, :k].tolist())
            out.append(
                Prediction(self.version, unknown, actions, values_i, top[i, :depth] if depth else None)
            )
        return out

    def _filtered(
        self, row: np.ndarray, k: int, filters: Filters, window: Sequence[str]
    ) -> tuple[list[str], list[float]]:
        """The top-k of one (V,) row among the actions `filters` allow (fewer when fewer are allowed)."""
        mass = apply(filters, row, window, self._index)
        top, values = _top_k(row[None, :], min(k, len(row) - len(self._special)))  # (1, k)
        keep = values[0] >= 0  # masked columns are -1 (or -inf once taken): never returned
        chosen, probs = top[0][keep], values[0][keep].astype(np.float64)
        if filters.renormalize and mass > 0:
            probs = probs / mass
        return self._tokens[chosen].tolist(), probs.tolist()

    def step_state(
        self,
        rows: Sequence[np.ndarray],
        states: Sequence[np.ndarray | None],
        windows: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run the step graph: each id row (>= 1 event) from its state ((n, L, H), None = zeros).

        `windows`: each row's whole window of ids after its events, needed by a graph with a `history` input
        (history-bias models); the rows themselves when not given.

        Returns probabilities (B, V) and the new states (B, n, L, H), n = 2 for an LSTM (h, c), 1 for a GRU.
        Rows are grouped by length, one session run per length.
        """
        spec = self.manifest.step
        assert spec is not None and self.step is not None, "no step graph loaded"
        n_states = 2 if spec.c else 1
        layers, hidden = spec.state_shape
        probs: np.ndarray | None = None  # (B, V), allocated only when the rows need more than one run
        out = np.zeros((len(rows), n_states, layers, hidden), dtype=np.float32)  # (B, n, L, H)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(len(row), []).append(i)
        names = [spec.probabilities, spec.h_out] + ([spec.c_out] if spec.c_out else [])
        for index in groups.values():
            ids = np.stack([rows[i] for i in index])  # (b, S)
            init = np.zeros((n_states, layers, len(index), hidden), dtype=np.float32)  # (n, L, b, H)
            for j, i in enumerate(index):
                state = states[i]
                if state is not None:
                    init[:, :, j] = state
            feed = {spec.action_ids: ids, spec.h: init[0]} | ({spec.c: init[1]} if spec.c else {})
            if spec.history:
                seen = [windows[i] if windows is not None else rows[i] for i in index]
                history = np.full(
                    (len(index), max(len(w) for w in seen)), self.manifest.pad_id, dtype=np.int64
                )
                for j, w in enumerate(seen):
                    history[j, : len(w)] = (
                        w  # (b, T) right-padded: padding lands on the pad column, never scored
                    )
                feed[spec.history] = history
            p, *new = self.step.run(names, feed)  # (b, V), (L, b, H) per state
            if len(groups) == 1:
                probs = p  # every row in one run, in order: no (B, V) copy
            else:
                if probs is None:
                    probs = np.empty((len(rows), self.vocab_size), dtype=np.float32)
                probs[index] = p
            out[index] = np.stack(new).transpose(2, 0, 1, 3)  # (b, n, L, H)
        if probs is None:  # no rows
            probs = np.empty((0, self.vocab_size), dtype=np.float32)
        return probs, out

    def advance(self, requests: Sequence[StepRequest]) -> list[tuple[Prediction, bytes | None]]:
        """Incremental predictions: step the new events from the stored state, else rebuild from the window.

        Each result carries the new state's bytes (None for an empty window, which is scored by model.onnx).
        """
        spec = self.manifest.step
        assert spec is not None, "no step graph loaded"
        shape = (2 if spec.c else 1, *spec.state_shape)  # (n, L, H)
        size = int(np.prod(shape)) * 4
        encoded = [self.encode(r.actions) for r in requests]
        rows: list[np.ndarray] = []
        states: list[np.ndarray | None] = []
        windows: list[np.ndarray] = []
        live: list[int] = []
        for i, (r, (ids, _)) in enumerate(zip(requests, encoded, strict=True)):
            if not len(ids):
                continue
            live.append(i)
            windows.append(ids)
            if (
                r.state is not None
                and r.version == self.version
                and len(r.state) == size
                and 0 < r.new <= len(ids)
            ):
                rows.append(ids[-r.new :])
                states.append(np.frombuffer(r.state, dtype=np.float32).reshape(shape))
            else:
                rows.append(ids)  # rebuild: the model's whole window from the zero state
                states.append(None)
        blobs: list[bytes | None] = [None] * len(requests)
        if len(live) == len(requests):  # the usual micro-batch: every window has events, no (B, V) copy
            probs, new = self.step_state(rows, states, windows)
            blobs = [state.tobytes() for state in new]
        else:
            probs = np.empty((len(requests), self.vocab_size), dtype=np.float32)  # (B, V)
        if live and len(live) < len(requests):
            p, new = self.step_state(rows, states, windows)
            probs[live] = p
            for j, i in enumerate(live):
                blobs[i] = new[j].tobytes()
        if len(live) < len(requests):
            done = set(live)
            empty = [i for i in range(len(requests)) if i not in done]
            probs[empty] = self.probabilities([encoded[i][0] for i in empty])
        preds = self._decode(
            probs,
            [r.k for r in requests],
            [u for _, u in encoded],
            [r.filters for r in requests],
            [r.actions for r in requests],
        )
        return list(zip(preds, blobs, strict=True))


_ARGMAX_UP_TO = 32  # below this k, k argmax passes beat argpartition by ~10x on a few-thousand vocabulary


_ROWS_PER_PASS = 32  # the k argmax passes go over at most this many rows at a time: ~1.5 MB, kept in cache


def _top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns and values of each row's k largest entries, largest first, ties by column. Overwrites probs."""
    if k <= _ARGMAX_UP_TO and probs.shape[0] > _ROWS_PER_PASS:  # (64, 12,070): 1.25 -> 0.9 ms
        parts = [_top_k(probs[i : i + _ROWS_PER_PASS], k) for i in range(0, probs.shape[0], _ROWS_PER_PASS)]
        return np.concatenate([t for t, _ in parts]), np.concatenate([v for _, v in parts])
    rows = np.arange(probs.shape[0])
    if k <= _ARGMAX_UP_TO:
        top = np.empty((probs.shape[0], k), dtype=np.int64)  # (B, k)
        values = np.empty((probs.shape[0], k), dtype=probs.dtype)  # (B, k)
        for j in range(k):
            best = probs.argmax(axis=1)  # (B,) first maximum: ties go to the smaller id
            top[:, j] = best
            values[:, j] = probs[rows, best]
            probs[rows, best] = -np.inf
        return top, values
    if k < probs.shape[1]:
        top = np.argpartition(-probs, k - 1, axis=1)[:, :k]  # (B, k) unordered
    else:
        top = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    values = np.take_along_axis(probs, top, axis=1)
    order = np.lexsort((top, -values))  # per row: value descending, then column
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)


def session_options(intra_op_threads: int) -> Any:
    """The SessionOptions every serving session gets (benchmarks build theirs here too, to profile the same)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.inter_op_num_threads = 1
    # spinning intra-op threads burn the cores the event loop and Redis need between micro-batches
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    return options


def _session(model_path: Path, device: Device, intra_op_threads: int) -> Any:
    import onnxruntime as ort

    options = session_options(intra_op_threads)
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ModelLoadError(
            f"NEXTACT_DEVICE=cuda but this onnxruntime ({ort.__version__}) has no {CUDA}; "
            f"available: {', '.join(available)} (install onnxruntime-gpu)"
        )
    want_cuda = device == "cuda" or (device == "auto" and CUDA in available)
    providers = [CUDA, CPU] if want_cuda else [CPU]
    if want_cuda and hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
        printed = (
            io.StringIO()
        )  # the gpu extra's nvidia-* wheels (CUDA, cuDNN): load them before the provider
        with contextlib.redirect_stdout(printed):  # preload_dlls reports failures with print()
            ort.preload_dlls()
        if printed.getvalue().strip():
            log.warning("preloading the CUDA libraries: %s", " ".join(printed.getvalue().split()))
    if device == "auto" and want_cuda:
        # a failed CUDA load is expected on CPU hosts: keep ORT's own error lines quiet, we log one line below
        ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own (non-public) exception types
        raise ModelLoadError(f"{model_path}: ONNX Runtime cannot load the model: {e}") from e
    finally:
        if device == "auto" and want_cuda:
            ort.set_default_logger_severity(3)


def load_model(
    artifact_dir: Path,
    device: Device = "auto",
    intra_op_threads: int = 0,
    incremental: bool = False,
    rank_depth: int = 0,
) -> ServingModel:
    """Read manifest.json and model.onnx, create the session on the requested device and check it answers.

    With `incremental` and a manifest naming a step graph, that graph is loaded and checked too.
    """
    artifact_dir = Path(artifact_dir)
    try:
        manifest = read_manifest(artifact_dir)
    except ManifestError as e:
        raise ModelLoadError(str(e)) from e
    model_path = artifact_dir / MODEL_FILE
    if not model_path.is_file():
        raise ModelLoadError(
            f"{model_path}: model file not found (train a model first: python -m training train ...)"
        )
    session = _session(model_path, device, intra_op_threads)
    got = session.get_providers()
    if device == "cuda" and got[0] != CUDA:
        raise ModelLoadError(
            f"NEXTACT_DEVICE=cuda but {CUDA} did not load for {model_path} (CUDA/cuDNN libraries missing?); "
            f"session runs on {', '.join(got)}"
        )
    if device == "auto" and got[0] != CUDA and CUDA in _available():
        log.warning(
            "CUDA execution provider did not load (CUDA/cuDNN libraries missing?): running on %s", got[0]
        )
    names = {i.name for i in session.get_inputs()}
    want = {manifest.io.action_ids, manifest.io.lengths}
    outputs = {o.name for o in session.get_outputs()}
    if names != want or manifest.io.probabilities not in outputs:
        raise ModelLoadError(
            f"{model_path}: graph inputs {sorted(names)} / outputs {sorted(outputs)} do not match the manifest's "
            f"io ({sorted(want)} -> {manifest.io.probabilities!r})"
        )
    step = None
    if incremental and manifest.step is not None:
        step = _step_session(artifact_dir, manifest.step, device, intra_op_threads)
    elif incremental:
        log.info(
            "NEXTACT_INCREMENTAL_STATE is on but %s has no step graph (python -m training.step "
            "--artifact %s): recomputing every window",
            artifact_dir,
            artifact_dir,
        )
    model = ServingModel(artifact_dir, manifest, session, device, step, rank_depth=rank_depth)
    _check_answers(model, model_path)
    if step is not None:
        _check_step(model)
    log.info(
        "model %s loaded from %s: %s, window %d, %d actions (plus <pad> and <unk>), on %s%s",
        manifest.model_version,
        artifact_dir,
        manifest.cell,
        manifest.window,
        manifest.vocab_size - 2,
        model.provider,
        f", {manifest.quantization.scheme} output layer" if manifest.quantization else "",
    )
    return model


def _available() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _check_answers(model: ServingModel, model_path: Path) -> None:
    """One warm-up run (an empty window and a one-event window) whose output must be (2, vocabulary size)."""
    rows = [np.zeros(0, dtype=np.int64), np.array([model.manifest.unk_id], dtype=np.int64)]
    try:
        probs = model.probabilities(rows)
    except Exception as e:
        raise ModelLoadError(f"{model_path}: a warm-up run failed: {e}") from e
    if probs.shape != (2, model.vocab_size):
        raise ModelLoadError(
            f"{model_path}: output shape {tuple(probs.shape)} but the manifest's vocabulary has "
            f"{model.vocab_size} actions (model and manifest.json from different trainings?)"
        )


STEP_TOLERANCE = 1e-4  # the export gate holds it to 1e-5 on the CPU; a GPU's kernels may differ a little more


def _step_session(artifact_dir: Path, spec: StepSpec, device: Device, intra_op_threads: int) -> Any:
    import hashlib

    path = artifact_dir / spec.file
    if not path.is_file():
        raise ModelLoadError(f"{path}: step graph named in the manifest not found")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if actual != spec.sha256:
        raise ModelLoadError(
            f"{path}: content hash {actual} does not match the manifest's step.sha256 {spec.sha256}"
        )
    session = _session(path, device, intra_op_threads)
    names = {i.name for i in session.get_inputs()}
    want = (
        {spec.action_ids, spec.h}
        | ({spec.c} if spec.c else set())
        | ({spec.history} if spec.history else set())
    )
    if names != want:
        raise ModelLoadError(f"{path}: step graph inputs {sorted(names)}, the manifest says {sorted(want)}")
    return session


def _check_step(model: ServingModel) -> None:
    """The step graph must reproduce model.onnx: a whole window in one call, then one more event from that state."""
    path = model.artifact_dir / (model.manifest.step.file if model.manifest.step else "")
    rng = np.random.default_rng(0)
    window = model.manifest.window
    ids = rng.integers(model.manifest.unk_id, model.vocab_size, size=window + 1, dtype=np.int64)  # (T + 1,)
    try:
        _, states = model.step_state([ids[:-1]], [None])
        got, _ = model.step_state([ids[-1:]], [states[0]], [ids])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{path}: a warm-up run of the step graph failed: {e}") from e
    want = model.probabilities([ids])
    diff = float(np.abs(got - want).max())
    if not diff <= STEP_TOLERANCE:
        raise ModelLoadError(
            f"{path}: step graph differs from {MODEL_FILE} by {diff:.3g} (> {STEP_TOLERANCE:g})"
        )
