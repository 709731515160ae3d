"""Training speed on CPU: training events per second, epoch by epoch, on the full Amazon Beauty log.

    python bench/train_speed.py                      # default model and batch, 2 epochs, torch's threads
    python bench/train_speed.py --threads 1 2        # compare thread counts (one run each)
    python bench/train_speed.py --epochs 3 --data ../shared/data/amazon_beauty.csv
    python bench/train_speed.py --set loss=sampled embedding_dim=64 hidden_dim=64 tied=true   # any config field

Writes bench/results/train_speed.json and bench/results/train_speed.md. An "event" is one training target
(cross-entropy at every position), so events/s = targets per second of the training loop alone; validation
time is reported separately. The machine's load average is recorded before and after: on a shared machine
the numbers move with what else runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "amazon_beauty.csv"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_settings(pairs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`field=value` pairs -> (ModelConfig overrides, TrainConfig overrides); values parsed as JSON if they can be."""
    from training.config import ModelConfig, TrainConfig

    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if key in model_fields:
            model[key] = value
        elif key in train_fields:
            train[key] = value
        else:
            raise SystemExit(f"--set {pair}: {key!r} is no ModelConfig or TrainConfig field")
    return model, train


def run_once(
    data: Path,
    action_col: str,
    epochs: int,
    threads: int,
    model_args: dict[str, Any],
    train_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `epochs` epochs (no early stop) and return per-epoch speed."""
    import torch

    from training.config import DataOptions, ModelConfig, TrainConfig
    from training.pipeline import prepare
    from training.train import fit

    _, split, vocabulary = prepare(DataOptions(path=data, action_cols=(action_col,)))
    model_config = ModelConfig(vocab_size=len(vocabulary), **model_args)
    config = TrainConfig(
        **{"epochs": epochs, "patience": epochs + 1, "quiet": True, "threads": threads, **(train_args or {})}
    )
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = fit(split, model_config, config)
    wall = time.perf_counter() - started
    return {
        "threads": torch.get_num_threads(),
        "model": dataclasses.asdict(model_config),
        "train": {k: v for k, v in dataclasses.asdict(config).items() if k in (train_args or {})},
        "batch_size": result.batch_size,
        "epochs": [
            {
                "epoch": e.epoch,
                "events": e.events,
                "train_seconds": round(e.seconds, 2),
                "events_per_second": round(e.events_per_second, 1),
            }
            for e in result.epochs
        ],
        "events_per_second": round(result.events_per_second, 1),
        "wall_seconds_with_validation": round(wall, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Training speed on CPU (full Amazon Beauty)",
        "",
        f"`python bench/train_speed.py {' '.join(report['argv'])}`".replace("  ", " "),
        "",
        f"- data: `{report['data']}`; CPU: {report['cpu']} ({report['cores']} cores); torch {report['torch']}",
        "- events/s = training targets per second of the training loop (validation excluded)",
        "",
        "| threads | model | batch | epoch | events | train s | events/s | load avg before -> after |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in report["runs"]:
        m = run["model"]
        shape = f"{m['cell']} E{m['embedding_dim']} H{m['hidden_dim']} V{m['vocab_size']}"
        shape += "".join(f" {k}={v}" for k, v in {**run.get("train", {})}.items())
        shape += " tied" if m.get("tied") else ""
        load = f"{run['load_average_before'][0]} -> {run['load_average_after'][0]}"
        for e in run["epochs"]:
            lines.append(
                f"| {run['threads']} | {shape} | {run['batch_size']} | {e['epoch']} | {e['events']:,} | "
                f"{e['train_seconds']} | {e['events_per_second']:,.0f} | {load} |"
            )
    lines += [
        "",
        "Mean over epochs: "
        + ", ".join(
            f"{r['threads']} thread(s) {r['events_per_second']:,.0f} events/s" for r in report["runs"]
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"default: {DEFAULT_DATA}")
    parser.add_argument("--action-col", default="item_id")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="0: torch's default")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="ModelConfig/TrainConfig overrides"
    )
    args = parser.parse_args(argv)

    import torch

    from training.config import ModelConfig

    defaults = ModelConfig(vocab_size=3)
    model_args = {k: v for k, v in dataclasses.asdict(defaults).items() if k != "vocab_size"}
    model_set, train_set = parse_settings(args.set)
    model_args |= model_set
    runs = [run_once(args.data, args.action_col, args.epochs, t, model_args, train_set) for t in args.threads]
    report = {
        "argv": sys.argv[1:] if argv is None else argv,
        "data": str(args.data),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(json.dumps({r["threads"]: r["events_per_second"] for r in runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
