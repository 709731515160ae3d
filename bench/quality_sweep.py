"""Short training runs of several configurations on several data sets, scored on the validation split.

    python bench/quality_sweep.py --data amazon_beauty movielens_100k --epochs 8 \
        --config base: --config s64:loss=sampled,embedding_dim=64,hidden_dim=64,tied=true

Each --config is NAME:field=value,... (ModelConfig/TrainConfig fields, values as JSON where they parse).
Data names are files in --data-dir (../shared/data) (item_id as the action; the Taobao sample uses item_id too).
Writes bench/results/quality_sweep.{json,md}: per data set and configuration the best validation HR@10 and
NDCG@10 (full ranking, the early-stopping metric), the epoch it came at, and training seconds. This is the
cheap comparison used to choose defaults (docs/model-quality.md); test figures come from `python -m training
train` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.train_speed import parse_settings

RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
FILES = {
    "amazon_beauty": "amazon_beauty.csv",
    "amazon_sports": "amazon_sports.csv",
    "amazon_toys": "amazon_toys.csv",
    "movielens_100k": "movielens_100k.csv",
    "taobao": "taobao_user_behavior_sample.csv",
}


_BASELINES: dict[str, dict[str, dict[str, float]]] = {}  # per data set: computed once per process


def run(name: str, settings: list[str], data: str, epochs: int, data_dir: Path = DATA) -> dict[str, Any]:
    from training.config import DataOptions, ModelConfig, TrainConfig
    from training.pipeline import prepare, validation_baselines
    from training.train import fit

    _, split, vocabulary = prepare(DataOptions(path=data_dir / FILES[data], action_cols=("item_id",)))
    model_set, train_set = parse_settings(settings)
    model_config = ModelConfig(vocab_size=len(vocabulary), **model_set)
    config = TrainConfig(**{"epochs": epochs, "patience": epochs, "quiet": True, **train_set})
    started = time.perf_counter()
    result = fit(split, model_config, config)
    best = result.epochs[result.best_epoch - 1]
    if data not in _BASELINES:
        _BASELINES[data] = {
            k: {"hr@10": round(v["hr@10"], 4), "ndcg@10": round(v["ndcg@10"], 4)}
            for k, v in validation_baselines(split, len(vocabulary), model_config.window).items()
        }
    return {
        "data": data,
        "config": name,
        "settings": settings,
        "epochs_run": len(result.epochs),
        "best_epoch": result.best_epoch,
        "val_hr10": round(best.val_hr10, 4),
        "val_ndcg10": round(best.val_ndcg10, 4),
        "curve_ndcg10": [round(e.val_ndcg10, 4) for e in result.epochs],
        "train_seconds": round(sum(e.seconds for e in result.epochs), 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "events_per_second": round(result.events_per_second, 1),
        "load_average": round(os.getloadavg()[0], 2),
        "baselines": _BASELINES[data],
    }


def markdown(rows: list[dict[str, Any]], argv: list[str]) -> str:
    lines = [
        "# Short runs, validation split (full ranking)",
        "",
        "`python bench/quality_sweep.py " + " ".join(argv) + "`",
        "",
        "| data | config | epochs | best | val HR@10 | val NDCG@10 | best baseline HR@10 / NDCG@10 | train s | events/s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        best = max(r["baselines"].items(), key=lambda kv: kv[1]["ndcg@10"])
        lines.append(
            f"| {r['data']} | {r['config']} | {r['epochs_run']} | {r['best_epoch']} | {r['val_hr10']:.4f} | "
            f"{r['val_ndcg10']:.4f} | {best[0]} {best[1]['hr@10']:.4f} / {best[1]['ndcg@10']:.4f} | "
            f"{r['train_seconds']} | {r['events_per_second']:,.0f} |"
        )
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=sorted(FILES), default=["amazon_beauty"])
    parser.add_argument("--config", action="append", required=True, help="NAME:field=value,...")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--data-dir", type=Path, default=DATA, help=f"default: {DATA}")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_sweep")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    out_json = args.out.with_suffix(".json")
    for data in args.data:
        for spec in args.config:
            name, _, rest = spec.partition(":")
            row = run(name, [p for p in rest.split(",") if p], data, args.epochs, args.data_dir)
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("data", "config", "val_hr10", "val_ndcg10", "wall_seconds")})
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
            args.out.with_suffix(".md").write_text(
                markdown(rows, sys.argv[1:] if argv is None else argv), encoding="utf-8"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
