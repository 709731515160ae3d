"""A synthetic event log at any size, written as Parquet, with the skew of real logs and no internet needed.

    python bench/synth_log.py --events 10_000_000 --out /tmp/synth_10m.parquet
    python bench/synth_log.py --events 100_000_000 --out /tmp/synth_100m --parts 10   # a directory, 10 files

Columns as in the Taobao UserBehavior log: user_id, item_id, category_id (int64), behavior (pv/cart/fav/buy,
89/6/3/2 %), timestamp (int64 epoch seconds over 9 days). The skew:
- actions: item popularity is Zipf (exponent --zipf) over --items items (default: events / 25);
- users: activity is long-tailed (log-normal events per user, at least 3), --users users (default: events / 100);
- sequences: a share of events repeat one of the user's last five items (--repeat), a share follow an
  item-to-item transition of the previous item (--transition: each item has 4 likely successors);
- with --category-steps, a share go to an item of the previous item's category (Zipf-popular within it): a
  log where the category says what the sparse items cannot (`train --side-col category_id`,
  docs/model-quality.md). Then every step is exactly one kind (the shares add up to at most 1) and follows
  the item actually before it; without it the log is the original one, where a later kind may overwrite an
  earlier one;
- categories: item i is in category (31 i) mod (items / 200), about 200 items each (--category-steps refuses
  a count that is a multiple of 31, where that formula merges categories);
- time: each user starts at a random moment and waits an exponential gap (mean 20 min, less for the most
  active users so that every history fits in the 9 days) between events;
- rows are written in time order (as exports are), with --duplicates of them repeated exactly; with --parts
  each file holds its own users (a user-partitioned export), generated one at a time in bounded memory.
Everything is numpy, vectorised: about a second per million events on one core.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

BEHAVIORS = np.array(["pv", "cart", "fav", "buy"])
BEHAVIOR_SHARE = np.array([0.89, 0.06, 0.03, 0.02])
START = 1_511_539_200  # 2017-11-25T00:00:00Z
SPAN = 9 * 86_400


def user_lengths(rng: np.random.Generator, events: int, users: int) -> np.ndarray:
    """(U,) events per user: log-normal activity (a few heavy users, many light ones), >= 3, summing to events."""
    weights = rng.lognormal(mean=0.0, sigma=1.2, size=users)
    lengths = 3 + np.floor(weights / weights.sum() * (events - 3 * users)).astype(np.int64)
    short = events - int(lengths.sum())  # rounding: hand the rest to random users
    np.add.at(lengths, rng.integers(0, users, size=short), 1)
    return lengths


def zipf_items(rng: np.random.Generator, n: int, items: int, exponent: float) -> np.ndarray:
    """(n,) item indices drawn with popularity 1 / rank**exponent; rank r is a shuffled item id."""
    cdf = np.cumsum(1.0 / np.arange(1, items + 1) ** exponent)
    ranks = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    return rng.permutation(items)[np.minimum(ranks, items - 1)]


def successor(item: np.ndarray, k: np.ndarray | int, items: int) -> np.ndarray:
    """Successor k (0..3) of each item: the item-to-item transitions of the log."""
    return (item * 7919 + 104_729 * k) % items


def log_stats(columns: dict[str, np.ndarray], items: int) -> dict[str, float]:
    """What a generated log holds: the items that occur, events per item, and the shares of each user's
    consecutive events that stay in a category or follow one of the item's four successors."""
    users = columns["user_id"]
    order = np.lexsort((np.arange(len(users)), users))  # per user, in file (time) order
    users, item, category = users[order], columns["item_id"][order] - 1_000_000, columns["category_id"][order]
    pairs = users[1:] == users[:-1]
    follows = np.zeros(len(pairs), dtype=bool)
    for k in range(4):
        follows |= item[1:] == successor(item[:-1], k, items)
    _, counts = np.unique(item, return_counts=True)
    return {
        "rows": len(users),
        "items_occurring": len(counts),
        "median_events_per_item": float(np.median(counts)),
        "share_of_items_seen_once": round(float((counts == 1).mean()), 4),
        "same_category_pairs": round(float(((category[1:] == category[:-1]) & pairs).sum() / pairs.sum()), 4),
        "successor_pairs": round(float((follows & pairs).sum() / pairs.sum()), 4),
    }


def _chained(
    rng: np.random.Generator,
    popular: np.ndarray,
    position: np.ndarray,
    items: int,
    categories: int,
    zipf: float,
    repeat: float,
    transition: float,
    category_steps: float,
) -> np.ndarray:
    """(E,) items where each step is exactly one kind, drawn once: a repeat of one of the last five items
    (share `repeat`), a successor of the item before it (`transition`), an item of that item's category,
    Zipf-popular within it (`category_steps`), or the popularity draw `popular` (the rest). Every kind follows
    the item actually before it in the final sequence: a vectorised fixed point, each pass settling one more
    step of every chain (a user's first event is always a popularity draw, so it ends)."""
    if repeat + transition + category_steps > 1:
        raise ValueError(
            f"--repeat {repeat} + --transition {transition} + --category-steps {category_steps} exceed 1"
        )
    if math.gcd(31, categories) != 1:
        raise ValueError(
            f"{categories} categories (items / 200) is a multiple of 31: category_id (31 i mod it) would merge "
            "them; choose another --items"
        )
    n = len(popular)
    u, lag = rng.random(n), rng.integers(1, 6, n)
    which, pick = rng.integers(0, 4, n), rng.random(n)
    kind = np.select(
        [u < repeat, u < repeat + transition, u < repeat + transition + category_steps], [1, 2, 3], 0
    )
    kind[(kind == 1) & (position < lag)] = 0  # no earlier item that far back: a popularity draw
    kind[position == 0] = 0
    back = np.arange(n) - np.where(kind == 1, lag, 0)
    # popularity within a category: its k-th item (k = 0, 1, ...) is the (k + 1)-th most popular
    cdf = np.cumsum(1.0 / np.arange(1, -(-items // categories) + 1) ** zipf)
    item = popular.copy()
    while True:
        prev = np.roll(item, 1)
        residue = prev % categories  # an item's category is its residue: (31 i) mod categories
        slots = (items - 1 - residue) // categories + 1  # (E,) items in that category
        rank = np.minimum(np.searchsorted(cdf, pick * cdf[slots - 1]), slots - 1)
        settled = np.select(
            [kind == 1, kind == 2, kind == 3],
            [item[back], successor(prev, which, items), residue + categories * rank],
            popular,
        )
        if np.array_equal(settled, item):
            return item
        item = settled


def generate(
    events: int,
    users: int | None = None,
    items: int | None = None,
    zipf: float = 1.05,
    repeat: float = 0.25,
    transition: float = 0.3,
    duplicates: float = 0.001,
    seed: int = 0,
    first_user: int = 0,
    category_steps: float = 0.0,
) -> dict[str, np.ndarray]:
    """The columns of a synthetic log, in time order; user ids start at 100_000 + first_user."""
    rng = np.random.default_rng(seed)
    users = users or max(1, events // 100)
    items = items or max(10, events // 25)
    lengths = user_lengths(rng, events, users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    owner = np.repeat(np.arange(users, dtype=np.int64), lengths)  # (E,)
    position = np.arange(events) - offsets[owner]  # (E,) index within the user's sequence

    item = zipf_items(rng, events, items, zipf)
    categories = max(1, items // 200)
    if category_steps > 0:
        item = _chained(rng, item, position, items, categories, zipf, repeat, transition, category_steps)
    else:  # the original log, kept draw for draw (every log made without --category-steps is unchanged)
        # item-to-item transitions: successor k of the previous item, k in 0..3
        follows = (rng.random(events) < transition) & (position > 0)
        for _ in range(2):  # two passes: a transition after a transition mostly follows the chain too
            prev = np.roll(item, 1)
            item = np.where(follows, successor(prev, rng.integers(0, 4, events), items), item)
        # repeats: one of the user's last five items again
        lag = rng.integers(1, 6, events)
        repeats = (rng.random(events) < repeat) & (position >= lag)
        src = np.flatnonzero(repeats)
        item[src] = item[src - lag[src]]

    mean_gap = np.minimum(1200.0, 0.5 * SPAN / lengths)  # (U,) heavy users act more often: all fit in 9 days
    gaps = rng.exponential(1.0, events) * mean_gap[owner]
    gaps[offsets[:-1]] = rng.random(users) * SPAN * 0.5  # each user's first event: a random start
    clock = np.cumsum(gaps)
    clock -= np.repeat(clock[offsets[:-1]] - gaps[offsets[:-1]], lengths)  # restart the sum per user
    timestamp = START + np.minimum(clock, SPAN - 1).astype(np.int64)
    behavior = rng.choice(len(BEHAVIORS), size=events, p=BEHAVIOR_SHARE).astype(np.int8)

    dup = np.flatnonzero(rng.random(events) < duplicates)  # rows repeated exactly, elsewhere in the file
    keep = np.concatenate([np.arange(events), dup])
    order = keep[np.argsort(timestamp[keep], kind="stable")]  # written in time order
    return {
        "user_id": 100_000 + first_user + owner[order],
        "item_id": 1_000_000 + item[order],
        "category_id": 5_000 + (item[order] * 31) % categories,
        "behavior": behavior[order],
        "timestamp": timestamp[order],
    }


def write_parts(events: int, out: Path, parts: int, seed: int = 0, **skew: float) -> list[Path]:
    """A log of `events` events as a directory of `parts` Parquet files, each generated on its own (its own
    users, the shared item catalogue, time order within the file): memory for one part at a time."""
    out.mkdir(parents=True, exist_ok=True)
    users, items = max(1, events // 100), max(10, events // 25)
    per_users = -(-users // parts)
    written = []
    for k in range(parts):
        n = events // parts + (1 if k < events % parts else 0)
        columns = generate(n, per_users, items, seed=seed + k, first_user=k * per_users, **skew)  # type: ignore[arg-type]
        written += write(columns, out / f"part-{k:03d}.parquet")
    return written


def write(columns: dict[str, np.ndarray], out: Path, parts: int = 1) -> list[Path]:
    """Parquet: one file, or `parts` files in the directory `out` (the usual export layout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(columns["user_id"])
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    if parts > 1:
        out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(parts):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        table = pa.table(
            {
                "user_id": pa.array(columns["user_id"][lo:hi]),
                "item_id": pa.array(columns["item_id"][lo:hi]),
                "category_id": pa.array(columns["category_id"][lo:hi]),
                "behavior": pa.DictionaryArray.from_arrays(
                    pa.array(columns["behavior"][lo:hi]), pa.array(BEHAVIORS.tolist())
                ),
                "timestamp": pa.array(columns["timestamp"][lo:hi]),
            }
        )
        path = out / f"part-{k:03d}.parquet" if parts > 1 else out
        pq.write_table(table, path, row_group_size=1 << 20)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=lambda s: int(float(s)), required=True, help="events before duplicates")
    p.add_argument("--out", type=Path, required=True, help="a .parquet file, or a directory with --parts > 1")
    p.add_argument(
        "--parts", type=int, default=1, help="Parquet files in the --out directory, each with its own users"
    )
    p.add_argument("--users", type=int, default=None, help="(default: events / 100)")
    p.add_argument("--items", type=int, default=None, help="(default: events / 25)")
    p.add_argument("--zipf", type=float, default=1.05, help="item popularity exponent (default: 1.05)")
    p.add_argument("--repeat", type=float, default=0.25, help="share of repeated items (default: 0.25)")
    p.add_argument("--transition", type=float, default=0.3, help="share of item-to-item steps (default: 0.3)")
    p.add_argument("--duplicates", type=float, default=0.001, help="share of exact duplicate rows")
    p.add_argument(
        "--category-steps",
        type=float,
        default=0.0,
        help="share of steps to an item of the previous item's category (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    skew = {
        "zipf": args.zipf,
        "repeat": args.repeat,
        "transition": args.transition,
        "duplicates": args.duplicates,
        "category_steps": args.category_steps,
    }
    if args.parts > 1:
        paths = write_parts(args.events, args.out, args.parts, args.seed, **skew)
        print(f"{args.out}: {len(paths)} files in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 0
    columns = generate(args.events, args.users, args.items, seed=args.seed, **skew)  # type: ignore[arg-type]
    t1 = time.perf_counter()
    write(columns, args.out)
    print(
        f"{len(columns['user_id']):,} rows -> {args.out}: generated in {t1 - t0:.1f} s, "
        f"written in {time.perf_counter() - t1:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
