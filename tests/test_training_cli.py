"""python -m training train|evaluate end to end: the artifact's files, manifest, report, ONNX vs PyTorch, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from app.manifest import MANIFEST_FILE, MODEL_FILE, PAD_TOKEN, REPORT_FILE, UNK_TOKEN, read_manifest
from tests.training_cli import cli, cli_error
from training.checkpoint import CHECKPOINT_FILE
from training.predict import encode_sequences, predict
from training.report import HR_PLOT, LOSS_PLOT, small_vocabulary_note
from training.runtime import open_session, run
from training.vocab import Vocabulary

METRICS = {f"{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (1, 5, 10, 20)} | {"accuracy", "macro_f1"}


def _random_log(
    path: Path, column: str, users: int, actions: int, events: tuple[int, int], seed: int
) -> Path:
    """A CSV of users taking uniformly random actions (`column`), a minute apart, `events` [lo, hi) each."""
    rng = np.random.default_rng(seed)
    rows = [f"user_id,{column},timestamp"]
    for user in range(users):
        for step in range(int(rng.integers(*events))):
            rows.append(f"u{user},a{int(rng.integers(0, actions))},{1_700_000_000 + 60 * step}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_behavior_artifact_is_complete_and_valid(behavior_artifact: Path) -> None:
    for name in (MODEL_FILE, MANIFEST_FILE, REPORT_FILE, CHECKPOINT_FILE, LOSS_PLOT, HR_PLOT):
        assert (behavior_artifact / name).is_file(), name
    manifest = read_manifest(behavior_artifact)
    assert (
        manifest.model_version
        == hashlib.sha256((behavior_artifact / MODEL_FILE).read_bytes()).hexdigest()[:16]
    )
    assert manifest.vocabulary[:2] == [PAD_TOKEN, UNK_TOKEN]
    assert sorted(manifest.vocabulary[2:]) == ["buy", "cart", "fav", "pv"]
    assert (manifest.cell, manifest.window, manifest.embedding_dim, manifest.hidden_dim) == (
        "lstm",
        20,
        16,
        32,
    )
    assert (
        manifest.padding_side == "right" and manifest.training.epochs_run == 2 and manifest.training.seed == 7
    )
    assert (
        manifest.data.rows == 3050
        and manifest.data.users == 40
        and manifest.data.action_columns == ["behavior"]
    )
    for protocol in ("full", "full-exclude-history", "sampled"):
        assert set(manifest.metrics[protocol]) == {"model", "popularity", "markov", "item-knn"}
        assert set(manifest.metrics[protocol]["model"]) == METRICS
    report = (behavior_artifact / REPORT_FILE).read_text()
    assert f"]({LOSS_PLOT})" in report and f"]({HR_PLOT})" in report
    assert "| hr@10 |" in report and "sampled protocol" in report
    # the baselines' validation figures, which the validation curves draw as reference lines
    assert "Baselines on the same validation targets" in report and "markov HR@10 " in report
    assert (behavior_artifact / LOSS_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_report_says_what_four_actions_cannot_measure(behavior_artifact: Path) -> None:
    # 4 behaviours: HR@5 and beyond are 1 for every scorer, and each user did most of the 4, so the sampled
    # protocol has a negative or two per case instead of 100; the report says both where it shows the figures
    manifest = read_manifest(behavior_artifact)
    assert all(manifest.metrics["full"][s]["hr@5"] == 1.0 for s in ("model", "popularity", "item-knn"))
    report = (behavior_artifact / REPORT_FILE).read_text()
    full = report.split("## Test metrics, full protocol")[1].split("## Test metrics")[0]
    sampled = report.split("## Test metrics, sampled protocol")[1].split("## Training curves")[0]
    assert "With 4 actions, HR@k is 1 for every scorer once k >= 4" in full
    assert "not the 100 asked for: the log has 4 actions" in sampled and "not comparable" not in full
    assert small_vocabulary_note("sampled", 7_462, 100.0, 100) == ""  # a real catalogue: nothing to say
    assert small_vocabulary_note("full", 7_462, None, 100) == ""


def test_onnx_runtime_matches_training_predict_on_action_strings(behavior_artifact: Path) -> None:
    manifest = read_manifest(behavior_artifact)
    sequences = [["pv", "pv", "cart"], [], ["buy"], ["pv", "zzz-unknown", "fav"] * 10]
    expected = predict(behavior_artifact, sequences)  # PyTorch, from checkpoint.pt
    ids, lengths = encode_sequences(Vocabulary(manifest.vocabulary), sequences, manifest.window)
    got = run(open_session(behavior_artifact / MODEL_FILE), ids, lengths)
    assert np.abs(got - expected).max() <= 1e-5
    assert np.all(got[:, :2] == 0) and np.allclose(got.sum(axis=1), 1, atol=1e-5)


def test_item_artifact_has_a_realistic_vocabulary(item_artifact: Path) -> None:
    manifest = read_manifest(item_artifact)
    assert manifest.vocab_size > 1000 and manifest.data.action_columns == ["item_id"]
    assert manifest.metrics["sampled"]["model"]["hr@10"] > 0


def test_evaluate_reproduces_the_manifest_metrics(
    behavior_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = cli(
        capsys,
        "evaluate",
        "--data",
        "examples/taobao_sample.csv",
        "--artifact",
        str(behavior_artifact),
        "--exclude-history",
        "--quiet",
    )
    assert (
        list(out)[:2] == ["protocol", "split"]
        and out["protocol"] == "full"
        and out["split"] == "leave-one-out"
    )
    metrics = read_manifest(behavior_artifact).metrics
    excluded = out["exclude_history"]
    assert isinstance(excluded, dict)
    for scorer in ("model", "popularity", "markov", "item-knn"):
        for got, stored in (
            (out[scorer], metrics["full"]),
            (excluded[scorer], metrics["full-exclude-history"]),
        ):
            assert isinstance(got, dict) and set(got) == METRICS
            for name, value in got.items():
                assert value == pytest.approx(stored[scorer][name], abs=1e-9), (scorer, name)


def test_train_gru_on_jsonl_with_time_split_then_evaluate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for user in range(30):
        t = 1_700_000_000 + int(rng.integers(0, 5000))
        for step in range(int(rng.integers(4, 12))):
            t += int(rng.integers(1, 600))
            lines.append(
                {
                    "uid": f"u{user}",
                    "kind": ["view", "cart", "buy"][step % 3],
                    "cat": int(step % 2),
                    "when": t,
                }
            )
    data = tmp_path / "events.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    out_dir = tmp_path / "artifact"
    common = ["--data", str(data), "--user-col", "uid", "--action-col", "kind,cat", "--time-col", "when"]
    trained = cli(
        capsys,
        "train",
        *common,
        "--out",
        str(out_dir),
        "--model",
        "gru",
        "--split",
        "time",
        "--epochs",
        "2",
        "--window",
        "8",
        "--embedding-dim",
        "8",
        "--hidden-dim",
        "8",
        "--quiet",
    )
    manifest = read_manifest(out_dir)
    assert manifest.cell == "gru" and manifest.training.split == "time" and "view:0" in manifest.vocabulary
    assert trained["model_version"] == manifest.model_version
    evaluated = cli(
        capsys, "evaluate", *common, "--artifact", str(out_dir), "--protocol", "sampled", "--quiet"
    )
    assert evaluated["split"] == "time" and evaluated["protocol"] == "sampled"
    assert evaluated["model"] == pytest.approx(manifest.metrics["sampled"]["model"], abs=1e-9)


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(
        capsys, "train", "--data", "examples/taobao_sample.csv", "--out", str(tmp_path / "x"), "--quiet"
    )
    assert (
        "column 'action' not found; available columns: user_id, item_id, category_id, behavior, timestamp"
        in err
    )
    bad = tmp_path / "bad.tsv"
    bad.write_text("user_id\taction\ttimestamp\nu\tpv\t1511848894\nu\tpv\t2017-02-30\n", encoding="utf-8")
    err = cli_error(capsys, "train", "--data", str(bad), "--out", str(tmp_path / "x"), "--quiet")
    assert f"{bad}: line 3: column 'timestamp': cannot read '2017-02-30'" in err
    err = cli_error(capsys, "evaluate", "--data", str(bad), "--artifact", str(tmp_path / "none"), "--quiet")
    assert "manifest file not found" in err
    assert not (tmp_path / "x").exists()


def test_preset_sets_the_defaults_and_options_beside_it_win() -> None:
    from training.__main__ import PRESETS, build_parser, preset_in

    for name, values in PRESETS.items():
        argv = ["train", "--data", "e.csv", "--out", "a", "--preset", name, "--lr", "0.5", "--no-tied"]
        args = build_parser(preset_in(argv)).parse_args(argv)
        assert args.preset == name and args.lr == 0.5 and args.tied is False  # given: they win
        for key, value in values.items():
            if key not in ("lr", "tied"):
                assert getattr(args, key) == value, (name, key)
    plain = build_parser(None).parse_args(["train", "--data", "e.csv", "--out", "a"])
    assert (plain.loss, plain.embedding_dim, plain.residual) == ("ce", 256, False)  # no preset: defaults


def test_train_with_a_preset_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _random_log(tmp_path / "events.csv", "action", users=40, actions=30, events=(4, 10), seed=1)
    out = tmp_path / "artifact"
    trained = cli(
        capsys, "train", "--data", str(data), "--out", str(out), "--preset", "full-ranking",
        "--epochs", "1", "--embedding-dim", "8", "--hidden-dim", "8", "--window", "8", "--quiet",
    )  # fmt: skip
    model = trained["model"]  # the run's whole ModelConfig, as train prints it
    assert isinstance(model, dict)
    assert (model["tied"], model["residual"], model["input_dropout"], model["dropout"]) == (
        True,
        True,
        0.5,
        0.1,
    )
    assert (model["embedding_dim"], model["hidden_dim"]) == (8, 8)  # given beside the preset: they win
    manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    assert (manifest["embedding_dim"], manifest["training"]["epochs_run"]) == (8, 1)
    assert (
        manifest["training"]["learning_rate"] == 0.01
        and trained["model_version"] == manifest["model_version"]
    )


def test_unknown_preset_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(capsys, "train", "--data", "e.csv", "--out", "a", "--preset", "fastest")
    assert "--preset" in err and "full-ranking" in err


def test_preset_auto_chooses_by_catalogue_size_and_density() -> None:
    from training.presets import PRESETS, auto_preset

    assert auto_preset(4, 10_000).name == "defaults"  # behaviour types: the plain defaults
    assert auto_preset(999, 3_000).values == {}
    sparse = auto_preset(12_101, 153_776)  # Amazon Beauty's training events: 12.7 per action
    assert (sparse.name, sparse.values) == ("full-ranking", PRESETS["full-ranking"])
    dense = auto_preset(1_682, 98_114)  # MovieLens-100k: 58 per action
    assert (dense.name, dense.values) == ("defaults+blend", {"knn_blend": "auto"})
    assert "12,101 actions, 12.7 training events per action" in sparse.reason


def test_preset_auto_leaves_the_options_the_command_line_gives() -> None:
    from training.__main__ import given_options
    from training.config import TrainConfig
    from training.pipeline import apply_preset
    from training.presets import PRESETS

    argv = ["train", "--data", "e.csv", "--out", "a", "--emb", "32", "--no-tied", "--lr=0.5"]
    given = given_options(argv)  # a prefix, --no-x and --x=v all count as given
    assert {"embedding_dim", "tied", "lr"} <= given and "loss" not in given
    model_args = {"embedding_dim": 32, "hidden_dim": 256, "tied": False, "history_bias": True}
    args, config = apply_preset(PRESETS["full-ranking"], given, model_args, TrainConfig(lr=0.5), 5_000)
    assert (args["embedding_dim"], args["tied"], config.lr) == (32, False, 0.5)  # given: kept
    assert (args["hidden_dim"], config.loss, config.epochs, config.knn_blend) == (64, "sampled", 40, "auto")
    no_bias = model_args | {"history_bias": False}  # the blend needs the window: left off, not an error
    assert apply_preset(PRESETS["full-ranking"], given, no_bias, TrainConfig(), 5_000)[1].knn_blend == "off"


def test_train_by_default_gives_a_sparse_catalogue_the_full_ranking_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1,200 items, about 4 events each: a sparse catalogue
    data = _random_log(tmp_path / "events.csv", "item_id", users=300, actions=1200, events=(12, 20), seed=3)
    out = tmp_path / "artifact"
    trained = cli(
        capsys, "train", "--data", str(data), "--out", str(out), "--action-col", "item_id",
        "--epochs", "1", "--window", "8", "--quiet",
    )  # fmt: skip
    assert trained["configuration"]["name"] == "full-ranking"
    model = trained["model"]
    assert (model["embedding_dim"], model["tied"], model["residual"], model["window"]) == (64, True, True, 8)
    assert trained["training"]["epochs_run"] == 1 and "knn_blend" in trained  # given: 1 epoch; the blend ran
    report = (out / REPORT_FILE).read_text(encoding="utf-8")
    assert "configuration: `full-ranking`, chosen by `--preset auto`" in report
    plain = cli(
        capsys, "train", "--data", str(data), "--out", str(tmp_path / "plain"), "--action-col", "item_id",
        "--epochs", "1", "--window", "8", "--preset", "none", "--quiet",
    )  # fmt: skip
    assert "configuration" not in plain and plain["model"]["embedding_dim"] == 256
