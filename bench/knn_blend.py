"""The `--knn-blend` mixture on an existing artifact: beta chosen on validation, then every beta on the test split.

    python bench/knn_blend.py --artifact artifacts/toys --data ../shared/data/amazon_toys.csv

For each beta in 0, 0.1, .., 1 it scores (1 - beta) x the artifact's model + beta x item-kNN (the graph's
top-100-neighbour table, training/knn_blend.py) on the validation split (kNN fitted on the training events)
and on the test split under the full and the sampled protocols (kNN fitted on training + validation events,
as the report's baselines are). The beta it reports is the validation choice; the test rows of the other
betas show how flat the optimum is, and are not used to choose.

The artifact's model is usually a refitted one, which has trained on the validation events: on validation it
looks better than it is, so the chosen beta leans toward the model (less kNN) than a choice made before the
refit (what `train --knn-blend auto` does). The test figure of that choice is honest, if anything pessimistic.

Writes bench/results/knn_blend_<name>.{json,md,png}.
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

RESULTS = ROOT / "bench" / "results"


def run(
    artifact: Path, data: Path, action_col: str, threads: int, given: float | None = None
) -> dict[str, Any]:
    import torch

    from app.manifest import read_manifest
    from training.checkpoint import load_checkpoint
    from training.config import EVAL_SEED, DataOptions
    from training.ensemble import recurrent
    from training.knn_blend import KnnPrior, choose_beta
    from training.pipeline import prepare
    from training.protocols import sample_negatives
    from training.vocab import Vocabulary

    if threads:
        torch.set_num_threads(threads)
    started, load = time.perf_counter(), os.getloadavg()
    manifest = read_manifest(artifact)
    model, _ = load_checkpoint(artifact)
    model = recurrent(model)  # a blended artifact: its own model (the bench mixes the kNN in itself)
    window, vocab_size = manifest.window, manifest.vocab_size
    _, split, _ = prepare(DataOptions(path=data, action_cols=(action_col,)), Vocabulary(manifest.vocabulary))
    val = split.cases("validation")
    prior = KnnPrior.fit(split.train_sequences(), vocab_size, window)
    beta, _, val_table = choose_beta(model, prior, split, val, "ndcg@10")
    if given is not None:
        beta = given
    final = split.with_validation_as_training()
    test = final.cases("test")
    prior = KnnPrior.fit(final.train_sequences(), vocab_size, window)
    _, _, full = choose_beta(model, prior, final, test, "ndcg@10")
    negatives = sample_negatives(final, test, vocab_size, 100, EVAL_SEED)  # the report's sampled protocol
    _, _, sampled = choose_beta(model, prior, final, test, "ndcg@10", negatives)
    reported = manifest.metrics
    return {
        "artifact": str(artifact),
        "data": str(data),
        "vocabulary": vocab_size,
        "validation_cases": len(val),
        "test_cases": len(test),
        "beta": beta,
        "beta_given": given is not None,
        "validation": val_table,
        "test_full": full,
        "test_sampled": sampled,
        "report": {
            p: {s: {m: reported[p][s][m] for m in ("hr@10", "ndcg@10")} for s in reported[p]}
            for p in ("full", "sampled")
            if p in reported
        },
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(result: dict[str, Any], argv: list[str]) -> str:
    beta, rep = result["beta"], result["report"]

    def ref(protocol: str, scorer: str) -> str:
        m = rep.get(protocol, {}).get(scorer)
        return f"{m['hr@10']:.4f} / {m['ndcg@10']:.4f}" if m else "-"

    lines = [
        f"# kNN blend: {Path(result['data']).name}",
        "",
        f"`python bench/knn_blend.py {' '.join(argv)}`",
        "",
        (
            f"- artifact `{result['artifact']}`, vocabulary {result['vocabulary']:,}; validation cases "
            f"{result['validation_cases']:,}, test cases {result['test_cases']:,}; {result['seconds']} s, load "
            f"average {result['load_average_before'][0]} -> {result['load_average_after'][0]}"
        ),
        (
            f"- beta given on the command line: **{beta:g}** (the validation rows below are this artifact's "
            "model's, not what chose it)"
            if result["beta_given"]
            else f"- beta chosen on validation NDCG@10: **{beta:g}**"
        ),
        (
            f"- the artifact's report, full: model {ref('full', 'model')}, item-kNN {ref('full', 'item-knn')}; "
            f"sampled: model {ref('sampled', 'model')}, item-kNN {ref('sampled', 'item-knn')} (HR@10 / NDCG@10)"
        ),
        "",
        (
            "| beta | val HR@10 | val NDCG@10 | test full HR@10 | test full NDCG@10 | test sampled HR@10 | "
            "test sampled NDCG@10 |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, f, s in zip(result["validation"], result["test_full"], result["test_sampled"], strict=True):
        mark = "**" if v["beta"] == beta else ""
        lines.append(
            f"| {mark}{v['beta']:g}{mark} | {v['hr@10']:.4f} | {v['ndcg@10']:.4f} | {f['hr@10']:.4f} | "
            f"{f['ndcg@10']:.4f} | {s['hr@10']:.4f} | {s['ndcg@10']:.4f} |"
        )
    lines += [
        "",
        (
            "beta 0 is the artifact's model alone; beta 1 is item-kNN alone as the graph holds it (each action's "
            "100 most similar actions), so it can differ slightly from the report's item-kNN, which keeps every "
            "neighbour."
        ),
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    betas = [r["beta"] for r in result["validation"]]
    if not result[
        "beta_given"
    ]:  # a given beta came from elsewhere: this artifact's validation did not choose
        ax.plot(betas, [r["ndcg@10"] for r in result["validation"]], marker="o", label="validation")
    ax.plot(betas, [r["ndcg@10"] for r in result["test_full"]], marker="o", label="test")
    how = "given" if result["beta_given"] else "chosen"
    ax.axvline(result["beta"], color="grey", linestyle=":", label=f"{how} beta {result['beta']:g}")
    ax.set(xlabel="beta (share of item-kNN)", ylabel="NDCG@10 (full ranking)", title="kNN blend")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact directory with checkpoint.pt")
    parser.add_argument("--data", type=Path, required=True, help="the event log the artifact was trained on")
    parser.add_argument("--action-col", default="item_id")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="report this beta instead of the validation choice (e.g. the one `train --no-refit --knn-blend "
        "auto` chose with the same seed: a refitted model has trained on the validation events)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/knn_blend_<data name>")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.beta is not None and not 0 <= args.beta <= 1:
        parser.error(f"--beta {args.beta}: expected a number within [0, 1]")
    result = run(args.artifact, args.data, args.action_col, args.threads, args.beta)
    out = args.out or RESULTS / f"knn_blend_{args.data.stem}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result, argv), encoding="utf-8")
    plot(result, out.with_suffix(".png"))
    chosen = result["test_full"][[r["beta"] for r in result["test_full"]].index(result["beta"])]
    print(json.dumps({"beta": result["beta"], "test_full": chosen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
