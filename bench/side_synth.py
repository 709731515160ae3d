"""Side information where the truth is known: a generated log whose categories carry part of the signal, trained
without and with `--side-col category_id`, on two seeds.

    python bench/side_synth.py --out bench/results/side_synth

The log (bench/synth_log.py --category-steps): 100,000 events, 5,000 users, 20,000 items in 100 categories.
Each step is one kind, following the item actually before it: 40 % an item of the previous item's category
(Zipf-popular within it), 20 % one of the previous item's four successors, 10 % a repeat of one of the last
five items, the rest a draw by global popularity. Most items occur a few times, so an item's own embedding
learns little and its category's embedding is what the model can share. On the Taobao sample (114 users) the
categories' effect was within a case or two on validation (docs/model-quality.md, "Items: side
information"); here there are 5,000 validation and 5,000 test cases.

Each run is the whole `python -m training train` (the default configuration, refit, blend, export, gates)
as a subprocess, --parallel at a time, one thread each. Writes OUT.json (every run's result JSON, its command,
and the log's parameters) and OUT.md (the table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOG = {
    "events": 100_000,
    "users": 5_000,
    "items": 20_000,
    "repeat": 0.1,
    "transition": 0.2,
    "category_steps": 0.4,
}


def train(data: Path, out: Path, seed: int, side: bool, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "training", "train", "--data", str(data), "--action-col", "item_id"]
    cmd += ["--side-col", "category_id"] if side else []
    cmd += ["--out", str(out), "--seed", str(seed), "--threads", "1", "--quiet", *extra]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    if "{" not in done.stdout:
        raise SystemExit(f"{' '.join(cmd)} wrote no result JSON:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    result = json.loads(done.stdout[done.stdout.index("{") :])
    shown = ["python" if c == sys.executable else c.replace(f"{ROOT}/", "") for c in cmd]
    return {
        "side": side,
        "seed": seed,
        "command": " ".join(shown),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "selected": selected_epoch(out / "report.md", result["training"]["best_epoch"]),
        "result": result,
    }


def selected_epoch(report: Path, best: int) -> dict[str, float]:
    """The validation figures of the selected epoch, from the report's per-epoch table (before the refit)."""
    for line in report.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] == str(best):
            return {"val_loss": float(cells[2]), "val_hr10": float(cells[3]), "val_ndcg10": float(cells[4])}
    raise SystemExit(f"{report}: no row for the selected epoch {best} in the per-epoch table")


def _cell(m: dict[str, float]) -> str:
    return f"{m['hr@10']:.4f} / {m['ndcg@10']:.4f}"


def markdown(runs: list[dict[str, Any]], argv: list[str], stats: dict[str, float]) -> str:
    lines = [
        "# Side information on a generated log whose categories carry the signal",
        "",
        f"`python bench/side_synth.py {' '.join(argv)}`".replace(" `", "`"),
        "",
        "Log: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in LOG.items()) + ".",
        "As generated: " + ", ".join(f"{k} {v:,}" for k, v in stats.items()) + ".",
        "HR@10 / NDCG@10 on the test split; *model* is the exported blend, *recurrent* the recurrent model alone;",
        "val loss and NDCG@10: the selected epoch of the model before the refit.",
        "",
        (
            "| side | seed | best epoch | val loss | val NDCG@10 | full: model | full: recurrent | sampled: model "
            "| sampled: recurrent | item-kNN full | item-kNN sampled | train s |"
        ),
        "|---|---:|---:|---:|---:|---|---|---|---|---|---|---:|",
    ]
    for run in runs:
        r = run["result"]
        full, sampled = r["metrics"]["full"], r["metrics"]["sampled"]
        epoch = run["selected"]
        lines.append(
            f"| {'category_id' if run['side'] else 'none'} | {run['seed']} | {r['training']['best_epoch']} | "
            f"{epoch['val_loss']:.4f} | {epoch['val_ndcg10']:.4f} | "
            f"{_cell(full['model'])} | {_cell(full['recurrent'])} | {_cell(sampled['model'])} | "
            f"{_cell(sampled['recurrent'])} | {_cell(full['item-knn'])} | {_cell(sampled['item-knn'])} | "
            f"{r['training']['seconds']:.0f} |"
        )
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    from bench.synth_log import generate, log_stats, write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "side_synth")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--parallel", type=int, default=2, help="training runs at a time (default: 2)")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "side_synth", help="log and artifacts")
    p.add_argument("--train-args", default="", help="more `train` flags for every run, one string")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "log.parquet"
    columns = generate(**LOG, seed=0)  # type: ignore[arg-type]
    write(columns, data)
    stats = log_stats(columns, LOG["items"])
    extra = args.train_args.split()
    jobs = [(seed, side) for seed in args.seeds for side in (False, True)]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [
            pool.submit(train, data, args.work / f"{'side' if side else 'plain'}-s{seed}", seed, side, extra)
            for seed, side in jobs
        ]
        runs = []
        for (seed, side), future in zip(jobs, futures, strict=True):
            runs.append(future.result())
            print(f"seed {seed} side {side}: {runs[-1]['wall_seconds']} s", file=sys.stderr, flush=True)
    shown = sys.argv[1:] if argv is None else argv
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"log": LOG, "log_stats": stats, "argv": shown, "runs": runs}, indent=2) + "\n",
        encoding="utf-8",
    )
    args.out.with_suffix(".md").write_text(markdown(runs, shown, stats), encoding="utf-8")
    print(args.out.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
