"""The two commands end to end: `train` (log -> artifact directory) and `evaluate` (artifact + log -> metrics)."""

from __future__ import annotations

import dataclasses
import logging
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    DataSummary,
    Manifest,
    TrainingSummary,
    read_manifest,
    write_manifest,
)
from training import distributed
from training.arrays import Sequences
from training.baselines import ItemKNN, Markov, Popularity
from training.config import EVAL_SEED, DataOptions, ModelConfig, TrainConfig, TuneOptions, ValProtocol
from training.errors import TrainingError
from training.events import EventLog, load_events
from training.presets import auto_preset
from training.protocols import EXCLUDE_HISTORY, Protocol, Scorer, evaluate_cases
from training.splits import Split, make_boundaries
from training.vocab import Vocabulary

if TYPE_CHECKING:
    from training.ensemble import AnyModel
    from training.members import Fitted

log = logging.getLogger(__name__)


def prepare(
    options: DataOptions, vocabulary: Vocabulary | None = None, min_count: int = 1
) -> tuple[EventLog, Split, Vocabulary]:
    """Read and clean the log, split it, and encode it with `vocabulary` (built from the training events if None)."""
    events = load_events(options)
    bounds = make_boundaries(events, options)
    if vocabulary is None:
        starts = events.offsets[:-1]
        edges = np.zeros(events.rows + 1, dtype=np.int8)  # +1 where a user's training events start, -1 after
        np.add.at(edges, starts, 1)
        np.add.at(edges, starts + bounds.train_end, -1)
        in_train = np.cumsum(edges[:-1], dtype=np.int8).astype(bool)  # (E,) one byte per event
        vocabulary = Vocabulary.from_codes(events.tokens, events.actions[in_train], min_count)
        del edges, in_train
    ids = vocabulary.lookup(events.tokens)[events.actions]  # (E,) int64
    split = Split(bounds, Sequences(ids, events.offsets))
    log.info(
        "%s: %d events, %d users, %d actions; vocabulary %d ids",
        events.path,
        events.rows,
        len(events.users),
        events.distinct_actions(),
        len(vocabulary),
    )
    return events, split, vocabulary


def baseline_scorers(split: Split, vocab_size: int, window: int = 50) -> dict[str, Scorer]:
    """Popularity, Markov and item-kNN (co-occurrence within `window` events), fitted on the training events."""
    train = split.train_sequences()
    return {
        "popularity": Popularity(train, vocab_size),
        "markov": Markov(train, vocab_size),
        "item-knn": ItemKNN(train, vocab_size, window),
    }


def validation_baselines(
    split: Split, vocab_size: int, window: int = 50, protocol: ValProtocol = "full"
) -> dict[str, dict[str, float]]:
    """The baselines on the validation targets, fitted on the training events, under the validation protocol
    (sampled: the same negatives as the model's validation): the reference lines of the model's validation
    curve. Empty when there are no validation cases."""
    from training.train import VAL_NEGATIVES

    cases = split.cases("validation")
    if not len(cases):
        return {}
    scorers = baseline_scorers(split, vocab_size, window)
    evaluation = evaluate_cases(split, cases, scorers, vocab_size, (protocol,), VAL_NEGATIVES, EVAL_SEED)
    return evaluation.metrics[protocol]


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def train_command(
    options: DataOptions,
    model_args: dict[str, Any],
    config: TrainConfig,
    out_dir: Path,
    tune: TuneOptions | None = None,
    auto_given: frozenset[str] | None = None,
) -> dict[str, Any] | None:
    """Train, evaluate (both protocols, with baselines), export with the parity gate, write the artifact.

    `auto_given`: `--preset auto` - the configuration is chosen by the log's catalogue and density once it is
    read (training/presets.py, auto_preset), for every option not in this set (the ones given on the command
    line); None: the configuration as passed.

    Under torchrun every process trains its share and only rank 0 returns (the others return None)."""
    from training.device import prepare_device, resolve_device

    world = distributed.from_env()
    device = resolve_device(config.device, world.local_rank)
    prepare_device(device)  # each process on its own GPU before NCCL starts
    distributed.init(world, device)
    if not world.main:  # one process reports progress
        logging.getLogger("training").setLevel(logging.WARNING)
    try:
        return _train(options, model_args, config, out_dir, tune, auto_given)
    finally:
        distributed.close()


def _train(
    options: DataOptions,
    model_args: dict[str, Any],
    config: TrainConfig,
    out_dir: Path,
    tune: TuneOptions | None = None,
    auto_given: frozenset[str] | None = None,
) -> dict[str, Any] | None:
    from training.checkpoint import CHECKPOINT_FILE, save_checkpoint
    from training.ensemble import recurrent
    from training.export import export_model, model_version
    from training.members import fit_members
    from training.predict import model_scorer
    from training.report import write_report

    events, split, vocabulary = prepare(options, min_count=config.min_count)
    side = None
    if options.side_col:  # before the search, so that every trial trains with it too
        from training.side import side_info

        side = side_info(options, vocabulary, events)
        model_args = model_args | {"side_of": side.side_of}
    auto = None
    if auto_given is not None:
        auto = auto_preset(events.distinct_actions(), int(split.boundaries.train_end.sum()))
        model_args, config = apply_preset(auto.values, auto_given, model_args, config, len(vocabulary))
        log.info("configuration: %s (--preset auto: %s)", auto.name, auto.reason)
    tuning = None
    if tune is not None:
        from training.tune import apply, tune_search

        tuning = tune_search(split, len(vocabulary), model_args, config, tune)
        assert tuning.best is not None  # tune_search raises when no trial was scored
        model_args, config = apply(tuning.best.params, model_args, config)
        config = dataclasses.replace(config, stop_metric=tune.metric)  # early stopping as in the trials
        log.info("tuning: best trial %d, %s", tuning.best.number, tuning.best.params)
    model_config = ModelConfig(vocab_size=len(vocabulary), **model_args)
    if config.knn_blend != "off" and len(vocabulary) > KNN_BLEND_MAX_VOCAB:
        raise TrainingError(
            f"--knn-blend: {len(vocabulary):,} actions would add {len(vocabulary) * 800 / 1e9:.1f} GB of neighbour "
            f"tables to each graph (800 bytes per action; at most {KNN_BLEND_MAX_VOCAB:,} actions): train with "
            "--knn-blend off"
        )
    # Tested (and served): fitted on every event before the test targets; so are the baselines.
    final_split = split.with_validation_as_training()
    fitted = fit_members(split, final_split, model_config, config)
    if side is not None:  # from here on a plain model: the side tables added into its own
        from training.side import fold

        fitted.model = fold(fitted.model)
        fitted.selection = fold(fitted.selection) if fitted.selection is not None else None
        model_config = dataclasses.replace(model_config, side_of=None)
    model, seconds, refit_epochs, result = fitted.model, fitted.seconds, fitted.refit_epochs, fitted.first
    if not distributed.current().main:
        return None  # under torchrun every process trains; rank 0 evaluates and writes the artifact
    baseline_validation = validation_baselines(
        split, len(vocabulary), model_config.window, config.val_protocol
    )
    blend = None
    if config.knn_blend != "off":
        model, blend = _blend(fitted, split, final_split, model_config, config)
        fitted.model = model
    inner = recurrent(model)

    test = final_split.cases("test")
    scorers = {
        "model": model_scorer(model, model_config.window),
        **({"recurrent": model_scorer(inner, model_config.window)} if inner is not model else {}),
        **baseline_scorers(final_split, len(vocabulary), model_config.window),
    }
    evaluation = evaluate_cases(
        final_split,
        test,
        scorers,
        len(vocabulary),
        ("full", EXCLUDE_HISTORY, "sampled"),
        config.negatives,
        EVAL_SEED,
        progress=not config.quiet,
        window=model_config.window,
    )
    if not len(test):
        log.warning("no test cases (every user has fewer than 3 events?): the artifact has no metrics")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # an old manifest must not describe the new model
    save_checkpoint(out_dir / CHECKPOINT_FILE, model, vocabulary)
    onnx_path, diff = export_model(model, out_dir)
    log.info("exported %s (parity max |diff| %.2g)", onnx_path, diff)
    time_start, time_end = events.time_span()
    manifest = Manifest(
        model_version=model_version(onnx_path),
        created_at=datetime.now(UTC),
        cell=model_config.cell,
        embedding_dim=model_config.embedding_dim,
        hidden_dim=model_config.hidden_dim,
        num_layers=model_config.num_layers,
        dropout=model_config.dropout,
        window=model_config.window,
        padding_side="right",
        vocabulary=vocabulary.tokens,
        data=DataSummary(
            file=str(events.path),
            rows=events.rows,
            users=len(events.users),
            actions=events.distinct_actions(),
            action_columns=list(events.action_cols),
            time_start=time_start,
            time_end=time_end,
        ),
        training=TrainingSummary(
            split=options.split,
            epochs_run=len(result.epochs),
            best_epoch=result.best_epoch,
            seconds=round(seconds, 2),
            events_per_second=round(
                result.events_per_second if config.ensemble == 1 else fitted.events_per_second, 1
            ),
            seed=config.seed,
            batch_size=result.batch_size,
            learning_rate=config.lr,
        ),
        metrics=evaluation.metrics if len(test) else {},
        versions=library_versions(),
    )
    write_report(
        out_dir,
        manifest,
        result.epochs,
        rows_read=events.rows_read,
        dropped_missing=events.dropped_missing,
        dropped_duplicates=events.dropped_duplicates,
        evaluation=evaluation,
        min_count=config.min_count,
        export_diff=diff,
        refit_epochs=refit_epochs,
        baseline_validation=baseline_validation,
        fitted=fitted,
        tuning=tuning,
        blend=blend,
        negatives=config.negatives,
        configuration=auto,
        side=side.summary() if side is not None else None,
    )
    write_manifest(out_dir, manifest)  # a directory with a manifest is a complete artifact
    step = None
    if config.step:
        from training.step import export_step

        try:
            step = export_step(out_dir)  # gated against the model.onnx just written; adds manifest.step
        except TrainingError as e:
            raise TrainingError(
                f"{e} (the artifact in {out_dir} is complete and servable without incremental state; "
                "train with --no-step to skip this export)"
            ) from e
        log.info("exported %s (parity max |diff| %.2g)", out_dir / step.file, step.parity_max_abs_diff)
    quantization = None
    if config.quantize != "none":
        from training.quantize import quantize_artifact

        quantization = quantize_artifact(out_dir, out_dir, config.quantize)  # in place, behind its own gate
        manifest = read_manifest(out_dir)
        step = manifest.step
        log.info("quantized the output layer: %s", quantization.model_dump())
    return {
        "artifact": str(out_dir),
        "model_version": manifest.model_version,
        "vocabulary": manifest.vocab_size,
        "model": dataclasses.asdict(model_config),
        **({"side": side.summary()} if side is not None else {}),
        "training": manifest.training.model_dump(),
        "refit_epochs": refit_epochs,
        "test_cases": len(test),
        "parity_max_abs_diff": diff,
        "step": step.model_dump() if step is not None else None,
        "metrics": manifest.metrics,
        **({"quantization": quantization.model_dump()} if quantization is not None else {}),
        **({"ensemble": ensemble_summary(fitted)} if config.ensemble > 1 else {}),
        **({"tuning": tuning.to_json()} if tuning is not None else {}),
        **({"knn_blend": blend} if blend is not None else {}),
        **({"configuration": {"name": auto.name, "reason": auto.reason}} if auto is not None else {}),
    }


def apply_preset(
    values: dict[str, Any],
    given: frozenset[str],
    model_args: dict[str, Any],
    config: TrainConfig,
    vocab_size: int,
) -> tuple[dict[str, Any], TrainConfig]:
    """`values` (argparse destinations, as in PRESETS) in place of the run's model arguments and training
    configuration, except the options in `given` (the command line's win). The kNN blend is left off where it
    cannot be exported: a model without the history bias, or a vocabulary over KNN_BLEND_MAX_VOCAB."""
    model_args = dict(model_args)
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in values.items():
        if key in given:
            continue
        if key == "knn_blend" and (no_blend := _no_blend(model_args, vocab_size)):
            log.warning("the configuration's kNN blend is left off: %s", no_blend)
            continue
        if key in model_fields:
            model_args[key] = value
        elif key in fields:
            changes[key] = value
        else:
            raise ValueError(f"preset option {key!r} is neither a model argument nor a TrainConfig field")
    return model_args, dataclasses.replace(config, **changes)


def _no_blend(model_args: dict[str, Any], vocab_size: int) -> str:
    """Why the kNN blend cannot be exported for this model ("" when it can)."""
    if not model_args.get("history_bias", True):
        return "--no-history-bias (the blend reads the window the history bias takes)"
    if vocab_size > KNN_BLEND_MAX_VOCAB:
        return f"{vocab_size:,} actions, over the blend's {KNN_BLEND_MAX_VOCAB:,}"
    return ""


KNN_BLEND_MAX_VOCAB = 1_000_000  # 0.8 GB of neighbour tables per graph; protobuf's limit is 2 GB


def _blend(
    fitted: Fitted, split: Split, final_split: Split, model_config: ModelConfig, config: TrainConfig
) -> tuple[AnyModel, dict[str, Any]]:
    """`--knn-blend`: beta (given, or chosen on the validation split with the models selected before the
    refit and a kNN fitted on the training events; auto also chooses gamma, the recent views' share, where
    validation targets repeat an earlier action of their window), then the served blend: the final model
    with a kNN fitted on every event before the test targets. Returns the blend (the final model itself when
    beta and gamma are 0) and its summary (beta, gamma, each pair's figures)."""
    from training.knn_blend import KnnBlend, KnnPrior, choose_beta, repeats
    from training.train import validation_candidates

    vocab_size, window = model_config.vocab_size, model_config.window
    table: list[dict[str, float]] = []
    cases = split.cases("validation")
    gamma, repeated = 0.0, 0.0
    if config.knn_blend == "auto" and (not len(cases) or fitted.selection is None):
        log.warning(
            "--knn-blend auto chooses beta on the validation split, and the log has no validation cases (no "
            "user has 3 events): the model is exported alone; give a fixed --knn-blend BETA to blend anyway"
        )
        beta = 0.0
    elif config.knn_blend == "auto":
        prior = KnnPrior.fit(split.train_sequences(), vocab_size, window)
        candidates = validation_candidates(split, cases, vocab_size, config)
        repeated = repeats(split, cases, window)
        # gamma only under full ranking: the sampled protocol's negatives are actions the user never touched,
        # which the recent views score 0, so there every gamma > 0 would look better than the last
        recent = repeated > 0 and candidates is None
        beta, gamma, table = choose_beta(
            fitted.selection, prior, split, cases, config.stop_metric, candidates, recent=recent
        )
        log.info(
            "knn blend: beta %.1f, recent views %.1f chosen on validation %s (%s protocol; %.1f%% of the "
            "targets repeat an earlier action of their window)",
            beta,
            gamma,
            config.stop_metric,
            config.val_protocol,
            100 * repeated,
        )
    else:
        beta = float(config.knn_blend)
    summary: dict[str, Any] = {
        "beta": beta,
        "gamma": gamma,
        "chosen": bool(table),  # False: given, or auto without validation cases to choose on
        "mode": config.knn_blend,
        "exported": beta > 0 or gamma > 0,
        "metric": config.stop_metric,
        "protocol": config.val_protocol,
        "repeats": repeated,
        "validation": table,
    }
    if beta == 0 and gamma == 0:  # the model alone: nothing of the kNN goes into the graphs
        return fitted.model, summary
    prior = KnnPrior.fit(final_split.train_sequences(), vocab_size, window)
    return KnnBlend(fitted.model, prior, beta, gamma).eval(), summary


def ensemble_summary(fitted: Fitted) -> dict[str, Any]:
    """The train command's "ensemble" entry: each member's run and validation figures, and the ensemble's."""
    return {
        "members": [dataclasses.asdict(m) for m in fitted.members],
        "validation": fitted.ensemble_validation,
    }


def evaluate_command(
    options: DataOptions,
    artifact_dir: Path,
    protocol: Protocol,
    negatives: int,
    progress: bool = False,
    exclude_history: bool = False,
) -> dict[str, Any]:
    """Score the artifact's model.onnx (with ONNX Runtime) and the baselines on the re-created test split.

    With `exclude_history` (full protocol only) the full-exclude-history figures come too, under
    "exclude_history", beside the plain ones.
    """
    if exclude_history and protocol != "full":
        raise TrainingError(
            "--exclude-history applies to --protocol full (sampled negatives already exclude the user's actions)"
        )
    from training.runtime import onnx_scorer, open_session

    manifest = read_manifest(artifact_dir)
    vocabulary = Vocabulary(manifest.vocabulary)
    _, split, _ = prepare(options, vocabulary)
    split = split.with_validation_as_training()  # the baselines see what the tested model saw
    test = split.cases("test")
    session = open_session(Path(artifact_dir) / MODEL_FILE)
    scorers = {
        "model": onnx_scorer(session, manifest.window, manifest.io),
        **baseline_scorers(split, len(vocabulary), manifest.window),
    }
    protocols: tuple[Protocol, ...] = (protocol, EXCLUDE_HISTORY) if exclude_history else (protocol,)
    evaluation = evaluate_cases(
        split,
        test,
        scorers,
        len(vocabulary),
        protocols,
        negatives,
        EVAL_SEED,
        progress=progress,
        window=manifest.window,
    )
    out: dict[str, Any] = {"protocol": protocol, "split": options.split, "cases": evaluation.cases}
    if evaluation.mean_negatives is not None:
        out["mean_negatives"] = round(evaluation.mean_negatives, 2)
    out.update(evaluation.metrics[protocol])
    if exclude_history:
        out["exclude_history"] = evaluation.metrics[EXCLUDE_HISTORY]
    return out
