"""`python -m app`, plus a count of the micro-batcher's batch sizes written to a JSON file.

    python bench/batch_probe.py OUT.json      # same environment (NEXTACT_*) as python -m app

The count chains onto the batcher's own on_batch hook (one dict update per batch, nothing per request) and
is written every 0.25 s, so the benchmark can take the difference over each phase. Used by bench/run.py
until the service exposes its nextact_inference_batch_size histogram on /metrics.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def install(out: Path) -> None:
    from app import batching

    sizes: Counter[int] = Counter()
    original = batching.Batcher.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        inner = getattr(self, "_on_batch", None)

        def record(size: int, seconds: float) -> None:
            sizes[size] += 1
            if inner is not None:
                inner(size, seconds)

        self._on_batch = record

    batching.Batcher.__init__ = init  # type: ignore[method-assign]

    def dump() -> None:
        tmp = out.with_suffix(".tmp")
        while True:
            time.sleep(0.25)
            tmp.write_text(json.dumps({str(k): v for k, v in sorted(sizes.copy().items())}))
            os.replace(tmp, out)

    threading.Thread(target=dump, name="bench-batch-probe", daemon=True).start()


def main() -> None:
    install(Path(sys.argv[1]))
    sys.argv = [sys.argv[0]]
    runpy.run_module("app", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
