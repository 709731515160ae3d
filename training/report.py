"""report.md and its plots: what was trained on, how training went, the model against both baselines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from app.manifest import REPORT_FILE, UNK_ID, Manifest
from training.metrics import KS
from training.protocols import Evaluation
from training.train import EpochLog

if TYPE_CHECKING:
    from training.members import Fitted
    from training.presets import AutoChoice
    from training.tune import TuneResult

LOSS_PLOT = "loss.png"
HR_PLOT = "val_hr10.png"
SCORERS = ("model", "recurrent", "popularity", "markov", "item-knn")  # recurrent: a --knn-blend's own model
PROTOCOL_NOTES = {
    "full": "the target ranked among all actions",
    "full-exclude-history": "the target ranked among all actions except those in the user's window (the "
    "target itself stays a candidate)",
    "sampled": "the target ranked against {negatives:.4g} actions on average that the user never interacted "
    "with, drawn uniformly (fixed seed)",
}


def plot_curves(
    epochs: Sequence[EpochLog], out_dir: Path, baselines: Mapping[str, Mapping[str, float]] | None = None
) -> tuple[Path, Path]:
    """loss.png (training and validation loss per epoch) and val_hr10.png (validation HR@10 and NDCG@10 per
    epoch, with the baselines' validation values as dashed lines when given)."""
    baselines = baselines or {}
    x = [e.epoch for e in epochs]
    fig = Figure(figsize=(6, 3.6), dpi=100)  # no pyplot: no global state, no display backend
    ax = fig.add_subplot()
    ax.plot(x, [e.train_loss for e in epochs], marker="o", label="training")
    ax.plot(x, [e.val_loss for e in epochs], marker="o", label="validation")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    loss_path = out_dir / LOSS_PLOT
    fig.savefig(loss_path)

    fig = Figure(figsize=(10, 3.6), dpi=100)
    for i, (key, label, values) in enumerate(
        (
            ("hr@10", "HR@10", [e.val_hr10 for e in epochs]),
            ("ndcg@10", "NDCG@10", [e.val_ndcg10 for e in epochs]),
        )
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(x, values, marker="o", color="tab:green", label="model")
        for (name, metrics), color in zip(
            baselines.items(), ("tab:gray", "tab:red", "tab:purple"), strict=False
        ):
            if key in metrics:
                ax.axhline(metrics[key], linestyle="--", color=color, label=f"{name} {metrics[key]:.4f}")
        protocol = epochs[0].protocol if epochs else "full"
        ranking = "full ranking" if protocol == "full" else f"{protocol} protocol"
        ax.set(xlabel="epoch", ylabel=label, title=f"Validation {label} per epoch ({ranking})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    hr_path = out_dir / HR_PLOT
    fig.savefig(hr_path)
    return loss_path, hr_path


def _ensemble_section(fitted: Fitted, epochs: Sequence[EpochLog]) -> list[str]:
    """Each member's selection run and validation figures, and the ensemble's (the members' mean)."""
    protocol = epochs[0].protocol if epochs else "full"
    ens = fitted.ensemble_validation
    rows = [
        f"| {i + 1} | {m.seed} | {m.epochs_run} | {m.best_epoch} | {m.val_hr10:.4f} | {m.val_ndcg10:.4f} | "
        f"{m.refit_epochs} | {m.seconds:.0f} |"
        for i, m in enumerate(fitted.members)
    ]
    return [
        "## Ensemble",
        "",
        (
            f"{len(fitted.members)} members of this configuration, seeds {fitted.members[0].seed} to "
            f"{fitted.members[-1].seed}, each with its own early stopping and refit. model.onnx returns the "
            "mean of their probabilities; step.onnx carries their states side by side. The training line "
            "above and the curves below are the first member's; the time and speed cover every member."
        ),
        "",
        (
            f"Validation figures ({protocol} protocol) of each member's best epoch, and of the selected members "
            "averaged:"
        ),
        "",
        "| member | seed | epochs | best epoch | val HR@10 | val NDCG@10 | refit epochs | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        (
            f"| ensemble | | | | {ens.get('hr@10', float('nan')):.4f} | {ens.get('ndcg@10', float('nan')):.4f} "
            f"| | {fitted.seconds:.0f} |"
        ),
        "",
    ]


def _tuning_section(tuning: TuneResult, out_dir: Path) -> list[str]:
    from training.tuning_report import tuning_section  # optuna is imported only for tuned runs

    return tuning_section(tuning, out_dir)


def _metrics_table(per_scorer: dict[str, dict[str, float]]) -> list[str]:
    names = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in KS] + ["accuracy", "macro_f1"]
    scorers = [s for s in SCORERS if s in per_scorer]
    lines = [
        "| metric | " + " | ".join(scorers) + " | model - best baseline |",
        "|---|" + "---:|" * (len(scorers) + 1),
    ]
    for name in names:
        values = [per_scorer[s].get(name, float("nan")) for s in scorers]
        base = [v for s, v in zip(scorers, values, strict=True) if s not in ("model", "recurrent")]
        delta = per_scorer.get("model", {}).get(name, float("nan")) - max(base, default=float("nan"))
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {delta:+.4f} |")
    return lines


def small_vocabulary_note(
    protocol: str, vocab_size: int, mean_negatives: float | None, negatives: int
) -> str:
    """What a protocol's figures cannot mean on a log with few actions (e.g. 4 behaviours), or ''.

    With A actions, HR@k is 1 for every scorer once k >= A: every candidate is in the top k. The sampled
    protocol draws from the actions each user never did: with fewer than `negatives` of them, each case ranks
    the target against the few there are, so its figures are not those of the usual 100-negative protocol."""
    actions = vocab_size - (UNK_ID + 1)
    note = ""
    if protocol == "sampled" and mean_negatives is not None and mean_negatives < negatives:
        note += (
            f" Only {mean_negatives:.4g} negatives per case on average, not the {negatives} asked for: the log "
            f"has {actions:,} actions and its users did most of them, so these figures are not comparable with "
            "the usual sampled protocol; read the full protocol."
        )
    if actions <= max(KS):
        note += f" With {actions:,} actions, HR@k is 1 for every scorer once k >= {actions}: read HR@1, NDCG, MRR."
    return note


def _blend_section(blend: Mapping[str, Any]) -> list[str]:
    """The `--knn-blend` section: the beta (and gamma) served, how they were chosen, and each choice's
    validation figures."""
    beta, gamma = blend["beta"], blend.get("gamma", 0.0)
    if not beta and not gamma:
        served = (
            "beta = 0 was chosen, so the exported graphs are the recurrent model alone (no kNN table in them)"
        )
    elif not gamma:
        served = (
            f"model.onnx returns (1 - beta) x the recurrent model's probabilities + beta x item-kNN's, with "
            f"beta = {beta:g}"
        )
    else:
        served = (
            "model.onnx returns (1 - beta - gamma) x the recurrent model's probabilities + beta x item-kNN's + "
            "gamma x the window's recent actions' (0.5 ^ age, the last event left out), renormalised, with "
            f"beta = {beta:g} and gamma = {gamma:g}"
        )
    how = (
        f"chosen on the validation split ({blend['protocol']} protocol, {blend['metric']}) with the model "
        "selected before the refit and an item-kNN fitted on the training events"
        if blend["chosen"]
        else "auto, with no validation cases to choose it on"
        if blend.get("mode") == "auto"
        else "given on the command line"
    )
    searched = any(row.get("gamma", 0.0) for row in blend["validation"])
    repeats = blend.get("repeats", 0.0)
    lines = [
        "## kNN blend",
        "",
        (
            f"{served} ({how})."
            + (
                " The item-kNN inside the graph is fitted on every event before the test targets and keeps "
                "each action's 100 most similar actions. In the test tables, *model* is the blend and "
                "*recurrent* the recurrent model alone."
                if beta or gamma
                else ""
            )
            + (
                f" {100 * repeats:.1f}% of the validation targets repeat an earlier action of their window, so "
                "the recent views' share gamma was searched with beta."
                if searched
                else " No validation target repeats an earlier action of its window, so the recent views' "
                "share gamma stayed 0."
                if blend["chosen"]
                else ""
            )
        ),
        "",
    ]
    if blend["validation"]:
        rows = blend["validation"]
        if searched:  # the best gamma per beta, not the whole grid
            rows = [
                max((r for r in rows if r["beta"] == b), key=lambda r: (r[blend["metric"]], -r["gamma"]))
                for b in dict.fromkeys(r["beta"] for r in rows)
            ]
        lines += (
            ["| beta | best gamma | val HR@10 | val NDCG@10 |", "|---:|---:|---:|---:|"]
            if searched
            else ["| beta | val HR@10 | val NDCG@10 |", "|---:|---:|---:|"]
        )
        for row in rows:
            chosen = row["beta"] == beta and row.get("gamma", 0.0) == gamma
            mark = "**" if chosen else ""
            g = f" {row['gamma']:g} |" if searched else ""
            lines.append(f"| {mark}{row['beta']:g}{mark} |{g} {row['hr@10']:.4f} | {row['ndcg@10']:.4f} |")
        lines.append("")
    return lines


def write_report(
    out_dir: Path,
    manifest: Manifest,
    epochs: Sequence[EpochLog],
    *,
    rows_read: int,
    dropped_missing: int,
    dropped_duplicates: int,
    evaluation: Evaluation,
    min_count: int,
    export_diff: float,
    refit_epochs: int = 0,
    baseline_validation: Mapping[str, Mapping[str, float]] | None = None,
    fitted: Fitted | None = None,
    tuning: TuneResult | None = None,
    blend: Mapping[str, Any] | None = None,
    negatives: int = 100,
    configuration: AutoChoice | None = None,
    side: Mapping[str, Any] | None = None,
) -> Path:
    """Write report.md (and the two plots) into `out_dir`.

    `configuration`: what `--preset auto` chose (None: the run's options as given).

    `negatives`: the sampled protocol's requested negatives per case (`--negatives`), to say when the log has
    too few actions for it.

    `baseline_validation`: the baselines' validation metrics (fitted on the training events, like the model
    during selection), drawn as reference lines next to the model's validation curve.
    """
    base_val = dict(baseline_validation or {})
    plot_curves(epochs, out_dir, base_val)
    d, t = manifest.data, manifest.training
    lines = [
        f"# nextact model {manifest.model_version}",
        "",
        f"{manifest.cell.upper()} next-action model trained {manifest.created_at:%Y-%m-%d %H:%M UTC}.",
        "",
        "## Data",
        "",
        f"- file: `{d.file}`; action = `{':'.join(d.action_columns)}`",
        (
            f"- rows read {rows_read:,}; dropped: {dropped_missing:,} with a missing user or action, "
            f"{dropped_duplicates:,} exact duplicates; events kept {d.rows:,}"
        ),
        f"- users {d.users:,}; distinct actions {d.actions:,}; time span {d.time_start} to {d.time_end}",
        (
            f"- vocabulary {manifest.vocab_size:,} ids (0 = `<pad>`, 1 = `<unk>`, actions seen at least "
            f"{min_count}x in the training events)"
        ),
        f"- split `{t.split}`; {evaluation.cases:,} test cases",
        "",
        "## Model and training",
        "",
        *(
            [f"- configuration: `{configuration.name}`, chosen by `--preset auto` ({configuration.reason})"]
            if configuration is not None
            else []
        ),
        *(
            [
                (
                    f"- side information: column `{side['column']}`, {side['values']:,} values over "
                    f"{side['actions_covered']:,} actions (each action's embedding plus its value's; folded "
                    "into one table in the exported graphs)"
                )
            ]
            if side is not None
            else []
        ),
        (
            f"- {manifest.cell} cell, embedding {manifest.embedding_dim}, hidden {manifest.hidden_dim}, layers "
            f"{manifest.num_layers}, dropout {manifest.dropout}, window {manifest.window} (right-padded)"
        ),
        (
            f"- Adam lr {t.learning_rate}, batch {t.batch_size}, seed {t.seed}; {t.epochs_run} epochs run, best "
            f"epoch {t.best_epoch} kept; {t.seconds:.0f} s; {t.events_per_second:,.0f} training events/s"
        ),
        (
            f"- then refitted from scratch on training + validation events for {refit_epochs} epochs at the same "
            "learning rates: that model is tested and exported"
            if refit_epochs
            else "- the best epoch's model is tested and exported"
        ),
        f"- ONNX parity gate passed: max |ONNX Runtime - PyTorch| = {export_diff:.2g}",
        "",
        *(_ensemble_section(fitted, epochs) if fitted is not None and len(fitted.members) > 1 else []),
        *(_tuning_section(tuning, out_dir) if tuning is not None else []),
        *(_blend_section(blend) if blend is not None else []),
    ]
    for protocol, per_scorer in manifest.metrics.items():
        note = PROTOCOL_NOTES.get(protocol, protocol).format(negatives=evaluation.mean_negatives or 0.0)
        lines += [
            f"## Test metrics, {protocol} protocol",
            "",
            (
                f"{note.capitalize()}. Ties count against the scorer. Popularity, a first-order Markov chain "
                "and item-kNN (co-occurrence within the window, cosine-normalised, recency-weighted history; "
                "popularity breaks the ties of both) are fitted on every event before the test targets."
                + small_vocabulary_note(protocol, manifest.vocab_size, evaluation.mean_negatives, negatives)
            ),
            "",
            *_metrics_table(per_scorer),
            "",
        ]
    lines += [
        "## Training curves",
        "",
        f"![loss per epoch]({LOSS_PLOT})",
        "",
        f"![validation HR@10 and NDCG@10 per epoch]({HR_PLOT})",
        "",
        *(
            [
                f"Baselines on the same validation targets ({epochs[0].protocol if epochs else 'full'} "
                "protocol, fitted on the training events): "
                + "; ".join(
                    f"{name} HR@10 {m['hr@10']:.4f}, NDCG@10 {m['ndcg@10']:.4f}"
                    for name, m in base_val.items()
                )
                + ".",
                "",
            ]
            if base_val
            else []
        ),
        "| epoch | train loss | val loss | val HR@10 | val NDCG@10 | events/s |",
        "|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {e.epoch} | {e.train_loss:.4f} | {e.val_loss:.4f} | {e.val_hr10:.4f} | {e.val_ndcg10:.4f} | "
            f"{e.events_per_second:,.0f} |"
            for e in epochs
        ],
        "",
        "Library versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()) + ".",
        "",
    ]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
