"""`--tune` (Optuna within a time budget, every trial recorded) and the sampled validation protocol it can
score trials by."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.manifest import STEP_FILE, read_manifest
from tests.conftest import EXAMPLES, ROOT
from tests.test_training_train import _cyclic_split
from training.config import ModelConfig, SearchSpace, TrainConfig, TuneOptions
from training.errors import TrainingError
from training.model import NextActionModel
from training.presets import PRESETS, tune_starts
from training.protocols import evaluate_cases, sample_negatives
from training.tune import BUDGET, parse_space, tune_search

TINY = '{"dims": [4, 8], "batch_sizes": [16, 32], "losses": ["ce", "sampled"], "lr": [0.005, 0.03]}'


def test_validate_sampled_agrees_with_the_metrics_module() -> None:
    from training.predict import model_scorer
    from training.train import validate

    split = _cyclic_split()
    torch.manual_seed(0)
    model = NextActionModel(ModelConfig(vocab_size=40, embedding_dim=4, hidden_dim=6, window=10)).eval()
    cases = split.cases("validation")
    candidates = sample_negatives(split, cases, 40, 12, seed=0)  # 12 of the 30 never-touched ids per case
    _, fast = validate(model, split, cases, candidates=candidates)
    slow = evaluate_cases(
        split, cases, {"m": model_scorer(model, 10)}, 40, ("sampled",), negatives=12, seed=0
    ).metrics["sampled"]["m"]
    assert 0 < slow["hr@10"] < 1  # 13 candidates, an untrained model: some hits, some misses
    assert fast["hr@10"] == pytest.approx(slow["hr@10"]) and fast["ndcg@10"] == pytest.approx(slow["ndcg@10"])


def test_tune_records_three_trials_and_exports_the_best(tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    cmd = [
        sys.executable, "-m", "training", "train", "--data", str(EXAMPLES / "taobao_sample.csv"),
        "--action-col", "behavior", "--out", str(out), "--quiet", "--seed", "3", "--threads", "1",
        "--window", "8", "--epochs", "2", "--loss-negatives", "20", "--protocol", "sampled",
        "--tune", "--tune-trials", "3", "--tune-budget", "60", "--tune-space", TINY,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    tuning = json.loads(done.stdout)["tuning"]
    assert tuning["protocol"] == "sampled" and tuning["metric"] == "ndcg@10"
    trials = tuning["trials"]
    assert len(trials) == 3 or (tuning["stopped"] == BUDGET and 1 <= len(trials) < 3)
    for t in trials:
        assert set(t["params"]) == {
            "loss", "dim", "input_dropout", "dropout", "lr", "batch_size", "tied", "sampler", "residual",
            "negatives",
        }  # fmt: skip
        assert t["origin"] == "search"  # the default (E256) and the presets (E64) lie outside dims [4, 8]
        assert 4 <= t["params"]["dim"] <= 8 and t["params"]["batch_size"] in (16, 32)
        assert 1 <= t["epochs"] <= 2 and t["seconds"] > 0 and t["state"] in ("complete", "pruned", "budget")
        assert 0 <= t["value"] <= 1
    best = max((t for t in trials if t["state"] != "pruned"), key=lambda t: t["value"])
    assert tuning["best_trial"] == best["number"] and tuning["best_params"] == best["params"]
    assert json.loads((out / "tuning.json").read_text()) == tuning

    manifest = read_manifest(out)  # the best configuration, trained as usual and exported through both gates
    assert manifest.embedding_dim == manifest.hidden_dim == best["params"]["dim"]
    assert manifest.training.learning_rate == pytest.approx(best["params"]["lr"])
    assert manifest.step is not None and (out / STEP_FILE).is_file()
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "![validation ndcg@10 by trial](tuning.png)" in report
    assert "validation targets (sampled protocol" in report  # the baselines' lines match the model's curve
    assert sum(
        line.startswith("| ") and line.endswith("|")
        for line in report.split("## Tuning")[1].split("## Test")[0].splitlines()
    ) == 1 + len(trials)  # the header and one row per trial
    assert (out / "tuning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_budget_stops_the_search_after_the_first_epoch() -> None:
    split = _cyclic_split()
    space = parse_space('{"dims": [4, 4], "batch_sizes": [8], "losses": ["ce"]}')
    options = TuneOptions(budget=1e-6, trials=5, space=space)
    config = TrainConfig(epochs=3, quiet=True)
    result = tune_search(split, 10, {"window": 10}, config, options)
    assert result.stopped == BUDGET and len(result.trials) == 1  # the first trial always runs
    (trial,) = result.trials
    assert trial.state == BUDGET and trial.epochs == 1 and result.best == trial


def test_the_search_starts_from_the_default_and_the_presets_in_its_space() -> None:
    assert [name for name, _ in tune_starts(SearchSpace())] == ["default", *PRESETS]
    assert tune_starts(parse_space('{"dims": [4, 8]}')) == []
    starts = dict(tune_starts(parse_space('{"losses": ["sampled"]}')))  # the default's full softmax is out
    assert list(starts) == list(PRESETS)
    full = starts["full-ranking"]
    assert (full["loss"], full["sampler"], full["residual"], full["negatives"], full["dim"]) == (
        "sampled", "popularity", True, 2000, 64
    )  # fmt: skip

    split = _cyclic_split()
    space = parse_space('{"losses": ["sampled"], "dims": [16, 64], "batch_sizes": [8, 64]}')
    options = TuneOptions(budget=600, trials=3, space=space)
    result = tune_search(split, 10, {"window": 10}, TrainConfig(epochs=1, quiet=True), options)
    assert [t.origin for t in result.trials] == [*PRESETS, "search"]
    assert [t.params for t in result.trials[:2]] == [starts[name] for name in PRESETS]
    assert all(16 <= t.params["dim"] <= 64 and t.params["loss"] == "sampled" for t in result.trials)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"dim": [4, 8]}', "unknown keys ['dim']"),
        ('{"lr": [0.1, 0.01]}', "lr must be"),
        ('{"losses": ["mse"]}', "losses must be"),
        ('{"samplers": ["zipf"]}', "samplers must be"),
        ('{"negatives": [0]}', "negatives must be"),
        ('{"residual": true}', "residual must be a list of choices"),
        ("[4, 8", "not JSON"),
    ],
)
def test_bad_tune_space_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(TrainingError, match="--tune-space") as e:
        parse_space(text)
    assert message in str(e.value)
    assert parse_space(None) == SearchSpace()


def test_nextact_train_accepts_the_ensemble_and_tuning_options() -> None:
    from app.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "e.csv", "--out", "a", "--ensemble", "3", "--tune", "--tune-budget", "120",
         "--tune-trials", "7", "--tune-metric", "hr@10", "--protocol", "sampled", "--tune-space", "{}"]
    )  # fmt: skip
    assert (args.ensemble, args.tune, args.tune_budget, args.tune_trials) == (3, True, 120.0, 7)
    assert (args.tune_metric, args.protocol, args.tune_space) == ("hr@10", "sampled", "{}")


def test_tune_options_are_checked_before_any_data_is_read(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "training", "train", "--data", str(tmp_path / "missing.csv"), "--out", "x"]
    for extra, message in (
        (["--tune-space", "{}"], "--tune-space applies to --tune"),
        (["--tune", "--tune-budget", "0"], "--tune-budget > 0"),
        (["--ensemble", "0"], "--ensemble and --tune-trials must be >= 1"),
    ):
        done = subprocess.run(
            [*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 2 and message in done.stderr, (extra, done.stderr)
