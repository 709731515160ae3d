"""A third part for the kNN blend, measured before it is built: the window's own recent actions.

    python bench/recent_blend.py --selected artifacts/tb-fr-sel-s0 --refit artifacts/tb-fr-s0 \
        --data ../shared/data/taobao_user_behavior_sample.csv --out bench/results/recent_blend_taobao_seed0

    p = (1 - a - b) * p_model + a * p_item-knn + b * p_recent

p_recent scores each action in the case's window by the sum of decay ** age over its occurrences, the last
event left out (age 0: on logs of repeated views the target is a recent action, never the last one;
bench/repeats.py), divided by the row's sum (a row with nothing to score adds nothing). (a, b) is chosen on
the validation split, by full-ranking NDCG@10, with `--selected` (an artifact trained with `--no-refit`: the
model selected before the refit) and item-kNN fitted on the training events; the chosen (a, b) is then scored
on the test split with `--refit` (the same flags and seed with the refit) and item-kNN fitted on training +
validation events, as `train --knn-blend auto` does for beta alone. b = 0 is today's blend; the test grid is
written for flatness only, never to choose.

Writes <out>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import RESULTS, write_json
from bench.repeats import recent_views

GRID = [(round(0.1 * a, 1), round(0.1 * b, 1)) for a in range(11) for b in range(11) if a + b <= 10]


def parts(artifact: Path, split: Any, cases: Any, decay: float) -> tuple[np.ndarray, ...]:
    """(p_model, p_knn, p_recent, targets) for `cases`, each (N, V) but targets (N,)."""
    import torch

    from training.checkpoint import load_checkpoint
    from training.dataset import history_arrays
    from training.ensemble import recurrent
    from training.knn_blend import KnnPrior

    model, vocabulary = load_checkpoint(artifact)
    model = recurrent(model)
    window, vocab_size = model.config.window, len(vocabulary)
    prior = KnnPrior.fit(split.train_sequences(), vocab_size, window)
    ids, lengths = history_arrays(split, cases.users, cases.positions, window)
    with torch.inference_mode():
        ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
        pm = model(ids_t, lengths_t).double().numpy()  # (N, V)
        pk = prior(ids_t, lengths_t).double().numpy()  # (N, V)
    recent = recent_views(vocab_size, window, decay, skip_last=True)
    pr = recent([row[:n] for row, n in zip(ids, lengths, strict=True)])  # (N, V)
    total = pr.sum(axis=1, keepdims=True)
    pr = np.divide(pr, total, out=np.zeros_like(pr), where=total > 0)
    return pm, pk, pr, cases.targets


def score(
    pm: np.ndarray, pk: np.ndarray, pr: np.ndarray, targets: np.ndarray, a: float, b: float, cand: Any = None
) -> dict[str, float]:
    """HR@10 and NDCG@10 of the mixture; ties count against it; `cand` = (candidates, valid) sampled."""
    from app.manifest import UNK_ID

    mixed = (1.0 - a - b) * pm + a * pk + b * pr  # (N, V)
    mixed[:, : UNK_ID + 1] = -np.inf
    if cand is None:
        target = mixed[np.arange(len(targets)), np.maximum(targets, 0)]  # (N,)
        rank = (mixed >= target[:, None]).sum(axis=1) - 1  # (N,)
    else:
        picked = np.take_along_axis(mixed, cand[0], axis=1)  # (N, 1 + n) the target first
        rank = ((picked >= picked[:, :1]) & cand[1]).sum(axis=1) - 1
    hit = (targets > UNK_ID) & (rank < 10)
    n = max(len(targets), 1)
    return {
        "hr@10": float(hit.sum()) / n,
        "ndcg@10": float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).sum()) / n,
    }


def sampled_ceiling(
    pm: np.ndarray,
    pk: np.ndarray,
    pr: np.ndarray,
    targets: np.ndarray,
    cand: Any,
    a: float,
    b: float,
    scan_grid: bool = False,
) -> dict[str, Any]:
    """How far any scorer can get past item-kNN under the sampled protocol on this test split.

    A target `<unk>` (first seen after the training events) is a miss for every scorer. Item-kNN scores
    the negatives outside its neighbourhoods 0, so every target it scores above 0 is at rank 1 of 101:
    where it hits, nothing can hit higher, and only a known target item-kNN misses can put another scorer
    ahead of it. Those targets are listed with their rank under each scorer. `scan_grid` also scores every
    mixture on a 0.01 grid of (a, b), to bound what mixing these parts can do (it chooses nothing)."""
    from app.manifest import UNK_ID

    known = targets > UNK_ID
    ids, valid = cand
    usable = valid & (ids > UNK_ID)

    def on_candidates(p: np.ndarray) -> np.ndarray:  # (N, 1 + n): the target first; pad and <unk> never win
        # -1 below every probability, and any mixture of the parts' -1s stays -1 (no -inf * 0)
        return np.where(usable, np.take_along_axis(p, ids, axis=1), -1.0)

    def ranks(picked: np.ndarray) -> np.ndarray:
        return ((picked >= picked[:, :1]) & valid).sum(axis=1) - 1

    cm, ck, cr = on_candidates(pm), on_candidates(pk), on_candidates(pr)
    knn, blend = ranks(ck), ranks((1.0 - a - b) * cm + a * ck + b * cr)
    model, recent = ranks(cm), ranks(cr)
    missed = np.flatnonzero(known & (knn >= 10))
    knn_hits = int((known & (knn < 10)).sum())
    result: dict[str, Any] = {
        "cases": len(targets),
        "known_targets": int(known.sum()),
        "item_knn_hits": knn_hits,
        "item_knn_hits_at_rank_1": int((known & (knn == 0)).sum()),
        "hr@10_ceiling": float(known.sum()) / max(len(targets), 1),
        "item_knn_misses": [
            {"case": int(i), "model": int(model[i]), "recent": int(recent[i]), "blend": int(blend[i])}
            for i in missed
        ],
    }
    if scan_grid:
        best = {int(i): 10**9 for i in missed}
        ahead: list[tuple[float, float]] = []
        grid = 0
        for i in range(101):
            for j in range(101 - i):
                fa, fb = i / 100, j / 100
                r = ranks((1.0 - fa - fb) * cm + fa * ck + fb * cr)
                grid += 1
                best = {c: min(v, int(r[c])) for c, v in best.items()}
                if int((known & (r < 10)).sum()) > knn_hits:
                    ahead.append((fa, fb))
        result |= {
            "grid_mixtures": grid,
            "grid_best_rank_of_misses": {str(c): v + 1 for c, v in best.items()},
            "grid_ahead_on_hr@10": len(ahead),
            "grid_ahead_model_share_max": round(max((1.0 - fa - fb for fa, fb in ahead), default=0.0), 2),
            "grid_ahead_knn_share_min": round(min((fa for fa, _ in ahead), default=0.0), 2),
        }
    return result


def run(
    selected: Path,
    refit: Path,
    data: Path,
    action_col: str,
    decay: float,
    threads: int,
    scan_grid: bool = False,
) -> dict[str, Any]:
    import torch

    from app.manifest import read_manifest
    from training.config import EVAL_SEED, DataOptions
    from training.pipeline import prepare
    from training.protocols import sample_negatives
    from training.vocab import Vocabulary

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    manifest = read_manifest(refit)
    _, split, _ = prepare(DataOptions(path=data, action_cols=(action_col,)), Vocabulary(manifest.vocabulary))
    val = split.cases("validation")
    pm, pk, pr, targets = parts(selected, split, val, decay)
    validation = [{"a": a, "b": b, **score(pm, pk, pr, targets, a, b)} for a, b in GRID]
    best = max(validation, key=lambda r: (r["ndcg@10"], -(r["a"] + r["b"]), -r["b"]))
    today = max((r for r in validation if r["b"] == 0), key=lambda r: (r["ndcg@10"], -r["a"]))
    final = split.with_validation_as_training()
    test = final.cases("test")
    pm, pk, pr, targets = parts(refit, final, test, decay)
    cand = sample_negatives(final, test, len(manifest.vocabulary), 100, EVAL_SEED)

    def both(a: float, b: float) -> dict[str, Any]:
        return {"full": score(pm, pk, pr, targets, a, b), "sampled": score(pm, pk, pr, targets, a, b, cand)}

    return {
        "selected": str(selected),
        "refit": str(refit),
        "data": str(data),
        "decay": decay,
        "validation_cases": len(val),
        "test_cases": len(test),
        "chosen": {"a": best["a"], "b": best["b"], "validation": best, "test": both(best["a"], best["b"])},
        "today": {"a": today["a"], "b": 0.0, "validation": today, "test": both(today["a"], 0.0)},
        "item_knn": both(1.0, 0.0),
        "recent_alone": both(0.0, 1.0),
        "model_alone": both(0.0, 0.0),
        "sampled_ceiling": sampled_ceiling(pm, pk, pr, targets, cand, best["a"], best["b"], scan_grid),
        "validation": validation,
        "test_full": [{"a": a, "b": b, **score(pm, pk, pr, targets, a, b)} for a, b in GRID],
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict[str, Any], argv: list[str]) -> str:
    def cell(m: dict[str, float]) -> str:
        return f"{m['hr@10']:.4f} / {m['ndcg@10']:.4f}"

    chosen, today = result["chosen"], result["today"]
    rows = [
        (
            f"**chosen on validation: a {chosen['a']:g}, b {chosen['b']:g}**",
            chosen["validation"],
            chosen["test"],
        ),
        (f"today's blend (b = 0): a {today['a']:g}", today["validation"], today["test"]),
        ("item-kNN (a = 1)", None, result["item_knn"]),
        ("recent views alone (b = 1)", None, result["recent_alone"]),
        ("the model alone", None, result["model_alone"]),
    ]
    lines = [
        f"# Model + item-kNN + recent views: {Path(result['data']).name}",
        "",
        f"`python bench/recent_blend.py {' '.join(argv)}`",
        "",
        (
            f"- selected `{result['selected']}`, refit `{result['refit']}`, decay {result['decay']:g}; "
            f"validation cases {result['validation_cases']}, test cases {result['test_cases']}; "
            f"{result['seconds']} s"
        ),
        "",
        "| mixture | validation full | test full | test sampled |",
        "|---|---|---|---|",
    ]
    for label, v, t in rows:
        lines.append(f"| {label} | {cell(v) if v else '-'} | {cell(t['full'])} | {cell(t['sampled'])} |")
    lines += ["", "HR@10 / NDCG@10; a = item-kNN's share, b = recent views' share; ties count against.", ""]
    ceiling = result.get("sampled_ceiling")
    if ceiling:
        misses = ceiling["item_knn_misses"]
        lines += [
            "The sampled protocol's ceiling on this test split (100 uniform negatives; ranks of 101, 1 = first):",
            "",
            (
                f"- test cases {ceiling['cases']}, of which known targets {ceiling['known_targets']} (the rest are "
                f"`<unk>`, a miss for every scorer): HR@10 can reach {ceiling['hr@10_ceiling']:.4f} at most"
            ),
            (
                f"- item-kNN hits {ceiling['item_knn_hits']}, {ceiling['item_knn_hits_at_rank_1']} of them at "
                "rank 1: where it hits at rank 1, no scorer can do better on HR@10 or NDCG@10"
            ),
            f"- known targets item-kNN misses: {len(misses)}, the only cases where another scorer could get "
            "ahead of it; their ranks: "
            + (
                "; ".join(
                    f"case {m['case']}: model alone {m['model'] + 1}, recent views {m['recent'] + 1}, "
                    f"the chosen mixture {m['blend'] + 1}"
                    for m in misses
                )
                or "none"
            ),
            "",
        ]
        if "grid_mixtures" in ceiling:
            lines[-1:-1] = [
                (
                    f"- every mixture on a 0.01 grid of (a, b) ({ceiling['grid_mixtures']:,}; chosen by nothing, scanned "
                    "only to bound what mixing can do): best rank each of those targets gets, "
                    + (
                        ", ".join(f"case {c}: {r}" for c, r in ceiling["grid_best_rank_of_misses"].items())
                        or "none"
                    )
                    + f"; mixtures ahead of item-kNN on sampled HR@10: {ceiling['grid_ahead_on_hr@10']:,}"
                    + (
                        f" (the model's share at most {ceiling['grid_ahead_model_share_max']:g}, item-kNN's at "
                        f"least {ceiling['grid_ahead_knn_share_min']:g})"
                        if ceiling["grid_ahead_on_hr@10"]
                        else ""
                    )
                ),
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selected", type=Path, required=True, help="artifact trained with --no-refit")
    parser.add_argument("--refit", type=Path, required=True, help="artifact of the same flags with the refit")
    parser.add_argument("--data", type=Path, required=True, help="the event log both were trained on")
    parser.add_argument("--action-col", default="item_id")
    parser.add_argument("--decay", type=float, default=0.5, help="recent views: weight per step of age")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--scan-grid",
        action="store_true",
        help="also score every mixture on a 0.01 grid under the sampled protocol (bounds what mixing can do)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/recent_blend_<data>")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    result = run(
        args.selected, args.refit, args.data, args.action_col, args.decay, args.threads, args.scan_grid
    )
    out = args.out or RESULTS / f"recent_blend_{args.data.stem}"
    write_json(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(markdown(result, argv), encoding="utf-8")
    print(json.dumps({k: result[k]["test"] for k in ("chosen", "today")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
