"""Where one inference call's time goes: `python bench/model_bench.py --profile` (this module does the work).

Three views of the service's incremental path (`ServingModel.advance`: encode, step graph, top-k decode),
each per batch size and in two cache states:

- **warm**: calls back to back, the weights stay in the CPU caches (what a micro-benchmark loop sees);
- **cold**: `--gap-ms` of sleep before each call (10 ms: one request every 10 ms, the 100 req/s phase of
  bench/tail.py), so the weights come back from memory as they do in a lightly loaded service.

1. `stages`: `advance` with its parts timed in place (the instance's own methods wrapped with a clock):
   encode, the step graph's session run, the feed/state glue around it (`step_state` minus the run), the
   top-k decode, and the rest of `advance` (state bytes, result objects). Wall ms per call, median.
2. `ops`: ONNX Runtime's own per-node profile of step.onnx (`SessionOptions.enable_profiling`, the service's
   session options otherwise), summed per operator type: µs per call, mean.
3. `handoff`: one-row requests through the real micro-batcher (`app.batching.Batcher`, its worker thread)
   on an asyncio loop (uvloop where installed, as the service runs): submit-to-result wall time minus the
   model call's own time is the hand-off from the loop to the inference thread and back.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np


def _histories(model: Any, count: int, seed: int) -> list[list[str]]:
    """`count` random histories of window + 1 known actions (the last one is the new event)."""
    rng = np.random.default_rng(seed)
    vocab = model.manifest.vocabulary
    ids = rng.integers(model.manifest.unk_id + 1, len(vocab), size=(count, model.manifest.window + 1))
    return [[vocab[i] for i in row] for row in ids.tolist()]


def _requests(model: Any, histories: list[list[str]]) -> list[Any]:
    """One new event per history, from the state the history before it left (as the service stores it)."""
    from app.model import StepRequest

    states = [s for _, s in model.advance([StepRequest(h[:-1], 10) for h in histories])]
    return [StepRequest(h, 10, s, 1, model.version) for h, s in zip(histories, states, strict=True)]


class _Clock:
    """Sums wall time per stage name while installed on a ServingModel instance (its own methods, wrapped)."""

    def __init__(self, model: Any) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.model = model
        self._saved = {name: getattr(model, name) for name in ("encode", "step_state", "_decode")}
        self._session = model.step

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        totals = self.totals

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return timed

    def __enter__(self) -> Self:
        m = self.model
        for name, fn in self._saved.items():
            setattr(m, name, self._wrap(name, fn))
        session, run = self._session, self._wrap("run", self._session.run)

        class Session:  # the step session with a clocked run(); the rest of its surface passes through
            def __getattr__(self, attr: str) -> Any:
                return getattr(session, attr)

            def run(self, *args: Any, **kwargs: Any) -> Any:
                return run(*args, **kwargs)

        m.step = Session()
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self._saved:
            delattr(self.model, name)  # back to the class's methods
        self.model.step = self._session


def stages(model: Any, requests: list[Any], calls: int, gap_s: float) -> dict[str, float]:
    """Median wall ms per `advance` call and per stage, over `calls` calls with `gap_s` of sleep before each."""
    model.advance(requests)  # warm-up
    per_call: dict[str, list[float]] = collections.defaultdict(list)
    cpu = 0.0
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        with _Clock(model) as clock:
            c0, start = time.process_time(), time.perf_counter()
            model.advance(requests)
            wall = time.perf_counter() - start
            cpu += time.process_time() - c0
        t = clock.totals
        per_call["advance"].append(wall)
        per_call["encode"].append(t["encode"])
        per_call["run"].append(t["run"])
        per_call["glue"].append(t["step_state"] - t["run"])
        per_call["decode"].append(t["_decode"])
        per_call["rest"].append(wall - t["encode"] - t["step_state"] - t["_decode"])
    out = {name: round(statistics.median(v) * 1000, 4) for name, v in per_call.items()}
    out["advance_p90"] = round(sorted(per_call["advance"])[int(0.9 * (calls - 1))] * 1000, 4)
    out["advance_cpu"] = round(cpu / calls * 1000, 4)
    return out


def ops(model: Any, requests: list[Any], threads: int, calls: int, gap_s: float) -> dict[str, Any]:
    """ONNX Runtime's per-node profile of the step graph for this batch, per operator type (µs per call)."""
    import onnxruntime as ort

    from app.model import session_options

    spec = model.manifest.step
    feeds: dict[str, Any] = {}

    class Capture:  # records the feed advance builds for the step graph, so the profile runs the same one
        def run(self, names: list[str], feed: dict[str, Any]) -> Any:
            feeds.update(feed)
            return real.run(names, feed)

    real, model.step = model.step, Capture()
    try:
        model.advance(requests)
    finally:
        model.step = real
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "step")
        session = ort.InferenceSession(
            str(model.artifact_dir / spec.file), options, providers=["CPUExecutionProvider"]
        )
        for _ in range(3):
            session.run(None, feeds)
        session.end_profiling()  # the warm-up's events go to a file of their own
        options.profile_file_prefix = str(Path(tmp) / "timed")
        session = ort.InferenceSession(
            str(model.artifact_dir / spec.file), options, providers=["CPUExecutionProvider"]
        )
        for _ in range(3):
            session.run(None, feeds)
        for _ in range(calls):
            if gap_s:
                time.sleep(gap_s)
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    runs, total = 0, 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs, total = runs + 1, total + e["dur"]
    runs = max(runs, 1)
    return {
        "model_run_us": round(total / runs, 1),
        "ops_us": {k: round(v / runs, 1) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }


def handoff(model: Any, requests: list[Any], calls: int, gap_s: float) -> dict[str, float]:
    """One-row submits through the real Batcher: wall ms from submit to result, and minus the model call."""
    from app.batching import Batcher

    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the service
        new_loop = asyncio.new_event_loop

    async def measure() -> dict[str, float]:
        batcher: Any = Batcher(model.advance, max_size=64, max_wait_s=0.0015)
        totals, inner = [], []
        try:
            await batcher.submit(requests[0])
            for _ in range(calls):
                if gap_s:
                    await asyncio.sleep(gap_s)
                start = time.perf_counter()
                _, stamps = await batcher.submit_timed(requests[0])
                totals.append(time.perf_counter() - start)
                inner.append(stamps[3] - stamps[0])  # the loop's side: hand-off to result back
        finally:
            await batcher.close()
        return {
            "submit_to_result_ms": round(statistics.median(totals) * 1000, 4),
            "handoff_ms": round(
                statistics.median([t - i for t, i in zip(totals, inner, strict=True)]) * 1000, 4
            ),
        }

    loop = new_loop()
    try:
        return loop.run_until_complete(measure())
    finally:
        loop.close()


def profile(
    artifact_dir: Path,
    batch_sizes: list[int],
    threads: int,
    calls: int,
    gap_ms: float,
    caches: tuple[str, ...] = ("warm", "cold"),
) -> dict[str, Any]:
    """All three views, warm and/or cold, for each batch size."""
    import onnxruntime as ort

    from app.model import load_model

    model = load_model(artifact_dir, device="cpu", intra_op_threads=threads, incremental=True)
    if model.step is None:
        raise SystemExit(f"{artifact_dir}: no step graph (python -m training.step --artifact {artifact_dir})")
    histories = _histories(model, max(batch_sizes), seed=0)
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for batch in batch_sizes:
        requests = _requests(model, histories[:batch])
        for cache in caches:
            gap = gap_ms / 1000 if cache == "cold" else 0.0
            row: dict[str, Any] = {"batch": batch, "cache": cache}
            row["stages_ms"] = stages(model, requests, calls, gap)
            row |= ops(model, requests, threads, calls, gap)
            if batch == 1:
                row["handoff"] = handoff(model, requests, calls, gap)
            rows.append(row)
    m = model.manifest
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": load_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "model": f"{m.cell.upper()}, vocabulary {m.vocab_size:,}, window {m.window}, E{m.embedding_dim}/H{m.hidden_dim}",
        "quantization": m.quantization.scheme if m.quantization else None,
        "ort_version": ort.__version__,
        "intra_op_threads": threads or "default",
        "calls": calls,
        "gap_ms": gap_ms,
        "rows": rows,
    }


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        f"# One inference call, taken apart ({res['date']})",
        "",
        f"- command: `{command}`",
        f"- model: {res['model']}" + (f", {res['quantization']} output layer" if res["quantization"] else ""),
        (
            f"- ONNX Runtime {res['ort_version']}, intra-op threads {res['intra_op_threads']}; {res['calls']} "
            f"calls per cell; cold = {res['gap_ms']:g} ms of sleep before each call; load average at start / "
            f"end: {res['load_average_at_start']} / {res['load_average_at_end']}"
        ),
        "",
        "## advance() per stage (wall ms per call, median)",
        "",
        "| batch | cache | advance | p90 | CPU | encode | step run | feed/state glue | top-k decode | rest |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        s = r["stages_ms"]
        lines.append(
            f"| {r['batch']} | {r['cache']} | {s['advance']:.3f} | {s['advance_p90']:.3f} | {s['advance_cpu']:.3f} | "
            f"{s['encode']:.3f} | {s['run']:.3f} | {s['glue']:.3f} | {s['decode']:.3f} | {s['rest']:.3f} |"
        )
    ops_names = list(dict.fromkeys(k for r in res["rows"] for k in r["ops_us"]))
    shown = ops_names[:6]
    lines += [
        "",
        "## step.onnx per operator type (ONNX Runtime profile, µs per call, mean)",
        "",
        "| batch | cache | model_run | " + " | ".join(shown) + " | all others |",
        "|---:|---|---:|" + "---:|" * (len(shown) + 1),
    ]
    for r in res["rows"]:
        o = r["ops_us"]
        others = sum(v for k, v in o.items() if k not in shown)
        lines.append(
            f"| {r['batch']} | {r['cache']} | {r['model_run_us']:.1f} | "
            + " | ".join(f"{o.get(k, 0.0):.1f}" for k in shown)
            + f" | {others:.1f} |"
        )
    hand = [r for r in res["rows"] if "handoff" in r]
    if hand:
        lines += [
            "",
            "## The micro-batcher's hand-off, one row (wall ms, median)",
            "",
            "| cache | submit to result | of it, hand-off (loop -> inference thread -> loop) |",
            "|---|---:|---:|",
        ]
        for r in hand:
            h = r["handoff"]
            lines.append(f"| {r['cache']} | {h['submit_to_result_ms']:.3f} | {h['handoff_ms']:.3f} |")
    return "\n".join(lines) + "\n"
