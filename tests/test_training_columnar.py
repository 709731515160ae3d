"""The columnar data path equals today's row-by-row path (tests/legacy_data.py) on every data set we have:
the same users, events, times, counts, errors, splits and vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import legacy_data
from training.config import DataOptions
from training.errors import DataError
from training.events import EventLog, load_events
from training.pipeline import prepare
from training.splits import make_boundaries
from training.vocab import Vocabulary

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: The real data sets (see their README), beside the checkout in CI and one level up in a worktree.
SHARED = next(
    (p for p in (ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data") if p.is_dir()), None
)


def assert_same_log(new: EventLog, old: legacy_data.LegacyLog) -> None:
    assert list(new.users) == old.users
    assert new.lengths.tolist() == [len(a) for a in old.actions]
    assert [new.tokens[c] for c in new.actions.tolist()] == [a for seq in old.actions for a in seq]
    assert new.times.tolist() == [t for seq in old.times for t in seq]
    assert (new.rows, new.rows_read, new.dropped_missing, new.dropped_duplicates) == (
        old.rows,
        old.rows_read,
        old.dropped_missing,
        old.dropped_duplicates,
    )
    assert new.time_col == old.time_col and new.time_span() == old.time_span()
    assert new.distinct_actions() == old.distinct_actions()


def assert_same_everything(options: DataOptions, min_count: int = 1) -> None:
    """Log, split boundaries, vocabulary and encoded sequences of both paths."""
    old = legacy_data.load_events(options)
    assert_same_log(load_events(options), old)
    _, split, vocab = prepare(options, min_count=min_count)
    train_end, val_end, lengths = legacy_data.legacy_boundaries(
        old, options.split, options.val_fraction, options.test_fraction
    )
    b = split.boundaries
    assert b.train_end.tolist() == train_end.tolist() and b.val_end.tolist() == val_end.tolist()
    assert b.lengths.tolist() == lengths.tolist()
    old_vocab = Vocabulary.build((a[:e] for a, e in zip(old.actions, train_end, strict=True)), min_count)
    assert vocab.tokens == old_vocab.tokens
    assert split.ids.tolist() == [i for seq in old.actions for i in old_vocab.encode(seq).tolist()]


SAMPLES = [
    ("beauty_sample.csv", ("item_id",), "leave-one-out", 1),
    ("taobao_sample.csv", ("behavior",), "leave-one-out", 1),
    ("taobao_sample.csv", ("item_id",), "time", 2),
    ("taobao_sample.csv", ("behavior", "category_id"), "time", 1),
]


@pytest.mark.parametrize("name, cols, split, min_count", SAMPLES)
def test_examples_load_split_and_encode_as_before(
    name: str, cols: tuple[str, ...], split: str, min_count: int
) -> None:
    options = DataOptions(path=EXAMPLES / name, action_cols=cols, split=split)  # type: ignore[arg-type]
    assert_same_everything(options, min_count)


REAL = [
    ("amazon_beauty.csv", ("item_id",), "leave-one-out"),
    ("amazon_beauty.csv", ("item_id",), "time"),
    ("amazon_sports.csv", ("item_id",), "leave-one-out"),
    ("amazon_toys.csv", ("item_id",), "leave-one-out"),
    ("movielens_100k.csv", ("item_id",), "time"),
    ("taobao_user_behavior_sample.csv", ("behavior",), "leave-one-out"),
    ("taobao_user_behavior_sample.csv", ("behavior", "item_id"), "time"),
]


@pytest.mark.parametrize("name, cols, split", REAL)
def test_real_data_sets_load_split_and_encode_as_before(name: str, cols: tuple[str, ...], split: str) -> None:
    if SHARED is None or not (SHARED / name).is_file():
        pytest.skip(f"{name}: the shared data directory (../shared/data beside the checkout) is not here")
    assert_same_everything(DataOptions(path=SHARED / name, action_cols=cols, split=split))  # type: ignore[arg-type]


ROWS = [  # user, item, behavior, timestamp: out of order, ties, a duplicate, missing values, padding spaces
    ("u1", "i1", "pv", "30"),
    ("u1", "i2", "cart", "10"),
    ("u2", "i1", "pv", "5"),
    (" u1", "i3", "buy", "20"),
    ("u2", "i2", "fav", "5"),
    ("u1", "i1", "pv", "30"),
    ("", "i1", "pv", "1"),
    ("u3", "i1", "", "1"),
    ("u1", "i4", "pv", "30"),
    ("u3", "007", " pv ", "2017-11-25T10:00:00Z"),
    ("u3", "007", "pv", "1511604000"),
    ("u2", "i1", "pv", "5"),
]
HEADER = ("user_id", "item_id", "behavior", "timestamp")


def _write(path: Path, rows: list[tuple[object, ...]], header: tuple[str, ...] = HEADER) -> Path:
    fmt = path.suffix
    if fmt in (".csv", ".tsv"):
        sep = "," if fmt == ".csv" else "\t"
        lines = [sep.join(header)] + [sep.join("" if v is None else str(v) for v in r) for r in rows]
        path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    elif fmt == ".jsonl":
        objs = [{h: v for h, v in zip(header, r, strict=True) if v != ""} for r in rows]
        path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    else:
        cols = {h: [None if r[i] == "" else r[i] for r in rows] for i, h in enumerate(header)}
        pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("cols", [("behavior",), ("behavior", "item_id")])
def test_every_format_cleans_like_the_row_by_row_reader(
    tmp_path: Path, suffix: str, cols: tuple[str, ...]
) -> None:
    path = _write(tmp_path / f"log{suffix}", ROWS)
    for time_col in ("timestamp", None):
        options = DataOptions(path=path, action_cols=cols, time_col=time_col)
        assert_same_log(load_events(options), legacy_data.load_events(options))


def test_numeric_parquet_columns_and_a_directory_of_parquet_files(tmp_path: Path) -> None:
    table = pa.table(
        {
            "user_id": pa.array([7, 7, 8, 7, 8], pa.int64()),
            "item_id": pa.array([12.0, 3.5, None, 12.0, 4.0]),
            "timestamp": pa.array([3, 1, 2, 3, 1], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "one.parquet")
    options = DataOptions(path=tmp_path / "one.parquet", action_cols=("item_id",))
    assert_same_log(load_events(options), legacy_data.load_events(options))
    events = load_events(options)
    assert events.user_actions(0) == ["3.5", "12"] and events.dropped_duplicates == 1
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 2), parts / "a.parquet")
    pq.write_table(table.slice(2), parts / "b.parquet")
    from_dir = load_events(DataOptions(path=parts, action_cols=("item_id",)))
    assert from_dir.actions.tolist() == events.actions.tolist() and list(from_dir.users) == ["7", "8"]


BAD = [  # rows, suffix: the columnar path must name the same file, line/row, column and value
    ([("u", "i", "pv", "1"), ("u", "i", "pv", "yesterday")], ".csv"),
    ([("u", "i", "pv", "1"), ("u", "i", "pv", "nan")], ".csv"),
    ([("u", "i", "pv", "1"), ("u", "i", "pv", "")], ".csv"),
    ([("u", "i", "pv", "x"), ("u", "i", "pv", "")], ".csv"),
    ([("u", "i", "pv", "1"), ("u", "i", "pv", "yesterday")], ".jsonl"),
    ([("u", "i", "pv", "1"), ("u", "i", "pv", "yesterday")], ".parquet"),
    ([("u", "i", "pv", 1), ("u", "i", "pv", float("inf"))], ".parquet"),
]


@pytest.mark.parametrize("rows, suffix", BAD)
def test_bad_values_give_the_same_error(tmp_path: Path, rows: list[tuple[object, ...]], suffix: str) -> None:
    path = _write(tmp_path / f"bad{suffix}", rows)
    options = DataOptions(path=path, action_cols=("behavior",))
    with pytest.raises(DataError) as old:
        legacy_data.load_events(options)
    with pytest.raises(DataError) as new:
        load_events(options)
    assert str(new.value) == str(old.value)


@pytest.mark.parametrize(
    "text",
    [
        "user_id,behavior,timestamp\nu,pv,1\n\nu,pv\n",
        'user_id,behavior,timestamp\nu,pv,1\nu,"pv\nmore",2\nu,pv,3,4\n',
        "user_id,behavior,timestamp\nu,pv,1\nu,\xff,2\n",
        "",
    ],
)
def test_malformed_text_gives_the_same_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(
        text.encode("utf-8", "surrogateescape") if "\xff" not in text else text.encode("latin-1")
    )
    options = DataOptions(path=path, action_cols=("behavior",))
    with pytest.raises(DataError) as old:
        legacy_data.load_events(options)
    with pytest.raises(DataError) as new:
        load_events(options)
    assert str(new.value) == str(old.value)


def test_split_boundaries_use_the_flat_times() -> None:
    log = EventLog.from_sequences([list("abcde"), list("ab")], [[1, 2, 3, 4, 5], [1, 6]])
    b = make_boundaries(log, DataOptions(path=Path("m"), split="time", val_fraction=0.2, test_fraction=0.2))
    assert b.train_end.tolist() == [3, 1] and b.val_end.tolist() == [4, 1]


def test_a_synthetic_log_with_ties_and_duplicates_loads_as_before(tmp_path: Path) -> None:
    from bench.synth_log import generate, write

    (path,) = write(
        generate(20_000, users=150, items=400, duplicates=0.02, seed=3), tmp_path / "synth.parquet"
    )
    for cols in (("item_id",), ("behavior", "category_id")):
        options = DataOptions(path=path, action_cols=cols)
        old = legacy_data.load_events(options)
        assert old.dropped_duplicates > 100  # the test exercises de-duplication
        assert_same_log(load_events(options), old)
