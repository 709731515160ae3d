"""Why item-kNN wins on a log of repeated views: where the targets are in the users' windows.

    python bench/repeats.py --data ../shared/data/taobao_user_behavior_sample.csv --out bench/results/repeats_taobao

On the validation split (kNN fitted on the training events) and the test split (fitted on training +
validation events, as the report's baselines are), the splits and vocabulary of `train`: how many targets are
<unk> (an action first seen after the training events: no scorer can rank it), how many known targets are in
the case's window and at which age (0: the last event), how many of item-kNN's top-10 hits were in the window,
and item-kNN against "recent views" scorers that need no training: each action in the window scored by the
sum of decay ** age over its occurrences, the last event left out (it is never the target on such logs) or
kept, under the full and the sampled protocols.

Writes <out>.{json,md}. Only the data: no model is trained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import RESULTS, write_json

AGES = ((0, 0), (1, 1), (2, 4), (5, 9), (10, 49))  # age buckets of the target's latest occurrence
RECENT = ((0.5, True), (0.8, True), (0.8, False))  # (decay, leave the last event out)


def recent_views(vocab_size: int, window: int, decay: float, skip_last: bool) -> Any:
    """A scorer: each action in the last `window` events by the sum of decay ** age of its occurrences."""
    from app.manifest import UNK_ID

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(histories), vocab_size))  # (B, V)
        for i, history in enumerate(histories):
            for age, action in enumerate(history[-window:][::-1].tolist()):
                if action > UNK_ID and not (skip_last and age == 0):
                    out[i, action] += decay**age
        return out

    return score


def part_figures(split: Any, part: str, vocab_size: int, window: int, negatives: int) -> dict[str, Any]:
    from app.manifest import UNK_ID
    from training.config import EVAL_SEED
    from training.pipeline import baseline_scorers
    from training.protocols import evaluate_cases

    cases = split.cases(part)
    knn = baseline_scorers(split, vocab_size, window)["item-knn"]
    ages: list[int] = []
    hits_in = hits_out = 0
    top_in_window = []
    for user, position, target in zip(cases.users, cases.positions, cases.targets, strict=True):
        history = split.history(user, position)
        recent = history[-window:]
        seen = np.flatnonzero(recent == target) if target > UNK_ID else np.zeros(0, dtype=np.int64)
        if len(seen):
            ages.append(len(recent) - 1 - int(seen[-1]))
        scores = knn([history])[0]  # (V,)
        scores[: UNK_ID + 1] = -np.inf
        top = np.argsort(-scores, kind="stable")[:10]
        top_in_window.append(float(np.isin(top, recent).mean()))
        if target > UNK_ID and (scores >= scores[target]).sum() - 1 < 10:  # ties count against item-kNN
            hits_in, hits_out = hits_in + bool(len(seen)), hits_out + (not len(seen))
    scorers = {"item-knn": knn}
    for decay, skip in RECENT:
        name = f"recent views, decay {decay:g}, {'last event left out' if skip else 'last event kept'}"
        scorers[name] = recent_views(vocab_size, window, decay, skip)
    evaluation = evaluate_cases(split, cases, scorers, vocab_size, ("full", "sampled"), negatives, EVAL_SEED)
    keep = ("hr@1", "hr@10", "ndcg@10")
    return {
        "cases": len(cases),
        "unknown_targets": int((cases.targets <= UNK_ID).sum()),
        "known_targets": int((cases.targets > UNK_ID).sum()),
        "known_in_window": len(ages),
        "latest_age": {
            f"{lo}-{hi}" if hi > lo else str(lo): sum(lo <= a <= hi for a in ages) for lo, hi in AGES
        },
        "item_knn_hits_at_10": {"in_window": hits_in, "not_in_window": hits_out},
        "item_knn_top10_share_in_window": round(float(np.mean(top_in_window)) if top_in_window else 0.0, 4),
        "mean_negatives": evaluation.mean_negatives,
        "metrics": {
            p: {s: {m: round(v[m], 4) for m in keep} for s, v in per.items()}
            for p, per in evaluation.metrics.items()
        },
    }


def run(data: Path, action_col: str, window: int, negatives: int) -> dict[str, Any]:
    from training.config import DataOptions
    from training.pipeline import prepare

    started = time.perf_counter()
    _, split, vocabulary = prepare(DataOptions(path=data, action_cols=(action_col,)))
    parts = {
        "validation": part_figures(split, "validation", len(vocabulary), window, negatives),
        "test": part_figures(split.with_validation_as_training(), "test", len(vocabulary), window, negatives),
    }
    return {
        "data": str(data),
        "action_col": action_col,
        "vocabulary": len(vocabulary),
        "window": window,
        **parts,
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict[str, Any], argv: list[str]) -> str:
    lines = [
        f"# Where the targets are: {Path(result['data']).name}",
        "",
        f"`python bench/repeats.py {' '.join(argv)}`",
        "",
        (
            f"- action `{result['action_col']}`, vocabulary {result['vocabulary']:,}, "
            f"window {result['window']}; {result['seconds']} s"
        ),
        "",
        "| | validation | test |",
        "|---|---:|---:|",
    ]
    val, test = result["validation"], result["test"]
    rows = [
        ("cases", "cases"),
        ("targets `<unk>` (first seen after the training events)", "unknown_targets"),
        ("known targets", "known_targets"),
        ("known targets in the window", "known_in_window"),
    ]
    lines += [f"| {label} | {val[key]:,} | {test[key]:,} |" for label, key in rows]
    lines += [
        f"| ... latest occurrence at age {bucket} | {val['latest_age'][bucket]} | {test['latest_age'][bucket]} |"
        for bucket in val["latest_age"]
    ]
    knn_in, knn_out = (
        [str(part["item_knn_hits_at_10"][key]) for part in (val, test)]
        for key in ("in_window", "not_in_window")
    )
    share = [f"{part['item_knn_top10_share_in_window']:.4f}" for part in (val, test)]
    lines += [
        "| item-kNN hits@10, target in the window | " + " | ".join(knn_in) + " |",
        "| item-kNN hits@10, target not in the window | " + " | ".join(knn_out) + " |",
        "| share of item-kNN's top 10 that are window actions | " + " | ".join(share) + " |",
        "",
        "Age 0 is the case's last event. HR@10 / NDCG@10 (HR@1), ties against the scorer:",
        "",
        "| scorer | validation full | validation sampled | test full | test sampled |",
        "|---|---|---|---|---|",
    ]
    for scorer in val["metrics"]["full"]:
        cells = [
            f"{m['hr@10']:.4f} / {m['ndcg@10']:.4f} ({m['hr@1']:.4f})"
            for m in (part["metrics"][p][scorer] for part in (val, test) for p in ("full", "sampled"))
        ]
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="event log")
    parser.add_argument("--action-col", default="item_id")
    parser.add_argument("--window", type=int, default=50, help="the model's window (default: 50)")
    parser.add_argument("--negatives", type=int, default=100, help="sampled protocol (default: 100)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/repeats_<data name>")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    result = run(args.data, args.action_col, args.window, args.negatives)
    out = args.out or RESULTS / f"repeats_{args.data.stem}"
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result, argv), encoding="utf-8")
    print(json.dumps({p: result[p]["metrics"]["full"]["item-knn"] for p in ("validation", "test")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
