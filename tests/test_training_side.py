"""Side information (`train --side-col`): the action -> value mapping, training through it, and the fold that
leaves the exported graphs and the manifest exactly those of a plain model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from app.manifest import STEP_FILE, read_manifest
from tests.conftest import EXAMPLES
from tests.test_training_train import _cyclic_split
from tests.training_cli import cli, cli_error
from training.checkpoint import CHECKPOINT_FILE, load_checkpoint
from training.config import DataOptions, ModelConfig, TrainConfig
from training.ensemble import EnsembleModel
from training.errors import DataError
from training.events import load_events
from training.knn_blend import KnnBlend, KnnPrior
from training.model import NextActionModel
from training.side import fold, side_info
from training.train import fit, seed_everything
from training.vocab import Vocabulary


def _log(tmp_path: Path) -> Path:
    rows = [
        ("u1", "a", "pv", "Y", 1), ("u1", "b", "pv", "Y", 2), ("u1", "a", "pv", "Y", 3), ("u1", "c", "pv", "", 4),
        ("u2", "a", "buy", "X", 1), ("u2", "b", "pv", "Y", 2), ("u2", "d", "pv", "Y", 3),
        ("u2", "e", "pv", "Z", 4), ("u2", "e", "pv", "W", 5), ("", "a", "pv", "X", 6), ("", "a", "pv", "X", 7),
        ("u3", "f", "pv", "W", 1), ("u3", "g", "pv", "Z", 2), ("u3", "g", "pv", "Y", 2),
    ]  # fmt: skip
    path = tmp_path / "log.csv"
    lines = "".join(f"{u},{i},{b},{c},{t}\n" for u, i, b, c, t in rows)
    path.write_text("user_id,item_id,behavior,category_id,timestamp\n" + lines)
    return path


def test_each_action_gets_its_most_frequent_value_and_bad_columns_are_named(tmp_path: Path) -> None:
    path = _log(tmp_path)
    options = DataOptions(path=path, action_cols=("item_id",), side_col="category_id")
    events = load_events(options)  # the side column is read in the same pass as the events
    # an exact duplicate is equal in every column, with or without --side-col: u3's two g rows at time 2
    # differ in their category, so both are events
    assert events.side is not None and events.rows == 12 and events.dropped_duplicates == 0
    assert load_events(dataclasses.replace(options, side_col=None)).rows == events.rows
    vocab = Vocabulary.build([["a", "b", "a", "c", "a", "b", "e", "f", "g"]])  # d is not in it: unknown
    info = side_info(options, vocab, events)
    side = dict(zip(vocab.tokens, info.side_of, strict=True))
    assert side["<pad>"] == 0 and side["<unk>"] == 0 and side["c"] == 0  # c has no category
    # a: Y twice over X once (the two X rows without a user are dropped, as training drops them)
    assert side["a"] == side["b"] >= 1
    # ties go to the value first in the file: e has Z and W once each, and gets Z (row 8, before W);
    # g has Z and Y once each, and gets Y (row 1), though g's own rows show Z first
    assert side["e"] not in (0, side["a"], side["f"])
    assert side["g"] == side["a"]
    assert info.values == 3 and info.covered == 5 and info.conflicting == 3  # a (Y, X), e (Z, W), g (Z, Y)
    # several action columns: the tokens are the training ones ("a:pv", "a:buy")
    joined = DataOptions(path=path, action_cols=("item_id", "behavior"), side_col="category_id")
    pairs = side_info(joined, Vocabulary.build([["a:pv", "a:buy", "b:pv"]]), load_events(joined))
    by_token = dict(zip(["<pad>", "<unk>", "a:pv", "a:buy", "b:pv"], pairs.side_of, strict=True))
    assert by_token["a:pv"] == by_token["b:pv"] != by_token["a:buy"] and min(pairs.side_of[2:]) >= 1
    for column, what in [("category", "'category' not found"), ("item_id", "an action column"),
                         ("user_id", "the user column"), ("timestamp", "the time column")]:  # fmt: skip
        with pytest.raises(DataError, match=what) as e:
            load_events(dataclasses.replace(options, side_col=column))
        assert "--side-col" in str(e.value)
    with pytest.raises(DataError, match="no value on any row"):
        side_info(options, Vocabulary.build([["c"]]), events)
    with pytest.raises(ValueError, match="loaded with options.side_col"):
        side_info(options, vocab, load_events(dataclasses.replace(options, side_col=None)))
    empty = tmp_path / "empty.csv"
    empty.write_text("user_id,item_id,category_id\nu1,a,\nu1,b,\n")
    with pytest.raises(DataError, match="'category_id' has no values"):
        load_events(dataclasses.replace(options, path=empty, time_col=None))


@pytest.mark.parametrize("tied", [True, False])
def test_fold_keeps_every_output_and_drops_the_side_tables(tied: bool) -> None:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=9,
        embedding_dim=4,
        hidden_dim=6,
        dropout=0.0,
        window=5,
        tied=tied,
        side_of=(0, 0, 1, 1, 2, 2, 3, 0, 3),
    )
    model = NextActionModel(config).eval()
    with torch.no_grad():  # the side tables start at zero: give them values the fold has to carry
        model.side.weight.normal_()  # type: ignore[union-attr]
        if model.side_out is not None:
            model.side_out.weight.normal_()
    ids, lengths = torch.tensor([[2, 5, 8, 0], [3, 4, 6, 7]]), torch.tensor([3, 4])
    before = model(ids, lengths)
    plain = fold(model)
    assert isinstance(plain, NextActionModel) and plain.side is None and plain.config.side_of is None
    assert torch.allclose(plain(ids, lengths), before, atol=1e-6)
    assert not torch.allclose(NextActionModel(plain.config).eval()(ids, lengths), before)  # not by chance
    if tied:
        assert plain.head.weight is plain.embedding.weight  # still one table
    ensemble = fold(EnsembleModel([model, model]))
    assert torch.allclose(ensemble(ids, lengths), before, atol=1e-6)
    prior = KnnPrior.fit([np.array([2, 3, 4, 5]), np.array([5, 6, 7, 8, 3])], 9, 5)
    blend = KnnBlend(model, prior, 0.3, 0.1).eval()
    folded = fold(blend)
    assert isinstance(folded, KnnBlend) and folded.config.side_of is None and folded.model.side is None
    assert torch.allclose(folded(ids, lengths), blend(ids, lengths), atol=1e-6)


def test_each_action_starts_near_its_side_value_and_training_moves_the_side_table() -> None:
    split = _cyclic_split()
    side_of = (0, 0, 1, 1, 1, 1, 2, 2, 2, 2)  # two categories over the cycle's actions 2..9
    config = ModelConfig(
        vocab_size=10, embedding_dim=8, hidden_dim=16, dropout=0.0, window=10, side_of=side_of
    )
    seed_everything(3)  # as fit() does before it builds the model: the same initial tables
    start = NextActionModel(config)
    own, side = start.embedding.weight.detach(), start.side.weight.detach()  # type: ignore[union-attr]
    assert float(own.norm(dim=1)[2:].mean()) < 0.5 * float(side.norm(dim=1)[1:].mean())  # the category first
    assert float(own[0].abs().sum()) == 0 and float(side[0].abs().sum()) == 0  # padding stays zero
    result = fit(split, config, TrainConfig(epochs=3, lr=0.03, patience=3, quiet=True, seed=3))
    learned = result.model.side
    assert learned is not None and not torch.allclose(learned.weight.detach(), side)  # trained
    assert float(learned.weight.detach()[0].abs().sum()) == 0  # the "no value" row stays zero


def test_train_with_side_col_exports_a_plain_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "side"
    result = cli(
        capsys, "train", "--data", str(EXAMPLES / "taobao_sample.csv"), "--out", str(out), "--quiet",
        "--preset", "none", "--action-col", "item_id", "--side-col", "category_id", "--window", "8",
        "--epochs", "2", "--embedding-dim", "8", "--hidden-dim", "8", "--tied", "--seed", "1",
    )  # fmt: skip
    assert result["side"]["column"] == "category_id" and result["side"]["values"] > 10
    assert result["model"]["side_of"] is None  # folded: nothing of it in the artifact's description
    manifest = read_manifest(out)
    assert manifest.step is not None and (out / STEP_FILE).is_file()
    assert manifest.step.parity_max_abs_diff <= 1e-5 and result["parity_max_abs_diff"] <= 1e-5
    saved = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["config"]
    assert "side_of" not in saved and "side_own_scale" not in saved  # as earlier versions wrote and read it
    model, vocab = load_checkpoint(out / CHECKPOINT_FILE)
    assert isinstance(model, NextActionModel) and model.side is None and len(vocab) == manifest.vocab_size
    assert "side information: column `category_id`" in (out / "report.md").read_text()
    err = cli_error(
        capsys, "train", "--data", str(EXAMPLES / "taobao_sample.csv"), "--out", str(tmp_path / "bad"),
        "--quiet", "--action-col", "item_id", "--side-col", "categories",
    )  # fmt: skip
    assert "'categories' not found" in err and "category_id" in err
    err = cli_error(
        capsys, "train", "--data", str(EXAMPLES / "taobao_sample.csv"), "--out", str(tmp_path / "bad"),
        "--quiet", "--action-col", "item_id", "--side-own-scale", "0.5",
    )  # fmt: skip
    assert "--side-own-scale applies to --side-col" in err
    err = cli_error(
        capsys, "train", "--data", str(EXAMPLES / "taobao_sample.csv"), "--out", str(tmp_path / "bad"),
        "--quiet", "--action-col", "item_id", "--side-col", "category_id", "--side-own-scale", "0",
    )  # fmt: skip
    assert "--side-own-scale must be in (0, 10], got 0" in err
    assert np.isfinite(result["metrics"]["full"]["model"]["hr@10"])


def test_the_generated_log_can_carry_its_signal_in_the_category() -> None:
    """bench/synth_log.py --category-steps: the log stage 10 measures side information on
    (docs/model-quality.md). Each step is one kind and follows the item actually before it; without the
    option the log is exactly the one earlier versions generated."""
    import hashlib

    from bench.synth_log import generate, log_stats

    def shares(columns: dict[str, np.ndarray], items: int) -> tuple[float, float]:
        stats = log_stats(columns, items)
        return stats["same_category_pairs"], stats["successor_pairs"]

    plain = generate(20_000, users=1_000, items=4_000, repeat=0.0, transition=0.0, duplicates=0.0)
    assert shares(plain, 4_000)[0] < 0.1  # 20 categories: 1 in 20 by chance
    steps = generate(20_000, users=1_000, items=4_000, repeat=0.0, transition=0.3, duplicates=0.0,
                     category_steps=0.5)  # fmt: skip
    same, successor = shares(steps, 4_000)
    assert 0.5 < same < 0.6 and 0.27 < successor < 0.33  # 0.5 and 0.3 of the steps, plus chance
    by_item: dict[int, set[int]] = {}
    for item, category in zip(steps["item_id"].tolist(), steps["category_id"].tolist(), strict=True):
        by_item.setdefault(item, set()).add(category)
    assert all(len(c) == 1 for c in by_item.values())  # an item's category is fixed: catalogue data
    with pytest.raises(ValueError, match="exceed 1"):
        generate(2_000, transition=0.7, category_steps=0.5)
    with pytest.raises(ValueError, match="multiple of 31"):
        generate(2_000, items=31 * 200, repeat=0.0, category_steps=0.5)
    # the default log, pinned: the digest of what commit adba72f (before --category-steps) generates
    digest = hashlib.sha256()
    for name, column in sorted(generate(3_000, seed=0).items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(column).tobytes())
    assert digest.hexdigest() == "6c8391a27b44a481d9488182a2a3716ec02f543bc8017097c7370b47d410075e"


def test_the_category_is_learned_where_it_carries_the_signal(tmp_path: Path) -> None:
    """On a generated log where half the steps stay in the previous item's category and items are sparse, the
    model with the category column predicts the validation targets better (lower cross-entropy) than the same
    model without it, from the same seed: the side table is trained and used, not just carried."""
    from bench.synth_log import generate, write
    from training.pipeline import prepare

    path = tmp_path / "log.parquet"
    write(generate(20_000, users=1_000, items=6_000, repeat=0.0, transition=0.0, category_steps=0.5), path)
    options = DataOptions(path=path, action_cols=("item_id",), side_col="category_id")
    events, split, vocabulary = prepare(options)
    side = side_info(options, vocabulary, events)
    assert side.values == 30 and side.covered == len(vocabulary) - 2
    losses = {}
    for name, side_of in [("plain", None), ("side", side.side_of)]:
        config = ModelConfig(
            vocab_size=len(vocabulary), embedding_dim=16, hidden_dim=16, window=20, tied=True, side_of=side_of
        )
        result = fit(split, config, TrainConfig(epochs=2, patience=2, quiet=True, seed=0, threads=1))
        losses[name] = min(e.val_loss for e in result.epochs)
    # knowing the category among 30 is worth up to ln(30) = 3.4 nats on a category step, 1.7 averaged over all
    assert losses["side"] < losses["plain"] - 0.2, losses
