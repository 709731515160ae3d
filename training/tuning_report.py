"""The tuning part of an artifact: tuning.json (every trial), tuning.png (metric by trial, best so far) and the
report.md section that shows both."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from training.tune import BUDGET, PRUNED, TuneResult

TUNING_PLOT = "tuning.png"
TUNING_JSON = "tuning.json"
_PARAMS = (
    "loss", "dim", "input_dropout", "dropout", "lr", "batch_size", "tied", "sampler", "residual", "negatives"
)  # fmt: skip


def plot_trials(tuning: TuneResult, path: Path) -> Path:
    """Each trial's validation metric (pruned trials hollow), and the best-so-far line."""
    fig = Figure(figsize=(6, 3.6), dpi=100)  # no pyplot: no global state, no display backend
    ax = fig.add_subplot()
    done = [t for t in tuning.trials if t.state != PRUNED]
    pruned = [t for t in tuning.trials if t.state == PRUNED]
    ax.scatter([t.number for t in done], [t.value for t in done], color="tab:blue", label="trial", zorder=3)
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.value for t in pruned],
            facecolors="none",
            edgecolors="tab:gray",
            label="pruned",
            zorder=3,
        )
    best, xs, ys = -math.inf, [], []
    for t in tuning.trials:
        if t.state != PRUNED and math.isfinite(t.value):
            best = max(best, t.value)
        if math.isfinite(best):
            xs.append(t.number)
            ys.append(best)
    ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    ax.set(
        xlabel="trial",
        ylabel=f"validation {tuning.metric}",
        title=f"Tuning: validation {tuning.metric} by trial ({tuning.protocol} protocol)",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def tuning_section(tuning: TuneResult, out_dir: Path) -> list[str]:
    """Write tuning.json and tuning.png into `out_dir`; return report.md's "Tuning" section."""
    (out_dir / TUNING_JSON).write_text(json.dumps(tuning.to_json(), indent=2) + "\n", encoding="utf-8")
    plot_trials(tuning, out_dir / TUNING_PLOT)
    best = tuning.best
    ended = (
        f"the time budget ({tuning.budget:g} s) ran out after {len(tuning.trials)} of at most "
        f"{tuning.max_trials} trials"
        if tuning.stopped == BUDGET
        else f"all {len(tuning.trials)} trials ran within the budget ({tuning.budget:g} s)"
    )
    lines = [
        "## Tuning",
        "",
        (
            f"Optuna search (TPE sampler seeded with the run's seed, median pruner on the per-epoch validation "
            f"metric), scored by validation {tuning.metric} under the {tuning.protocol} protocol (validation "
            f"split only). Its first trials are the default configuration and the presets that lie in the "
            f"search space (column *from*); the sampler draws the rest. It took {tuning.seconds:.0f} s; {ended}."
            + (
                f" The best, trial {best.number}, was then trained as usual (above) and exported."
                if best
                else ""
            )
        ),
        "",
        f"![validation {tuning.metric} by trial]({TUNING_PLOT})",
        "",
        f"Every trial is also in `{TUNING_JSON}`.",
        "",
        "| trial | from | "
        + " | ".join(_PARAMS)
        + f" | val {tuning.metric} | epochs | best epoch | seconds | state |",
        "|---:|---|" + "---:|" * len(_PARAMS) + "---:|---:|---:|---:|---|",
    ]
    for t in tuning.trials:
        cells = [_cell(t.params.get(p)) for p in _PARAMS]
        mark = "**" if best is not None and t.number == best.number else ""
        lines.append(
            f"| {mark}{t.number}{mark} | {t.origin} | "
            + " | ".join(cells)
            + f" | {t.value:.4f} | {t.epochs} | "
            f"{t.best_epoch} | {t.seconds:.1f} | {t.state} |"
        )
    return [*lines, ""]


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
