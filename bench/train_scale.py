"""Training at the size of real event logs: load+prepare time, peak memory per event, training and evaluation
speed on synthetic logs of 1 M, 10 M (and 100 M) events.

    python bench/train_scale.py                                  # 1 M and 10 M events
    python bench/train_scale.py --sizes 1e6 1e7 1e8 --load-only 1e8   # and 100 M, load+prepare only

Writes bench/results/train_scale.json and bench/results/train_scale.md. Each size runs in a fresh process,
so its peak RSS is its own. Per size:
- load+prepare: Parquet (bench/synth_log.py) -> clean, de-duplicated, sorted flat arrays -> split ->
  vocabulary (--action-col item_id, --min-count scaled with the size) -> encoded ids; seconds and peak RSS;
  "data B/event" is what the arrays hold (action codes, times, offsets, encoded ids), "peak B/event" the
  process's peak RSS above its RSS after the imports, divided by the events;
- train: --train-batches optimiser steps of the item model (embedding and hidden 32, window 20, batches of 64) (the real training step: windows cut from the
  flat ids, Adam, clipping) on the CPU; events/s = training targets per second;
- evaluate: the model scored on up to --eval-cases test cases (full protocol, batches of 512); cases/s;
- end to end (sizes up to --e2e-max): `python -m training train` on the behaviour column, a few epochs,
  its wall time and peak RSS (the whole command: load, train, validate, refit, test, export).
GPU figures: unmeasured here (no GPU on this machine); run with --device cuda where there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
MODEL = {"embedding_dim": 32, "hidden_dim": 32, "window": 20, "dropout": 0.2}
E2E = [
    "--window",
    "20",
    "--embedding-dim",
    "32",
    "--hidden-dim",
    "32",
    "--batch-size",
    "256",
    "--no-step",
    "--no-refit",
]


def _rss_mib() -> float:
    """Current resident set size (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def min_count_for(events: int) -> int:
    """Keep the item vocabulary near 25 k ids at every size (5 per million events)."""
    return max(2, round(5 * events / 1_000_000))


def log_path(work: Path, events: int) -> Path:
    """The synthetic log of `events` events, generated once (100 M and more: a directory of 10 files)."""
    from bench.synth_log import generate, write, write_parts

    name = f"synth_{events // 1_000_000}m"
    path = work / (name if events >= 50_000_000 else f"{name}.parquet")
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if events >= 50_000_000:
            write_parts(events, path, parts=10)
        else:
            write(generate(events), path)
        print(f"generated {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return path


def measure(
    path: Path, events: int, load_only: bool, train_batches: int, eval_cases: int, threads: int
) -> dict[str, Any]:
    """One size, in this process: load+prepare, then (unless load_only) training steps and evaluation."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from training.config import DataOptions, ModelConfig
    from training.dataset import WindowIndex
    from training.pipeline import prepare
    from training.predict import model_scorer
    from training.protocols import evaluate_cases

    rss_imports = _rss_mib()
    t0 = time.perf_counter()
    min_count = min_count_for(events)
    log, split, vocab = prepare(DataOptions(path=path, action_cols=("item_id",)), min_count=min_count)
    seconds = time.perf_counter() - t0
    n = log.rows
    data_bytes = log.nbytes() + split.ids.nbytes + split.offsets.nbytes
    out: dict[str, Any] = {
        "events": n,
        "rows_read": log.rows_read,
        "users": len(log.users),
        "actions": len(log.tokens),
        "min_count": min_count,
        "vocabulary": len(vocab),
        "load_prepare_s": round(seconds, 2),
        "data_bytes_per_event": round(data_bytes / n, 1),
        "rss_after_imports_mib": round(rss_imports, 1),
        "peak_rss_load_mib": round(_peak_mib(), 1),
        "peak_bytes_per_event": round((_peak_mib() - rss_imports) * 2**20 / n, 1),
    }
    print(json.dumps(out), file=sys.stderr, flush=True)
    if load_only:
        return out

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    from training.model import NextActionModel

    config = ModelConfig(vocab_size=len(vocab), **MODEL)  # type: ignore[arg-type]
    model = NextActionModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    windows = WindowIndex.from_split(split, config.window)
    order = windows.batch_order(64, np.random.default_rng(0))[:train_batches]
    out["windows"] = len(windows)
    out["windows_s"] = round(time.perf_counter() - t0, 2)
    targets, t0 = 0, time.perf_counter()
    for rows in order:
        inputs, labels = windows.batch(rows)
        logits, kept = model.position_logits(torch.from_numpy(inputs), torch.from_numpy(labels))
        if not kept.numel():
            continue
        loss = F.cross_entropy(logits, kept)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        targets += kept.numel()
    train_s = time.perf_counter() - t0
    out["train_batches"] = len(order)
    out["train_events_per_s"] = round(targets / train_s, 1)

    model.eval()
    cases = split.cases("test")
    cases = cases.subset(np.arange(len(cases)) < eval_cases)
    t0 = time.perf_counter()
    evaluation = evaluate_cases(
        split, cases, {"model": model_scorer(model, config.window)}, len(vocab), ("full",)
    )
    eval_s = time.perf_counter() - t0
    out["eval_cases"] = len(cases)
    out["eval_cases_per_s"] = round(len(cases) / eval_s, 1)
    out["eval_hr10"] = round(evaluation.metrics["full"]["model"].get("hr@10", 0.0), 4)
    out["peak_rss_mib"] = round(_peak_mib(), 1)
    return out


def end_to_end(path: Path, epochs: int, work: Path) -> dict[str, Any]:
    """`python -m training train` on the behaviour column, in a child that reports its own peak RSS."""
    out_dir = work / f"artifact-{path.stem}"
    argv = ["train", "--data", str(path), "--out", str(out_dir), "--action-col", "behavior"]
    argv += ["--epochs", str(epochs), "--patience", str(epochs), *E2E, "--quiet"]
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--e2e-child", json.dumps(argv)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    command = "python -m training " + " ".join(argv)
    if done.returncode != 0:
        return {"command": command, "error": done.stderr[-2000:]}
    result = json.loads(done.stdout[: done.stdout.rindex("PEAK_RSS_MIB")])
    peak = float(done.stdout.rsplit("PEAK_RSS_MIB", 1)[1])
    return {
        "command": command,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak, 1),
        "epochs_run": result["training"]["epochs_run"],
        "refit_epochs": result["refit_epochs"],
        "train_events_per_s": result["training"]["events_per_second"],
        "test_cases": result["test_cases"],
        "test_ndcg10": round(result["metrics"]["full"]["model"]["ndcg@10"], 4),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Training at scale (synthetic logs, CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average before {report['load_before']}, after {report['load_after']}",
        "",
        (
            "| events | users | vocabulary | load+prepare s | data B/event | peak RSS (load) MiB | peak B/event "
            "| train events/s | eval cases/s |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["sizes"]:
        lines.append(
            f"| {r['events']:,} | {r['users']:,} | {r['vocabulary']:,} (min-count {r['min_count']}) "
            f"| {r['load_prepare_s']} | {r['data_bytes_per_event']} | {r['peak_rss_load_mib']:,.0f} "
            f"| {r['peak_bytes_per_event']} | {r.get('train_events_per_s', 'not run')} "
            f"| {r.get('eval_cases_per_s', 'not run')} |"
        )
    e2e = [r for r in report["sizes"] if "end_to_end" in r]
    if e2e:
        lines += ["", "End to end (`python -m training train`, behaviour column):", ""]
        lines += ["| events | wall s | peak RSS MiB | epochs (+refit) | train events/s | test NDCG@10 |"]
        lines += ["|---:|---:|---:|---:|---:|---:|"]
        for r in e2e:
            e = r["end_to_end"]
            if "error" in e:
                lines.append(f"| {r['events']:,} | failed: {e['error'][-200:]!r} | | | | |")
                continue
            lines.append(
                f"| {r['events']:,} | {e['wall_s']} | {e['peak_rss_mib']:,.0f} | {e['epochs_run']} "
                f"(+{e['refit_epochs']}) | {e['train_events_per_s']:,} | {e['test_ndcg10']} |"
            )
        lines += ["", f"End-to-end command: `{e2e[0]['end_to_end'].get('command', '')}`"]
    lines += ["", "GPU: unmeasured (no GPU on this machine).", ""]
    return "\n".join(lines)


def e2e_only(args: argparse.Namespace, argv: list[str]) -> int:
    """`--e2e-only`: the end-to-end training runs alone (a long run kept apart from the measurements)."""
    rows = []
    for size in args.sizes:
        row = {"events": int(size), **end_to_end(log_path(args.work, int(size)), args.e2e_epochs, args.work)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    report = {"command": "python bench/train_scale.py " + " ".join(argv), "runs": rows}
    lines = [f"# End-to-end training runs\n\nCommand: `{report['command']}`\n"]
    lines += [
        "| events | wall s | peak RSS MiB | epochs | train events/s | test NDCG@10 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['events']:,} | failed | | | | |")
            continue
        lines.append(
            f"| {r['events']:,} | {r['wall_s']} | {r['peak_rss_mib']:,.0f} | {r['epochs_run']} "
            f"| {r['train_events_per_s']:,} | {r['test_ndcg10']} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_scale_e2e.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "train_scale_e2e.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7], help="events per log (1e6 1e7)")
    p.add_argument(
        "--load-only", type=float, nargs="*", default=[], help="sizes measured for load+prepare only"
    )
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/nextact-train-scale"), help="synthetic logs, artifacts"
    )
    p.add_argument("--train-batches", type=int, default=30, help="optimiser steps timed per size (30)")
    p.add_argument("--eval-cases", type=int, default=5000, help="test cases scored per size (5000)")
    p.add_argument("--e2e-max", type=float, default=1e7, help="end-to-end train runs up to this size (1e7)")
    p.add_argument("--e2e-epochs", type=int, default=2, help="epochs of the end-to-end runs (2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--results", default="train_scale", help="bench/results/NAME.{json,md} (train_scale)")
    p.add_argument(
        "--max-gib",
        type=float,
        default=0.0,
        help="cap each measuring process's address space (GiB; pyarrow then uses the system allocator): on a "
        "shared machine a size that does not fit fails with MemoryError instead of waking the OOM killer",
    )
    p.add_argument(
        "--e2e-only",
        action="store_true",
        help="only the end-to-end runs, results to bench/results/train_scale_e2e.{json,md}",
    )
    p.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # the per-size child
    p.add_argument("--events", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--e2e-child", default=None, help=argparse.SUPPRESS)  # the end-to-end child
    args = p.parse_args(argv)

    if args.e2e_child is not None:
        from training.__main__ import main as train_main

        rc = train_main(json.loads(args.e2e_child))
        print(f"PEAK_RSS_MIB {_peak_mib()}", flush=True)
        return rc

    if args.measure is not None:
        if args.max_gib:
            cap = int(args.max_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        load_only = args.events in {int(s) for s in args.load_only}
        out = measure(args.measure, args.events, load_only, args.train_batches, args.eval_cases, args.threads)
        print(json.dumps(out))
        return 0

    if args.e2e_only:
        return e2e_only(args, argv if argv is not None else sys.argv[1:])

    report: dict[str, Any] = {
        "command": "python bench/train_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "sizes": [],
    }
    for size in args.sizes:
        events = int(size)
        path = log_path(args.work, events)
        child = [sys.executable, __file__, "--measure", str(path), "--events", str(events)]
        child += ["--train-batches", str(args.train_batches), "--eval-cases", str(args.eval_cases)]
        child += ["--threads", str(args.threads), "--max-gib", str(args.max_gib)]
        child += ["--load-only", *[str(int(s)) for s in args.load_only]]
        env = {**os.environ, **({"ARROW_DEFAULT_MEMORY_POOL": "system"} if args.max_gib else {})}
        done = subprocess.run(child, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"size {events}: the measuring process failed ({done.returncode})")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if events <= args.e2e_max and events not in {int(s) for s in args.load_only}:
            row["end_to_end"] = end_to_end(path, args.e2e_epochs, args.work)
        print(json.dumps(row), file=sys.stderr, flush=True)
        report["sizes"].append(row)
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"{args.results}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
