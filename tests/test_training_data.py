"""training.tables / events / vocab / splits / windows: reading every format, clear errors, no leakage."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.manifest import PAD_ID, PAD_TOKEN, UNK_ID, UNK_TOKEN
from training.config import DataOptions
from training.errors import DataError
from training.events import EventLog, load_events
from training.splits import Split, leave_one_out, time_cut
from training.vocab import Vocabulary
from training.windows import history_batch, training_batches, training_windows

ROWS = [  # user, item, behavior, timestamp (out of order on purpose)
    ("u1", "i1", "pv", 30),
    ("u1", "i2", "cart", 10),
    ("u2", "i1", "pv", 5),
    ("u1", "i3", "buy", 20),
    ("u2", "i2", "fav", 5),
]
EXPECTED_U1 = ["cart", "buy", "pv"]  # u1 sorted by time
EXPECTED_U2 = ["pv", "fav"]  # equal times: file order


def _write(
    path: Path,
    rows: Sequence[tuple[object, ...]],
    header: tuple[str, ...] = ("user_id", "item_id", "behavior", "timestamp"),
) -> Path:
    fmt = path.suffix
    if fmt in (".csv", ".tsv"):
        sep = "," if fmt == ".csv" else "\t"
        lines = [sep.join(header)] + [sep.join("" if v is None else str(v) for v in r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == ".jsonl":
        path.write_text(
            "".join(json.dumps(dict(zip(header, r, strict=True))) + "\n" for r in rows), encoding="utf-8"
        )
    else:
        pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
    return path


def _actions(events: EventLog) -> list[list[str]]:
    return [events.user_actions(u) for u in range(len(events.users))]


def _load(path: Path, **kw: object) -> EventLog:
    kw.setdefault("action_cols", ("behavior",))
    return load_events(DataOptions(path=path, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_reads_cleans_and_sorts(tmp_path: Path, suffix: str) -> None:
    events = _load(_write(tmp_path / f"log{suffix}", ROWS))
    assert events.users == ["u1", "u2"]
    assert _actions(events) == [EXPECTED_U1, EXPECTED_U2]
    assert events.user_times(0) == [10.0, 20.0, 30.0]
    assert events.rows == 5 and events.time_col == "timestamp"


def test_action_columns_are_joined_and_iso_times_parse(tmp_path: Path) -> None:
    rows = [("u", "i9", "pv", "2017-11-25T10:00:00Z"), ("u", "i8", "buy", "2017-11-25T09:00:00+00:00")]
    events = _load(_write(tmp_path / "log.csv", rows), action_cols=("behavior", "item_id"))
    assert _actions(events) == [["buy:i8", "pv:i9"]]
    assert events.time_span() == ("2017-11-25T09:00:00Z", "2017-11-25T10:00:00Z")


def test_without_time_column_file_order_is_time_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "log.csv", [(r[0], r[1], r[2]) for r in ROWS], header=("user_id", "item_id", "behavior")
    )
    events = _load(path)
    assert events.time_col is None
    assert _actions(events) == [["pv", "cart", "buy"], ["pv", "fav"]]
    assert events.time_span() == (None, None)


def test_missing_values_dropped_and_exact_duplicates_removed(tmp_path: Path) -> None:
    rows = [*ROWS, ("u1", "i1", "pv", 30), ("", "i1", "pv", 1), ("u3", "i1", None, 1), ("u1", "i4", "pv", 30)]
    events = _load(_write(tmp_path / "log.csv", rows))
    assert events.dropped_duplicates == 1 and events.dropped_missing == 2
    assert events.user_actions(0) == ["cart", "buy", "pv", "pv"]  # a different item at the same time is kept
    assert events.rows_read == 9


def test_missing_column_lists_available_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", ROWS)
    with pytest.raises(DataError) as e:
        _load(path, action_cols=("action",))
    msg = str(e.value)
    assert str(path) in msg and "'action'" in msg
    assert "available columns: user_id, item_id, behavior, timestamp" in msg


def test_named_time_column_must_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'when' not found"):
        _load(_write(tmp_path / "log.csv", ROWS), time_col="when", time_col_required=True)


@pytest.mark.parametrize("suffix, where", [(".csv", "line 4"), (".jsonl", "line 3"), (".parquet", "row 3")])
def test_unreadable_timestamp_names_file_line_column_and_value(
    tmp_path: Path, suffix: str, where: str
) -> None:
    rows = [(r[0], r[1], r[2], str(r[3])) for r in ROWS]
    rows[2] = ("u2", "i1", "pv", "yesterday")
    path = _write(tmp_path / f"log{suffix}", rows)
    with pytest.raises(DataError) as e:
        _load(path)
    msg = str(e.value)
    assert f"{path}: {where}: column 'timestamp'" in msg and "'yesterday'" in msg


def test_malformed_lines_are_named(tmp_path: Path) -> None:
    csv_path = tmp_path / "ragged.csv"
    csv_path.write_text("user_id,behavior,timestamp\nu,pv,1\nu,pv\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ragged.csv: line 3: 2 fields, the header has 3"):
        _load(csv_path)
    json_path = tmp_path / "bad.jsonl"
    json_path.write_text('{"user_id": "u", "behavior": "pv"}\n{"user_id": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        _load(json_path)
    with pytest.raises(DataError, match=r"unsupported file extension '.xlsx'"):
        _load(tmp_path / "log.xlsx")
    with pytest.raises(DataError, match="file not found"):
        _load(tmp_path / "absent.csv")
    parquet_path = tmp_path / "fake.parquet"
    parquet_path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(DataError, match="fake.parquet: not a readable Parquet file"):
        _load(parquet_path)


def test_vocabulary_reserves_pad_and_unk_and_folds_rare_actions() -> None:
    vocab = Vocabulary.build([["a", "b", "a", "c"], ["a", "b", PAD_TOKEN]], min_count=2)
    assert vocab.tokens == [PAD_TOKEN, UNK_TOKEN, "a", "b"]  # c seen once: folded into <unk>
    assert vocab.encode(["a", "c", "never", "b", PAD_TOKEN]).tolist() == [2, UNK_ID, UNK_ID, 3, UNK_ID]
    assert vocab.decode([2, 3]) == ["a", "b"]
    with pytest.raises(DataError, match="at least --min-count=5"):
        Vocabulary.build([["a"]], min_count=5)
    with pytest.raises(DataError, match="must start with"):
        Vocabulary(["a", "b", "c"])


def _log(sequences: list[list[str]], times: list[list[float]] | None = None) -> EventLog:
    times = times or [[float(i) for i in range(len(s))] for s in sequences]
    return EventLog.from_sequences(sequences, times)


def test_leave_one_out_boundaries() -> None:
    log = _log([list("abcde"), list("ab"), list("abc")])
    b = leave_one_out(log)
    assert b.train_end.tolist() == [3, 2, 1] and b.val_end.tolist() == [4, 2, 2]
    actions = [log.user_actions(u) for u in range(len(log.users))]
    vocab = Vocabulary.build([a[:e] for a, e in zip(actions, b.train_end, strict=True)])
    split = Split(b, [vocab.encode(a) for a in actions])
    test = split.cases("test")
    assert test.users.tolist() == [0, 2] and test.positions.tolist() == [4, 2]
    assert vocab.decode(split.history(0, 4).tolist()) == ["a", "b", "c", "<unk>"]  # "d" only validates
    assert vocab.decode(test.targets.tolist()) == ["<unk>", "c"]  # "e" never occurs in training


sequences = st.lists(st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(sequences, st.sampled_from(["leave-one-out", "time"]), st.data())
def test_no_split_leaks_a_target_into_training_or_its_inputs(
    seqs: list[list[str]], name: str, data: st.DataObject
) -> None:
    times = [sorted(data.draw(st.lists(st.integers(0, 30), min_size=len(s), max_size=len(s)))) for s in seqs]
    log = _log(seqs, [[float(t) for t in ts] for ts in times])
    times = [[float(t) for t in ts] for ts in times]
    try:
        b = leave_one_out(log) if name == "leave-one-out" else time_cut(log, 0.2, 0.2)
    except DataError:
        return  # too few distinct times for a time cut: refused, not leaked
    split = Split(b, [np.arange(len(s)) + 100 * u for u, s in enumerate(seqs)])  # every event a unique id
    trained = {int(x) for s in split.train_sequences() for x in s}
    latest_train = max((times[u][e - 1] for u, e in enumerate(b.train_end) if e), default=-1.0)
    for part in ("validation", "test"):
        cases = split.cases(part)
        for u, p, target in zip(cases.users, cases.positions, cases.targets, strict=True):
            assert int(target) not in trained  # never trained on
            inputs = split.history(int(u), int(p))
            assert int(target) not in inputs.tolist() and len(inputs) == p  # only events before it
            assert all(times[u][i] <= times[u][p] for i in range(p))
            if name == "time":
                assert times[u][p] > latest_train  # after every training event
    if name == "leave-one-out":
        assert len(split.cases("test")) == sum(len(s) >= 3 for s in seqs)


def test_training_windows_make_every_later_event_a_target_once() -> None:
    seq = np.arange(2, 25)  # 23 events
    chunks = training_windows([seq, np.array([5]), np.array([6, 7])], window=5)
    targets = sorted(int(t) for c in chunks for t in c[1:])
    assert targets == sorted([*range(3, 25), 7])
    assert max(len(c) for c in chunks) == 6
    batches = list(training_batches(chunks, 3, np.random.default_rng(0)))
    assert sum(len(x) for x, _ in batches) == len(chunks)
    for x, y in batches:
        assert x.shape == y.shape and x.dtype == np.int64
        assert np.all((x == PAD_ID) == (y == PAD_ID))  # right padding lines up


def test_history_batch_keeps_the_last_window_events_right_padded() -> None:
    ids, lengths = history_batch([np.arange(2, 12), np.array([], dtype=np.int64), np.array([4])], window=4)
    assert lengths.tolist() == [4, 0, 1]
    assert ids.tolist() == [[8, 9, 10, 11], [0, 0, 0, 0], [4, 0, 0, 0]]
