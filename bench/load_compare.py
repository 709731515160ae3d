"""Loading one CSV with the columnar path and with the row-by-row path it replaced (tests/legacy_data.py).

    python bench/load_compare.py --events 1e6          # a synthetic log written as CSV, item_id as the action

Each load runs in a fresh process; prints seconds and peak RSS (the imports included) for both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load(path: Path, which: str) -> dict[str, float]:
    from training.config import DataOptions

    if which == "legacy":
        from tests.legacy_data import load_events
    else:
        from training.events import load_events  # type: ignore[assignment]
    t0 = time.perf_counter()
    events = load_events(DataOptions(path=path, action_cols=("item_id",)))
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "events": events.rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=lambda s: int(float(s)), default=1_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/nextact-train-scale"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    path = args.work / f"synth_{args.events}.csv"
    if args.child:
        print(json.dumps(load(path, args.child)))
        return 0
    if not path.exists():
        import pyarrow as pa
        import pyarrow.csv as pacsv

        from bench.synth_log import BEHAVIORS, generate

        args.work.mkdir(parents=True, exist_ok=True)
        columns = generate(args.events)
        columns["behavior"] = BEHAVIORS[columns["behavior"]]
        pacsv.write_csv(pa.table(columns), path)
    for which in ("columnar", "legacy"):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--events",
                str(args.events),
                "--work",
                str(args.work),
                "--child",
                which,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        print(which, done.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
