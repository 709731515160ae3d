"""`--knn-blend`: item-kNN as a distribution inside the exported graphs, beta chosen on validation, and the
service serving the mixture from model.onnx and step.onnx alike."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.manifest import MODEL_FILE, PAD_ID, UNK_ID, read_manifest
from tests.conftest import EXAMPLES, train_artifact
from tests.test_incremental_state import _assert_same, _stream, _twins
from tests.training_cli import cli, cli_error
from training.__main__ import main
from training.baselines import ItemKNN
from training.checkpoint import load_checkpoint
from training.config import DataOptions, ModelConfig
from training.events import EventLog
from training.knn_blend import BETAS, KnnBlend, KnnPrior, choose_beta
from training.model import NextActionModel
from training.pipeline import prepare
from training.protocols import evaluate_cases
from training.runtime import open_session
from training.splits import Split, leave_one_out
from training.train import validate
from training.vocab import Vocabulary

BETA = 0.4


def _random_split(users: int = 60, vocab: int = 40, seed: int = 0) -> Split:
    """Users walking a sparse random transition graph: item-kNN and a model both have something to find."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(2, vocab, size=(vocab, 3))  # three likely successors per action
    seqs = []
    for _ in range(users):
        s = [int(rng.integers(2, vocab))]
        for _ in range(int(rng.integers(4, 14))):
            s.append(int(nxt[s[-1], rng.integers(3)]) if rng.random() < 0.8 else int(rng.integers(2, vocab)))
        seqs.append(s)
    log = EventLog.from_sequences([[str(a) for a in s] for s in seqs])
    return Split(leave_one_out(log), [np.array(s, dtype=np.int64) for s in seqs])


def test_the_prior_is_the_item_knn_baseline_as_a_distribution() -> None:
    split = _random_split()
    train = split.train_sequences()
    knn, prior = ItemKNN(train, 40, 10), KnnPrior.fit(train, 40, 10)
    assert int(np.diff(knn.row_start).max()) <= prior.neighbours.shape[1]  # nothing cut: exactly the baseline
    rng = np.random.default_rng(1)
    ids = rng.integers(UNK_ID, 40, size=(6, 14))  # (B, T), UNK included
    lengths = np.array([14, 13, 1, 0, 5, 30])  # a full row, short ones, an empty one, one beyond T
    ids[np.arange(14)[None, :] >= np.minimum(lengths, 14)[:, None]] = PAD_ID
    got = prior(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()  # (B, V)
    want = knn([row[: min(n, 14)] for row, n in zip(ids, lengths, strict=True)])  # (B, V)
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert np.all(got[:, [PAD_ID, UNK_ID]] == 0) and np.allclose(got.sum(axis=1), 1.0)
    assert not np.allclose(got[0], got[2]) and np.allclose(got[3], knn.backoff / knn.backoff.sum())


def test_choose_beta_scores_every_mixture_on_validation() -> None:
    split = _random_split()
    cases = split.cases("validation")
    torch.manual_seed(0)
    model = NextActionModel(ModelConfig(vocab_size=40, embedding_dim=6, hidden_dim=8, window=10)).eval()
    prior = KnnPrior.fit(split.train_sequences(), 40, 10)
    beta, gamma, table = choose_beta(model, prior, split, cases, "ndcg@10")
    assert [row["beta"] for row in table] == list(BETAS) and gamma == 0  # no recent views asked for
    _, alone = validate(model, split, cases)  # beta 0: the model's own validation figures
    assert table[0]["hr@10"] == pytest.approx(alone["hr@10"]) and table[0]["ndcg@10"] == pytest.approx(
        alone["ndcg@10"]
    )
    knn = evaluate_cases(split, cases, {"k": ItemKNN(split.train_sequences(), 40, 10)}, 40, ("full",), 10, 0)
    assert table[-1]["hr@10"] == pytest.approx(knn.metrics["full"]["k"]["hr@10"])  # beta 1: item-kNN's
    best = max(row["ndcg@10"] for row in table)
    assert best > table[0]["ndcg@10"]  # an untrained model: kNN helps
    assert beta == min(row["beta"] for row in table if row["ndcg@10"] == best)  # ties keep more model


@pytest.fixture(scope="module")
def blend_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("knn-blend")
    return train_artifact(
        out, EXAMPLES / "beauty_sample.csv", "--action-col", "item_id", "--threads", "1", "--epochs", "1",
        "--window", "10", "--embedding-dim", "8", "--hidden-dim", "8", "--loss", "sampled",
        "--loss-negatives", "50", "--knn-blend", str(BETA),
    )  # fmt: skip


def test_the_exported_graph_is_the_mixture_of_the_refit_model_and_a_knn_of_every_event(
    blend_artifact: Path,
) -> None:
    model, _ = load_checkpoint(blend_artifact)
    assert isinstance(model, KnnBlend) and model.beta == BETA
    manifest = read_manifest(blend_artifact)
    assert manifest.step is not None and manifest.step.history == "history"  # both gates passed
    _, split, _ = prepare(
        DataOptions(path=EXAMPLES / "beauty_sample.csv", action_cols=("item_id",)),
        Vocabulary(manifest.vocabulary),
    )
    fitted = KnnPrior.fit(split.with_validation_as_training().train_sequences(), manifest.vocab_size, 10)
    for name in ("neighbours", "similarity", "backoff"):  # the served kNN saw training + validation events
        assert torch.equal(getattr(model.prior, name), getattr(fitted, name)), name
    rng = np.random.default_rng(3)
    ids = rng.integers(2, manifest.vocab_size, size=(5, 10))
    lengths = np.array([10, 7, 3, 1, 0])
    ids[np.arange(10)[None, :] >= lengths[:, None]] = PAD_ID
    (got,) = open_session(blend_artifact / MODEL_FILE).run(None, {"action_ids": ids, "lengths": lengths})
    ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)
    with torch.inference_mode():
        want = (1 - BETA) * model.model(ids_t, lengths_t) + BETA * fitted(ids_t, lengths_t)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    report = (blend_artifact / "report.md").read_text()
    assert "## kNN blend" in report and f"beta = {BETA:g} (given on the command line)" in report
    assert "| metric | model | recurrent | popularity | markov | item-knn |" in report
    metrics = manifest.metrics["full"]
    assert set(metrics) == {"model", "recurrent", "popularity", "markov", "item-knn"}
    assert metrics["model"] != metrics["recurrent"]


@pytest.mark.anyio
async def test_the_service_serves_the_blend_from_either_graph(blend_artifact: Path, redis_url: str) -> None:
    m = read_manifest(blend_artifact)
    stream = _stream(m.vocabulary, 14, seed=6)
    batches = [[e] for e in stream[:-3]] + [stream[-3:]]  # past the window of 10, then a batch of 3
    for on, off in await _twins(blend_artifact, redis_url, batches):
        _assert_same(on, off)


def test_auto_chooses_beta_on_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cli(
        capsys, "train", "--data", str(EXAMPLES / "beauty_sample.csv"), "--action-col", "item_id",
        "--out", str(tmp_path / "a"), "--quiet", "--threads", "1", "--epochs", "1", "--window", "10",
        "--embedding-dim", "8", "--hidden-dim", "8", "--loss", "sampled", "--loss-negatives", "50",
        "--no-refit", "--no-step", "--knn-blend", "auto",
    )  # fmt: skip
    blend = out["knn_blend"]
    assert blend["chosen"] and blend["metric"] == "ndcg@10" and len(blend["validation"]) == len(BETAS)
    best = max(row["ndcg@10"] for row in blend["validation"])
    assert blend["beta"] == min(row["beta"] for row in blend["validation"] if row["ndcg@10"] == best)
    assert blend["exported"] == (blend["beta"] > 0)
    assert ("recurrent" in out["metrics"]["full"]) == (blend["beta"] > 0)  # beside a blend: the model alone
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## kNN blend" in report and f"beta = {blend['beta']:g}" in report


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--knn-blend", "1.5"], "--knn-blend '1.5': expected off, auto or a number within [0, 1]"),
        (["--knn-blend", "some"], "--knn-blend 'some'"),
        (["--knn-blend", "auto", "--no-history-bias"], "--knn-blend needs the window in step.onnx"),
    ],
)
def test_bad_knn_blend_options_name_the_problem(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = cli_error(capsys, "train", "--data", str(tmp_path / "missing.csv"), "--out", "x", *extra)
    assert message in err


def test_auto_without_validation_cases_exports_the_model_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "pairs.csv"  # every user has 2 events: nothing to validate on
    log.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + k) % 12},{1000 + k}\n" for u in range(40) for k in range(2)
    ))  # fmt: skip
    out = cli(
        capsys, "train", "--data", str(log), "--action-col", "item_id", "--out", str(tmp_path / "a"),
        "--quiet", "--threads", "1", "--epochs", "1", "--embedding-dim", "4", "--hidden-dim", "4",
        "--no-step", "--knn-blend", "auto",
    )  # fmt: skip
    blend = out["knn_blend"]
    assert (blend["beta"], blend["chosen"], blend["exported"], blend["mode"]) == (0.0, False, False, "auto")
    assert "auto, with no validation cases to choose it on" in (tmp_path / "a" / "report.md").read_text()
    model, _ = load_checkpoint(tmp_path / "a")
    assert not isinstance(model, KnnBlend)


def test_int8_quantizes_the_recurrent_output_layer_of_a_blend(blend_artifact: Path, tmp_path: Path) -> None:
    from training.quantize import quantize_artifact

    spec = quantize_artifact(blend_artifact, tmp_path / "int8")  # behind its own gate against the float graph
    assert spec.scheme == "int8" and spec.top10_overlap >= 0.9
    m = read_manifest(tmp_path / "int8")
    assert m.quantization is not None and m.step is not None
    ids = np.array([[5, 9, 3, 0]], dtype=np.int64)
    (p,) = open_session(tmp_path / "int8" / MODEL_FILE).run(
        None, {"action_ids": ids, "lengths": np.array([3])}
    )
    assert abs(float(p.sum()) - 1.0) < 1e-5 and p[0, PAD_ID] == p[0, UNK_ID] == 0


def test_the_recent_views_are_the_bench_scorer_as_a_distribution() -> None:
    from bench.repeats import recent_views as bench_recent_views
    from training.knn_blend import RECENT_DECAY, recent_views

    rng = np.random.default_rng(4)
    ids = rng.integers(UNK_ID, 9, size=(6, 12))  # (B, T): few actions, so they repeat; UNK included
    lengths = np.array([12, 9, 2, 1, 0, 30])  # full, short, only the last event, empty, beyond T
    ids[np.arange(12)[None, :] >= np.minimum(lengths, 12)[:, None]] = PAD_ID
    template = torch.zeros(6, 9, dtype=torch.float64)
    got = recent_views(torch.from_numpy(ids), torch.from_numpy(lengths), template).numpy()
    scorer = bench_recent_views(9, 12, RECENT_DECAY, skip_last=True)
    want = scorer([row[: min(n, 12)] for row, n in zip(ids, lengths, strict=True)])
    total = want.sum(axis=1, keepdims=True)
    want = np.divide(want, total, out=np.zeros_like(want), where=total > 0)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.allclose(got[[0, 1, 5]].sum(axis=1), 1.0) and not got[[3, 4]].any()  # nothing to score: 0


def _repeat_log(path: Path, users: int = 120, items: int = 60, seed: int = 5) -> Path:
    """Users who come back to what they viewed a few events before (never the last one) half the time."""
    rng = np.random.default_rng(seed)
    rows = ["user_id,item_id,timestamp"]
    for user in range(users):
        seq: list[int] = []
        for step in range(int(rng.integers(8, 16))):
            back = seq[-6:-1]
            item = int(rng.choice(back)) if back and rng.random() < 0.5 else int(rng.integers(0, items))
            seq.append(item)
            rows.append(f"u{user},i{item},{1_700_000_000 + 60 * step}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def recent_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A tiny blend trained with --knn-blend auto on a log of repeated views, and train's JSON answer."""
    tmp = tmp_path_factory.mktemp("recent-views")
    out = tmp / "a"
    argv = [
        "train", "--data", str(_repeat_log(tmp / "views.csv")), "--action-col", "item_id", "--out", str(out),
        "--quiet", "--threads", "1", "--epochs", "1", "--window", "10", "--embedding-dim", "8",
        "--hidden-dim", "8", "--knn-blend", "auto",
    ]  # fmt: skip
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return out, json.loads(buffer.getvalue())


def test_auto_adds_the_recent_views_where_targets_repeat_and_the_graph_is_the_mixture(
    recent_artifact: tuple[Path, dict[str, Any]],
) -> None:
    out, trained = recent_artifact
    blend = trained["knn_blend"]
    assert blend["repeats"] > 0.2 and blend["gamma"] > 0 and blend["exported"]  # chosen on validation
    assert {(row["beta"], row["gamma"]) for row in blend["validation"]} >= {
        (0.0, 0.0),
        (0.0, 0.9),
        (0.5, 0.5),
    }
    best = max(row["ndcg@10"] for row in blend["validation"])
    assert max(r["ndcg@10"] for r in blend["validation"] if r["gamma"] == 0) < best  # the views pay here
    model, _ = load_checkpoint(out)
    assert isinstance(model, KnnBlend) and (model.beta, model.gamma) == (blend["beta"], blend["gamma"])
    manifest = read_manifest(out)
    assert manifest.step is not None and manifest.step.history == "history"  # both parity gates passed
    rng = np.random.default_rng(6)
    ids = rng.integers(2, 12, size=(5, 10))  # a few actions: windows with repeats
    lengths = np.array([10, 7, 3, 1, 0])
    ids[np.arange(10)[None, :] >= lengths[:, None]] = PAD_ID
    (got,) = open_session(out / MODEL_FILE).run(None, {"action_ids": ids, "lengths": lengths})
    with torch.inference_mode():
        want = model(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)  # renormalised: still probabilities
    assert (
        "gamma" in (out / "report.md").read_text()
        and "| beta | best gamma |" in (out / "report.md").read_text()
    )


@pytest.mark.anyio
async def test_the_service_serves_the_recent_views_blend_from_either_graph(
    recent_artifact: tuple[Path, dict[str, Any]], redis_url: str
) -> None:
    out, _ = recent_artifact
    m = read_manifest(out)
    stream = _stream(m.vocabulary, 14, seed=7)
    batches = [[e] for e in stream[:-3]] + [stream[-3:]]  # past the window of 10, then a batch of 3
    for on, off in await _twins(out, redis_url, batches):
        _assert_same(on, off)


def test_choose_beta_with_the_recent_views_scores_every_pair_and_keeps_the_two_part_figures() -> None:
    from training.knn_blend import MIXTURES, repeats

    rng = np.random.default_rng(8)
    seqs = []
    for _ in range(80):  # half of each user's events revisit one of the four before the last
        s = [int(rng.integers(2, 30))]
        for _ in range(int(rng.integers(6, 12))):
            back = s[-5:-1]
            s.append(int(rng.choice(back)) if back and rng.random() < 0.5 else int(rng.integers(2, 30)))
        seqs.append(s)
    log = EventLog.from_sequences([[str(a) for a in s] for s in seqs])
    split = Split(leave_one_out(log), [np.array(s, dtype=np.int64) for s in seqs])
    cases = split.cases("validation")
    assert repeats(split, cases, 10) > 0.2
    torch.manual_seed(0)
    model = NextActionModel(ModelConfig(vocab_size=30, embedding_dim=6, hidden_dim=8, window=10)).eval()
    prior = KnnPrior.fit(split.train_sequences(), 30, 10)
    _, _, two = choose_beta(model, prior, split, cases, "ndcg@10")
    _, gamma, three = choose_beta(model, prior, split, cases, "ndcg@10", recent=True)
    assert [(r["beta"], r["gamma"]) for r in three] == list(MIXTURES) and (0.0, 1.0) not in MIXTURES
    assert [r for r in three if r["gamma"] == 0] == two  # gamma 0: exactly the two-part search
    assert gamma > 0 and max(r["ndcg@10"] for r in three) > max(r["ndcg@10"] for r in two)
    with pytest.raises(ValueError, match="gamma"):
        KnnBlend(model, prior, 0.0, 1.0)  # the recent views alone score nothing on a one-event window


def test_a_checkpoint_from_before_the_recent_views_loads_with_gamma_0(
    blend_artifact: Path, tmp_path: Path
) -> None:
    payload = torch.load(blend_artifact / "checkpoint.pt", map_location="cpu", weights_only=True)
    del payload["knn_blend"]["gamma"]
    torch.save(payload, tmp_path / "checkpoint.pt")
    model, _ = load_checkpoint(tmp_path)
    assert isinstance(model, KnnBlend) and (model.beta, model.gamma) == (BETA, 0.0)


def test_the_sampled_protocol_does_not_search_the_recent_views(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = cli(
        capsys, "train", "--data", str(_repeat_log(tmp_path / "views.csv")), "--action-col", "item_id",
        "--out", str(tmp_path / "a"), "--quiet", "--threads", "1", "--epochs", "1", "--window", "10",
        "--embedding-dim", "8", "--hidden-dim", "8", "--knn-blend", "auto", "--protocol", "sampled",
        "--no-refit", "--no-step",
    )  # fmt: skip
    blend = out["knn_blend"]  # its negatives are never in the window: every gamma > 0 would look better
    assert blend["repeats"] > 0.2 and blend["gamma"] == 0
    assert {row["gamma"] for row in blend["validation"]} == {0.0}
