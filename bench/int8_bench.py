"""Float32 vs int8 output layer, the model alone: CPU ms per call and how far the answers move.

    python bench/int8_bench.py --artifact-dir artifacts/beauty256 --int8-dir artifacts/beauty256-int8 \\
        --data ../shared/data/amazon_beauty.csv

Both artifacts are loaded as the service loads them (app.model.load_model, incremental state, one intra-op
thread unless --threads). Inputs are real histories from --data: each user's last window + 1 events, the
last one being the new event. Timed per batch size, float and int8 interleaved (A/B/A/B, --rounds rounds),
CPU time of this process per call (process_time: the least load-sensitive figure on a shared machine):

- `step`: the step graph scoring one new event from each row's state (the service's default path);
- `advance`: the whole incremental inference path of a micro-batch (encode, step graph, top-10 decode);
- `full`: model.onnx over each full window (NEXTACT_INCREMENTAL_STATE=false, and rebuilds).

Agreement on --rows histories: max |probability difference|, mean top-10 overlap, top-1 agreement.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

RESULTS = ROOT / "bench" / "results"


def histories(path: Path, column: str, window: int, count: int, seed: int) -> list[list[str]]:
    """`count` users' last window + 1 actions (users with at least 2 events), in file order per user."""
    by_user: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            by_user.setdefault(row["user_id"], []).append(row[column])
    users = [h for h in by_user.values() if len(h) >= 2]
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=min(count, len(users)), replace=False)
    return [users[i][-(window + 1) :] for i in picked]


def cpu_ms(fn: Callable[[], Any], budget_s: float) -> float:
    """CPU ms per call of this process, over at least 5 calls and `budget_s` seconds."""
    for _ in range(2):
        fn()
    calls, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while calls < 5 or time.perf_counter() - wall0 < budget_s:
        fn()
        calls += 1
    return (time.process_time() - cpu0) / calls * 1000


def workloads(model: Any, rows: list[list[str]], batch: int) -> dict[str, Callable[[], Any]]:
    """The three timed calls for the first `batch` histories (states computed once, by this model)."""
    from app.model import StepRequest

    part = rows[:batch]
    before = [StepRequest(h[:-1], 10) for h in part]
    states = [s for _, s in model.advance(before)]
    requests = [
        StepRequest(h, 10, s, 1, model.version) for h, s in zip(part, states, strict=True)
    ]  # one new event each, from the stored state
    encoded = [model.encode(h)[0] for h in part]
    spec = model.manifest.step
    shape = (2 if spec.c else 1, *spec.state_shape)  # (n, L, H)
    shaped = [None if s is None else np.frombuffer(s, dtype=np.float32).reshape(shape) for s in states]
    last = [e[-1:] for e in encoded]
    return {
        "step": lambda: model.step_state(last, shaped, encoded),
        "advance": lambda: model.advance(requests),
        "full": lambda: model.probabilities(encoded),
    }


def agreement(float_model: Any, int8_model: Any, rows: list[list[str]]) -> dict[str, float]:
    encoded = [float_model.encode(h)[0] for h in rows]
    a, b = float_model.probabilities(encoded), int8_model.probabilities(encoded)  # (B, V)
    a[:, :2], b[:, :2] = -1.0, -1.0
    top_a, top_b = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    overlap = [len(set(x) & set(y)) / 10 for x, y in zip(top_a.tolist(), top_b.tolist(), strict=True)]
    return {
        "rows": len(rows),
        "max_abs_diff": float(np.abs(a - b).max()),
        "top10_overlap": float(np.mean(overlap)),
        "top1_agreement": float(np.mean(top_a[:, 0] == top_b[:, 0])),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from app.model import load_model

    models = {
        name: load_model(path, device="cpu", intra_op_threads=args.threads, incremental=True)
        for name, path in (("float32", args.artifact_dir), ("int8", args.int8_dir))
    }
    manifest = models["float32"].manifest
    column = args.action_col or manifest.data.action_columns[0]
    rows = histories(args.data, column, manifest.window, max(args.rows, max(args.batch_sizes)), args.seed)
    loads = {name: {b: workloads(m, rows, b) for b in args.batch_sizes} for name, m in models.items()}
    times: dict[str, dict[int, dict[str, list[float]]]] = {
        name: {b: {w: [] for w in ("step", "advance", "full")} for b in args.batch_sizes} for name in models
    }
    for r in range(args.rounds):
        for b in args.batch_sizes:
            for name in models:  # A/B within every cell: the load drifts between cells, not within
                for w, fn in loads[name][b].items():
                    times[name][b][w].append(cpu_ms(fn, args.budget_s))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    table = [
        {
            "batch": b,
            "workload": w,
            **{f"{name}_cpu_ms": round(statistics.median(times[name][b][w]), 3) for name in models},
            "int8_over_float32": round(
                statistics.median(times["int8"][b][w]) / statistics.median(times["float32"][b][w]), 3
            ),
        }
        for b in args.batch_sizes
        for w in ("step", "advance", "full")
    ]
    return {
        "command": " ".join(["python", "bench/int8_bench.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_start": args.load_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "artifacts": {name: str(m.artifact_dir) for name, m in models.items()},
        "versions": {name: m.version for name, m in models.items()},
        "quantization": models["int8"].manifest.quantization.model_dump()
        if models["int8"].manifest.quantization
        else None,
        "intra_op_threads": args.threads or "default",
        "rounds": args.rounds,
        "agreement": agreement(models["float32"], models["int8"], rows[: args.rows]),
        "rows": table,
    }


def markdown(res: dict[str, Any]) -> str:
    a = res["agreement"]
    lines = [
        f"# Float32 vs int8 output layer ({res['date']})",
        "",
        f"- command: `{res['command']}`",
        (
            f"- load average at start / end: {res['load_average_at_start']} / {res['load_average_at_end']}; "
            f"intra-op threads: {res['intra_op_threads']}; median of {res['rounds']} interleaved rounds"
        ),
        (
            f"- agreement on {a['rows']} real histories: max |probability difference| {a['max_abs_diff']:.2e}, "
            f"mean top-10 overlap {a['top10_overlap']:.4f}, top-1 the same on {a['top1_agreement']:.1%}"
        ),
        "",
        "| batch | workload | float32 CPU ms/call | int8 CPU ms/call | int8 / float32 | saved ms per row |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        saved = (r["float32_cpu_ms"] - r["int8_cpu_ms"]) / r["batch"]
        lines.append(
            f"| {r['batch']} | {r['workload']} | {r['float32_cpu_ms']:.3f} | {r['int8_cpu_ms']:.3f} | "
            f"{r['int8_over_float32']:.2f} | {saved:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact-dir", type=Path, required=True, help="the float32 artifact")
    p.add_argument("--int8-dir", type=Path, required=True, help="its int8 copy (python -m training quantize)")
    p.add_argument("--data", type=Path, required=True, help="event log the histories come from")
    p.add_argument("--action-col", help="(default: the manifest's action column)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 20, 64])
    p.add_argument("--rows", type=int, default=512, help="histories for the agreement figures")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=0.5, help="timing budget per cell, workload and model")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "int8", help="results path without suffix")
    args = p.parse_args(argv)
    args.load_start = [round(x, 2) for x in os.getloadavg()]
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
