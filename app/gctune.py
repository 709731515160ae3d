"""Garbage-collector tuning for a serving process: freeze the start-up heap, collect young objects less often.

After start-up the heap holds the model, FastAPI's routes and pydantic's schemas: hundreds of thousands of
long-lived objects that a generation-2 collection walks in full, mid-request (300 ms pauses measured under
load, see docs/performance.md). `gc.freeze()` moves them to the permanent generation, which no collection
walks; a higher generation-0 threshold makes the per-request garbage (dicts, coroutines, futures) cost fewer,
not longer, collections, since nearly all of it is freed by reference counting before a collection runs.
Cycles are still collected: only less often.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# gen-0 every 50,000 net allocations (the default is 700); gen-1 every 20 gen-0 runs, gen-2 every 100 gen-1
# runs (the defaults are 10 and 10). Measured against the default in docs/performance.md ("GC").
THRESHOLD = (50_000, 20, 100)

_holders = 0  # lifespans in this process that hold the tuning (tests run several apps in one process)
_saved: tuple[int, int, int] | None = None
_collected = False  # the full collection before the first freeze: once per process (~1 s with torch)


@contextmanager
def frozen_heap(threshold: tuple[int, int, int] = THRESHOLD) -> Iterator[None]:
    """Collect (once per process), freeze what survives, raise the thresholds; undo when the last holder exits."""
    global _holders, _saved, _collected
    if _holders == 0:
        _saved = gc.get_threshold()
    _holders += 1
    if not _collected:
        gc.collect()
        _collected = True
    gc.freeze()
    gc.set_threshold(*threshold)
    log.debug("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), threshold)
    try:
        yield
    finally:
        _holders -= 1
        if _holders == 0:
            assert _saved is not None
            gc.set_threshold(*_saved)
            gc.unfreeze()  # back into the oldest generation: what the app held can be collected again
