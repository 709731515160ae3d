"""Command line: `python -m training train|evaluate|quantize ...` (see --help).

Both print one JSON object on stdout when they succeed; progress and logs go to stderr. A bad input stops
with one line `error: ...` naming the file, line, column or value, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from app.manifest import ManifestError, read_manifest
from training.config import DataOptions, ModelConfig, TrainConfig, TuneOptions
from training.errors import TrainingError
from training.presets import PRESETS

_M, _T, _TUNE = ModelConfig(vocab_size=3), TrainConfig(), TuneOptions()


PRESET_CHOICES = ["auto", "none", *sorted(PRESETS)]


def preset_in(argv: list[str]) -> str | None:
    """The named preset of a `train` command line whose values become the parser's defaults (None without one,
    and for auto and none); an unknown name stops like any bad option."""
    pre = argparse.ArgumentParser(prog="python -m training train", add_help=False)
    pre.add_argument("--preset", choices=PRESET_CHOICES)
    known, _ = pre.parse_known_args(argv)
    return known.preset if known.preset in PRESETS else None


def given_options(argv: list[str]) -> frozenset[str]:
    """The `train` options (argparse destinations) the command line gives, whatever their spelling (--opt=v,
    --no-opt, an unambiguous prefix): the ones `--preset auto` leaves alone."""
    parser = build_parser(None)
    unset = object()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # no public accessor
    train = sub.choices["train"]
    train.set_defaults(**{a.dest: unset for a in train._actions if a.dest != "help"})
    args = parser.parse_args(argv)
    return frozenset(k for k, v in vars(args).items() if v is not unset and k != "command")


def _add_data_options(p: argparse.ArgumentParser, *, action_default: str | None) -> None:
    g = p.add_argument_group("data options")
    g.add_argument(
        "--data",
        type=Path,
        required=True,
        help="event log: .csv, .tsv, .jsonl/.ndjson or .parquet (chosen by extension)",
    )
    g.add_argument("--user-col", default="user_id", help="user column (default: user_id)")
    g.add_argument(
        "--action-col",
        default=action_default,
        help="action column, or a comma-separated list joined with ':' into one token, e.g. "
        "behavior,category_id -> pv:4145813 (default: " + (action_default or "the artifact's") + ")",
    )
    if action_default is not None:  # train only: evaluate reads the artifact, which has no side tables
        g.add_argument(
            "--side-col",
            default=None,
            help="a column describing the action, e.g. an item's category_id: each action's embedding is "
            "its own plus its value's, so rarely seen actions share what their category learned "
            "(folded into one table at export; the service never needs the column)",
        )
        g.add_argument(
            "--side-own-scale",
            type=float,
            default=None,
            help="with --side-col: each action's own embedding starts at this fraction of its side value's, "
            "so a rarely seen action starts near its category (default: 0.3; 1: both at the same scale)",
        )
    g.add_argument(
        "--time-col",
        default=None,
        help="time column, epoch seconds or ISO-8601 (default: timestamp if present, else file order; "
        "'none': file order)",
    )
    g.add_argument(
        "--split",
        choices=["leave-one-out", "time"],
        default=None,
        help="leave-one-out: per user last event test, second-to-last validation; time: a global "
        "time cut-off (default: leave-one-out" + ("" if action_default else ", or the artifact's") + ")",
    )
    g.add_argument(
        "--val-fraction", type=float, default=0.1, help="time split: validation share of events (0.1)"
    )
    g.add_argument("--test-fraction", type=float, default=0.1, help="time split: test share of events (0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs; only the final JSON")


def _add_quality_options(m: argparse._ArgumentGroup, o: argparse._ArgumentGroup) -> None:
    """The model and loss options of docs/model-quality.md."""
    m.add_argument(
        "--input-dropout",
        type=float,
        default=_M.input_dropout,
        help="dropout on the input embeddings (default: --dropout's value); --dropout then applies to the "
        "recurrent output only",
    )
    m.add_argument(
        "--feed-forward",
        action=argparse.BooleanOptionalAction,
        default=_M.feed_forward,
        help="LayerNorm and a residual feed-forward block on the recurrent output (default: %(default)s)",
    )
    o.add_argument(
        "--loss",
        choices=["ce", "sampled", "bce"],
        default=_T.loss,
        help="ce: full softmax; sampled: softmax over the target and --loss-negatives shared negatives; "
        f"bce: one negative per position (default: {_T.loss})",
    )
    o.add_argument(
        "--loss-negatives",
        type=int,
        default=_T.loss_negatives,
        help=f"--loss sampled: negatives per batch (default: {_T.loss_negatives})",
    )
    o.add_argument(
        "--loss-sampler",
        choices=["uniform", "popularity"],
        default=_T.loss_sampler,
        help=f"--loss sampled/bce: how negatives are drawn (default: {_T.loss_sampler})",
    )
    o.add_argument(
        "--logq",
        action=argparse.BooleanOptionalAction,
        default=_T.logq,
        help="--loss sampled with --loss-sampler popularity: logQ correction (default: %(default)s)",
    )
    o.add_argument(
        "--lr-patience",
        type=int,
        default=_T.lr_patience,
        help=f"epochs without improvement before each --lr-decay (default: {_T.lr_patience})",
    )


def _add_search_options(t: argparse.ArgumentParser) -> None:
    """--protocol, --ensemble and --tune (docs/model-quality.md, Ensembles and Tuning)."""
    g = t.add_argument_group("validation, ensembles and tuning")
    g.add_argument(
        "--protocol",
        choices=["full", "sampled"],
        default=_T.val_protocol,
        help="validation ranking for early stopping and --tune: full, or sampled (the target against 100 "
        f"actions the user never touched, fixed seed) (default: {_T.val_protocol})",
    )
    g.add_argument(
        "--ensemble",
        type=int,
        default=_T.ensemble,
        metavar="K",
        help="train K models with seeds seed .. seed+K-1 and export the mean of their probabilities as one "
        f"model (default: {_T.ensemble})",
    )
    g.add_argument(
        "--tune",
        action="store_true",
        help="search loss, dimension, dropouts, lr, batch size and tying with Optuna on the validation split, "
        "then train the best configuration as usual",
    )
    g.add_argument(
        "--tune-budget",
        type=float,
        default=_TUNE.budget,
        metavar="SECONDS",
        help=f"--tune: wall-clock seconds for the search, the final training excluded (default: {_TUNE.budget:g})",
    )
    g.add_argument(
        "--tune-trials",
        type=int,
        default=_TUNE.trials,
        metavar="N",
        help=f"--tune: at most this many trials (default: {_TUNE.trials})",
    )
    g.add_argument(
        "--tune-metric",
        choices=["ndcg@10", "hr@10"],
        default=_TUNE.metric,
        help=f"--tune: validation metric the trials are scored by (default: {_TUNE.metric})",
    )
    g.add_argument(
        "--tune-space",
        default=None,
        metavar="JSON",
        help='--tune: narrow the search, e.g. \'{"dims": [32, 128], "losses": ["sampled"]}\' (keys: losses, '
        "dims, input_dropout, dropout, lr, batch_sizes, tied, samplers, residual, negatives; default: the whole "
        "space; the default configuration and the presets that lie in it are the first trials)",
    )


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `preset`, `train`'s defaults are that preset's values (see PRESETS)."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train, evaluate and export an artifact directory")
    t.add_argument("--out", type=Path, required=True, help="artifact directory to write (created if needed)")
    t.add_argument(
        "--preset",
        choices=PRESET_CHOICES,
        default="auto",
        help="start from a measured configuration (docs/model-quality.md, Presets): full-ranking or "
        "sampled-protocol; auto: full-ranking for a catalogue of >= 1,000 actions with < 30 training events "
        "per action, the defaults below with --knn-blend auto for a denser one of >= 1,000, else the "
        "defaults below; none: the defaults below. Options given beside it still win (default: auto)",
    )
    _add_data_options(t, action_default="action")
    m = t.add_argument_group("model")
    m.add_argument(
        "--model", choices=["lstm", "gru"], default=_M.cell, help=f"recurrent cell (default: {_M.cell})"
    )
    m.add_argument(
        "--window", type=int, default=_M.window, help=f"events looked back on (default: {_M.window})"
    )
    m.add_argument(
        "--embedding-dim", type=int, default=_M.embedding_dim, help=f"(default: {_M.embedding_dim})"
    )
    m.add_argument("--hidden-dim", type=int, default=_M.hidden_dim, help=f"(default: {_M.hidden_dim})")
    m.add_argument(
        "--layers", type=int, default=_M.num_layers, help=f"recurrent layers (default: {_M.num_layers})"
    )
    m.add_argument("--dropout", type=float, default=_M.dropout, help=f"(default: {_M.dropout})")
    m.add_argument(
        "--tied",
        action=argparse.BooleanOptionalAction,
        default=_M.tied,
        help="score actions with the input embedding table (default: %(default)s)",
    )
    m.add_argument(
        "--history-bias",
        action=argparse.BooleanOptionalAction,
        default=_M.history_bias,
        help="learn one score offset for actions already in the window (default: %(default)s)",
    )
    m.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=_M.residual,
        help="add a projection of the last event's embedding to the recurrent state (default: %(default)s)",
    )
    o = t.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=_T.epochs, help=f"at most this many (default: {_T.epochs})")
    o.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per batch (default: 64, fewer on small logs so an epoch has >= 20 steps)",
    )
    o.add_argument("--lr", type=float, default=_T.lr, help=f"Adam learning rate (default: {_T.lr})")
    o.add_argument(
        "--weight-decay", type=float, default=_T.weight_decay, help=f"(default: {_T.weight_decay})"
    )
    o.add_argument(
        "--clip-norm", type=float, default=_T.clip_norm, help=f"gradient norm clip (default: {_T.clip_norm})"
    )
    o.add_argument(
        "--patience",
        type=int,
        default=_T.patience,
        help=f"stop after this many epochs without validation improvement (default: {_T.patience})",
    )
    o.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=_T.refit,
        help="after early stopping, retrain from scratch on training + validation events for the best epoch "
        "count and test/export that model (default: %(default)s)",
    )
    o.add_argument(
        "--step",
        action=argparse.BooleanOptionalAction,
        default=_T.step,
        help="also write step.onnx, the single-step graph the service's NEXTACT_INCREMENTAL_STATE uses, "
        "after its own parity gate against model.onnx (default: %(default)s)",
    )
    o.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: export the output layer of model.onnx and step.onnx in int8 after the float32 gates, "
        "behind its own looser gate (docs/training.md, Int8 output layer) (default: %(default)s)",
    )
    o.add_argument(
        "--knn-blend",
        default=_T.knn_blend,
        metavar="off|auto|BETA",
        help="mix item-kNN's probabilities into the model's in the exported graph: (1 - beta) * model + beta * "
        "item-kNN; auto chooses beta in 0, 0.1, .., 1 on the validation split, and where validation targets "
        "repeat an earlier action of their window (under --protocol full) also gamma, the share of the "
        "window's recent actions (docs/model-quality.md, kNN blend) (default: %(default)s)",
    )
    o.add_argument(
        "--lr-decay",
        type=float,
        default=_T.lr_decay,
        help=f"multiply the learning rate by this after an epoch without improvement (default: {_T.lr_decay})",
    )
    o.add_argument(
        "--stop-metric",
        choices=["hr@10", "ndcg@10"],
        default=_T.stop_metric,
        help=f"validation metric for early stopping (default: {_T.stop_metric})",
    )
    o.add_argument(
        "--min-count",
        type=int,
        default=_T.min_count,
        help=f"actions seen fewer times in training become <unk> (default: {_T.min_count})",
    )
    o.add_argument("--seed", type=int, default=_T.seed, help=f"(default: {_T.seed})")
    o.add_argument(
        "--negatives",
        type=int,
        default=_T.negatives,
        help=f"sampled protocol: negatives per test case (default: {_T.negatives})",
    )
    o.add_argument(
        "--threads",
        type=int,
        default=_T.threads,
        help="torch CPU threads; 0: torch's default, one per core (on a busy shared machine 1 can be faster)",
    )
    o.add_argument(
        "--device",
        default=_T.device,
        help="auto (cuda when available), cuda or cpu; export and evaluation always run on the CPU "
        f"(default: {_T.device})",
    )
    o.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "off"],
        default=_T.amp,
        help="mixed precision on a GPU: auto (bf16, else fp16), bf16, fp16 or off; off on the CPU "
        f"(default: {_T.amp})",
    )
    o.add_argument(
        "--loader-workers",
        type=int,
        default=_T.loader_workers,
        help="processes building training batches (0: the training process; default: %(default)s)",
    )

    _add_quality_options(m, o)
    _add_search_options(t)
    if preset is not None:
        t.set_defaults(**PRESETS[preset])

    e = sub.add_parser("evaluate", help="score an artifact and the baselines on the same split")
    e.add_argument(
        "--artifact", type=Path, required=True, help="artifact directory (model.onnx, manifest.json)"
    )
    e.add_argument("--protocol", choices=["full", "sampled"], default="full", help="(default: full)")
    e.add_argument(
        "--negatives", type=int, default=_T.negatives, help=f"sampled protocol (default: {_T.negatives})"
    )
    e.add_argument(
        "--exclude-history",
        action="store_true",
        help="full protocol: also report the variant where the actions in the user's window are no candidates "
        '(under "exclude_history", beside the plain figures)',
    )
    _add_data_options(e, action_default=None)

    q = sub.add_parser("quantize", help="write an artifact's int8 output-layer copy, gated against it")
    q.add_argument("--artifact", type=Path, required=True, help="float32 artifact directory to read")
    q.add_argument(
        "--out", type=Path, required=True, help="directory to write (new or empty; the same one: in place)"
    )
    q.add_argument("--scheme", choices=["int8"], default="int8", help="(default: %(default)s)")
    q.add_argument("--quiet", action="store_true", help="no logs; only the final JSON")
    return parser


def _data_options(args: argparse.Namespace, action_cols: list[str], split: str) -> DataOptions:
    time_col = args.time_col
    return DataOptions(
        path=args.data,
        user_col=args.user_col,
        action_cols=tuple(action_cols),
        time_col=None if time_col and time_col.lower() == "none" else (time_col or "timestamp"),
        time_col_required=time_col is not None,
        split=split,  # type: ignore[arg-type]
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        side_col=getattr(args, "side_col", None),
    )


def _columns(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",")]
    if not all(cols):
        raise TrainingError(f"--action-col {text!r}: empty column name")
    return cols


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    from training.pipeline import evaluate_command, train_command

    if args.command == "quantize":
        from training.quantize import quantize_artifact

        spec = quantize_artifact(args.artifact, args.out, args.scheme)
        return {"artifact": str(args.out), "model_version": read_manifest(args.out).model_version} | {
            "quantization": spec.model_dump()
        }
    if args.command == "train":
        if args.window < 1 or args.epochs < 1 or (args.batch_size or 1) < 1 or not 0 <= args.dropout < 1:
            raise TrainingError("--window, --epochs and --batch-size must be >= 1 and --dropout in [0, 1)")
        if args.loss_negatives < 1 or args.lr_patience < 1 or not 0 <= (args.input_dropout or 0) < 1:
            raise TrainingError(
                "--loss-negatives and --lr-patience must be >= 1 and --input-dropout in [0, 1)"
            )
        if args.side_own_scale is not None and not args.side_col:
            raise TrainingError("--side-own-scale applies to --side-col, which is not given")
        if args.side_own_scale is not None and not 0 < args.side_own_scale <= 10:
            raise TrainingError(f"--side-own-scale must be in (0, 10], got {args.side_own_scale}")
        if args.ensemble < 1 or args.tune_trials < 1 or args.tune_budget <= 0:
            raise TrainingError("--ensemble and --tune-trials must be >= 1 and --tune-budget > 0")
        options = _data_options(args, _columns(args.action_col), args.split or "leave-one-out")
        model_args = {
            "cell": args.model,
            "embedding_dim": args.embedding_dim,
            "hidden_dim": args.hidden_dim,
            "num_layers": args.layers,
            "dropout": args.dropout,
            "window": args.window,
            "tied": args.tied,
            "residual": args.residual,
            "history_bias": args.history_bias,
            "input_dropout": args.input_dropout,
            "feed_forward": args.feed_forward,
            # given only with --side-col; otherwise ModelConfig's default
            **({"side_own_scale": args.side_own_scale} if args.side_own_scale is not None else {}),
        }
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            clip_norm=args.clip_norm,
            patience=args.patience,
            lr_decay=args.lr_decay,
            refit=args.refit,
            stop_metric=args.stop_metric,
            min_count=args.min_count,
            seed=args.seed,
            quiet=args.quiet,
            negatives=args.negatives,
            threads=args.threads,
            step=args.step,
            device=args.device,
            amp=args.amp,
            loader_workers=args.loader_workers,
            loss=args.loss,
            loss_negatives=args.loss_negatives,
            loss_sampler=args.loss_sampler,
            logq=args.logq,
            lr_patience=args.lr_patience,
            val_protocol=args.protocol,
            ensemble=args.ensemble,
            quantize=args.quantize,
            knn_blend=_knn_blend(args.knn_blend),
        )
        if config.knn_blend != "off" and not args.history_bias:
            raise TrainingError(
                "--knn-blend needs the window in step.onnx, which only --history-bias models take: "
                "drop --no-history-bias, or --knn-blend off"
            )
        if args.tune_space is not None and not args.tune:
            raise TrainingError("--tune-space applies to --tune, which is not given")
        tune = None
        if args.tune:
            from training.tune import parse_space

            tune = TuneOptions(
                budget=args.tune_budget,
                trials=args.tune_trials,
                metric=args.tune_metric,
                space=parse_space(args.tune_space),
            )
        auto_given = None
        if args.preset == "auto":
            if not hasattr(args, "given"):  # without it, auto would override every option the caller gave
                raise TrainingError("--preset auto needs args.given, the options given (main() sets it)")
            auto_given = args.given
        return train_command(options, model_args, config, args.out, tune, auto_given)
    manifest = read_manifest(args.artifact)
    action_cols = _columns(args.action_col) if args.action_col else manifest.data.action_columns
    options = _data_options(args, action_cols, args.split or manifest.training.split)
    return evaluate_command(
        options,
        args.artifact,
        args.protocol,
        args.negatives,
        progress=not args.quiet,
        exclude_history=args.exclude_history,
    )


def _knn_blend(text: str) -> str:
    """--knn-blend's value checked: off, auto, or a number within [0, 1] (written back as that number)."""
    if text in ("off", "auto"):
        return text
    try:
        beta = float(text)
    except ValueError:
        beta = math.nan
    if not 0.0 <= beta <= 1.0:
        raise TrainingError(f"--knn-blend {text!r}: expected off, auto or a number within [0, 1]")
    return repr(beta)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(preset_in(argv) if "train" in argv else None)
    args = parser.parse_args(argv)
    if args.command == "train":
        args.given = given_options(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("training").setLevel(
        logging.WARNING if args.quiet else logging.INFO
    )  # not the libraries'
    try:
        result = run(args)
    except (TrainingError, ManifestError) as e:
        parser.exit(2, f"error: {e}\n")
    if result is not None:  # None: a torchrun process other than rank 0, which writes nothing
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
