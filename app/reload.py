"""Hot model reload: load a new artifact off the event loop, self-check it, swap it in atomically.

The swap is one reference assignment done on the event loop, so a request (or micro-batch) that already
picked up the old model finishes on it, and every later one sees the new model. A new artifact that fails
to load or fails the self-check is refused and the old model keeps serving.

The artifact directory is re-read in place: to roll out a model, point it (or the symlink it is) at a
new, completely written artifact, then call POST /v1/model/reload, or let the file watch notice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from app.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, ManifestError, read_manifest

log = logging.getLogger(__name__)

M = TypeVar("M")


class ReloadError(Exception):
    """A new artifact was refused; the message names the directory or file and what is wrong."""


def model_hash(path: Path) -> str:
    """The manifest's model_version for a model file: sha256 of its bytes, first 16 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_manifest(artifact_dir: Path) -> Manifest:
    """The manifest, validated, and checked against the model file it describes."""
    try:
        manifest = read_manifest(artifact_dir)
    except ManifestError as e:
        raise ReloadError(str(e)) from e
    model_path = Path(artifact_dir) / MODEL_FILE
    if not model_path.is_file():
        raise ReloadError(f"{model_path}: model file not found")
    actual = model_hash(model_path)
    if actual != manifest.model_version:
        raise ReloadError(
            f"{model_path}: content hash {actual} does not match model_version {manifest.model_version} "
            f"in {MANIFEST_FILE} (a half-copied or mismatched artifact?)"
        )
    return manifest


def probe_rows(manifest: Manifest, seed: int = 0) -> list[np.ndarray]:
    """Id rows that exercise the edges: an empty window, one event, a full window, unknown actions."""
    rng = np.random.default_rng(seed)
    window, vocab = manifest.window, manifest.vocab_size
    known = np.arange(2, vocab) if vocab > 2 else np.array([manifest.unk_id])
    return [
        np.zeros(0, dtype=np.int64),
        rng.choice(known, size=1).astype(np.int64),
        rng.choice(known, size=window).astype(np.int64),
        np.full(max(1, window // 2), manifest.unk_id, dtype=np.int64),
    ]


def pad_rows(rows: Sequence[np.ndarray], manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """The graph's inputs for `rows`: ids padded to the window on the manifest's side, and lengths."""
    window = manifest.window
    ids = np.full((len(rows), window), manifest.pad_id, dtype=np.int64)  # (B, T)
    for i, row in enumerate(rows):
        n = len(row)
        if n:
            if manifest.padding_side == "right":
                ids[i, :n] = row
            else:
                ids[i, window - n :] = row
    lengths = np.array([len(r) for r in rows], dtype=np.int64)  # (B,)
    return ids, lengths


def check_probabilities(probs: Any, manifest: Manifest, rows: int, where: str) -> None:
    """Raise ReloadError unless `probs` is a (rows, vocab) matrix of finite probabilities summing to 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (rows, manifest.vocab_size):
        raise ReloadError(f"{where}: output shape {p.shape}, expected {(rows, manifest.vocab_size)}")
    if not np.isfinite(p).all():
        raise ReloadError(f"{where}: output has NaN or infinite probabilities")
    if (p < -1e-6).any() or (p > 1 + 1e-6).any():
        raise ReloadError(f"{where}: output has probabilities outside [0, 1]")
    sums = p.sum(axis=1)
    if not np.allclose(sums, 1.0, atol=1e-4):
        raise ReloadError(f"{where}: rows sum to {sums.round(6).tolist()}, not 1")
    special = p[:, [manifest.pad_id, manifest.unk_id]]
    if (special > 1e-6).any():
        raise ReloadError(f"{where}: padding/unknown tokens get probability {special.max():.3g}, expected 0")


def self_check(probabilities: Callable[[Sequence[np.ndarray]], Any], manifest: Manifest, where: str) -> None:
    """Run the probe rows through `probabilities` (rows -> (B, V)) and check what comes back."""
    rows = probe_rows(manifest)
    try:
        probs = probabilities(rows)
    except Exception as e:  # onnxruntime raises its own exception types for bad graphs/inputs
        raise ReloadError(f"{where}: running the probe batch failed: {e}") from e
    check_probabilities(probs, manifest, len(rows), where)


def check_artifact(artifact_dir: Path) -> Manifest:
    """Manifest valid and matching the model file; the model loads and answers the probe batch sanely (CPU)."""
    import onnxruntime as ort

    artifact_dir = Path(artifact_dir)
    manifest = check_manifest(artifact_dir)
    model_path = artifact_dir / MODEL_FILE
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ReloadError(f"{model_path}: ONNX Runtime cannot load it: {e}") from e
    names = {i.name for i in session.get_inputs()}
    want = {manifest.io.action_ids, manifest.io.lengths}
    if names != want:
        raise ReloadError(f"{model_path}: graph inputs {sorted(names)}, manifest says {sorted(want)}")

    def run(rows: Sequence[np.ndarray]) -> Any:
        ids, lengths = pad_rows(rows, manifest)
        return session.run(
            [manifest.io.probabilities], {manifest.io.action_ids: ids, manifest.io.lengths: lengths}
        )[0]

    self_check(run, manifest, str(model_path))
    return manifest


class CheckableModel(Protocol):
    """What load_and_check needs of a serving model."""

    @property
    def manifest(self) -> Manifest: ...

    def probabilities(self, rows: Sequence[np.ndarray]) -> np.ndarray: ...


C = TypeVar("C", bound=CheckableModel)


def load_and_check(artifact_dir: Path, load: Callable[[Path], C]) -> C:
    """Load the serving model, check the manifest against the model file, run the probe batch through it.

    Used at start-up and for every reload, so a model is only ever served after passing the same checks
    on the same session (and device) that will serve it. The loader's own errors (naming the file) come
    first; then the content hash catches a model.onnx that is not the one the manifest describes.
    """
    artifact_dir = Path(artifact_dir)
    model = load(artifact_dir)
    check_manifest(artifact_dir)
    self_check(model.probabilities, model.manifest, str(artifact_dir / MODEL_FILE))
    return model


def artifact_stamp(artifact_dir: Path) -> tuple[Any, ...] | None:
    """What the file watch compares: size, mtime and inode of both files (through symlinks); None if missing."""
    try:
        stats = [(Path(artifact_dir) / name).stat() for name in (MANIFEST_FILE, MODEL_FILE)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


@dataclass
class ReloadOutcome:
    ok: bool
    model_version: str | None
    previous_version: str | None
    seconds: float
    error: str | None = None


class Reloader(Generic[M]):
    """Loads, checks and installs models one at a time.

    load(dir) builds a serving model (in a worker thread) and must raise if it is unusable; install(model)
    swaps it in (on the event loop); version(model) names it.
    """

    def __init__(
        self,
        artifact_dir: Path,
        load: Callable[[Path], M],
        install: Callable[[M], None],
        version: Callable[[M], str],
        current: Callable[[], M | None],
        metrics: Any = None,
    ) -> None:
        self.artifact_dir = Path(artifact_dir)
        self._load = load
        self._install = install
        self._version = version
        self._current = current
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._seen: tuple[Any, ...] | None = None  # artifact_stamp of the files last loaded (or refused)
        self.last_outcome: ReloadOutcome | None = None

    async def reload(self, reason: str = "api") -> ReloadOutcome:
        """Load and check the artifact, then swap it in; raise ReloadError (old model kept) if refused."""
        async with self._lock:
            old = self._current()
            old_version = self._version(old) if old is not None else None
            start = time.perf_counter()
            # what this attempt reads; files changing during the load differ from it and are loaded next
            self._seen = await asyncio.to_thread(artifact_stamp, self.artifact_dir)
            try:
                new = await asyncio.to_thread(self._load, self.artifact_dir)
            except Exception as e:
                outcome = ReloadOutcome(False, None, old_version, time.perf_counter() - start, str(e))
                self._record(outcome, reason)
                if isinstance(e, ReloadError):
                    raise
                raise ReloadError(str(e)) from e  # the loader's message names the file
            self._install(new)
            outcome = ReloadOutcome(True, self._version(new), old_version, time.perf_counter() - start)
            self._record(outcome, reason)
            return outcome

    def _record(self, outcome: ReloadOutcome, reason: str) -> None:
        self.last_outcome = outcome
        if self._metrics is not None:
            self._metrics.model_reloads.labels(result="ok" if outcome.ok else "refused").inc()
        if outcome.ok:
            log.info(
                "model reloaded (%s): %s -> %s in %.2fs",
                reason,
                outcome.previous_version,
                outcome.model_version,
                outcome.seconds,
            )
        else:
            log.error(
                "model reload (%s) refused, still serving %s: %s",
                reason,
                outcome.previous_version,
                outcome.error,
            )

    def start_watch(self, interval_seconds: float) -> None:
        """Poll the artifact directory; reload when its files changed and then stayed unchanged for one poll.

        Call it right after the current model was loaded: the files as they are now count as served.
        A refused artifact is not retried until its files change again.
        """
        if interval_seconds > 0 and self._watch_task is None:
            self._seen = artifact_stamp(self.artifact_dir)
            self._watch_task = asyncio.create_task(
                self._watch(interval_seconds), name="nextact-artifact-watch"
            )

    async def stop_watch(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _watch(self, interval: float) -> None:
        pending: tuple[Any, ...] | None = None
        while True:
            await asyncio.sleep(interval)
            stamp = await asyncio.to_thread(artifact_stamp, self.artifact_dir)
            if stamp is None or stamp == self._seen:
                pending = None
                continue
            if stamp != pending:  # changed since the last poll: maybe still being written, wait one more poll
                pending = stamp
                continue
            pending = None
            try:
                await self.reload(reason="file watch")
            except ReloadError:
                pass  # logged and counted by reload()
