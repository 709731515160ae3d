"""Micro-batching: concurrent predictions in one process become one model call, run off the event loop.

Policy, per batch:
- the worker takes what is queued (up to max_size);
- a lone request runs at once (no added latency when the service is idle or lightly used);
- when several are already queued, the batch waits for more until the oldest has waited max_wait
  or max_size are queued, whichever comes first;
- the batch runs in a dedicated thread, and each caller's future gets its own row, in order;
- an exception fails that batch's callers only (as BatchError naming the cause); the worker carries on.

While a batch runs, new requests queue up, so under load batches grow by themselves and the wait rarely
applies. max_size == 1 turns batching off: every request is its own call in the same thread.

Inline calls (inline_max_s > 0): a request that finds the batcher idle - nothing queued, no call running,
no call ended and no request arrived in the last 2x the latest call's duration - runs at once on the event
loop's own thread, provided that latest call took at most inline_max_s. At light load that saves the two thread hand-offs
(loop -> inference thread -> loop) and their wake-ups; the loop is blocked for one short model call while
it runs. Under load the batcher is rarely idle that long, so requests keep going to the inference thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchError(Exception):
    """A batch's model call failed; every request in that batch gets one of these."""


class BatcherClosed(BatchError):
    """The batcher was shut down before this request ran."""


class Batcher(Generic[T, R]):
    """Coalesces `submit(item)` calls into `run(items) -> results` calls made in a worker thread."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        max_size: int = 64,
        max_wait_s: float = 0.0015,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "nextact-infer",
        inline_max_s: float = 0.0,
    ) -> None:
        if max_size < 1 or max_wait_s < 0 or inline_max_s < 0:
            raise ValueError(
                "batcher needs max_size >= 1, max_wait_s >= 0 and inline_max_s >= 0, "
                f"got {max_size}, {max_wait_s}, {inline_max_s}"
            )
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.inline_max_s = inline_max_s
        self.inlined = 0  # calls made on the loop's thread (counted in batches too)
        self._running = False  # a call is in the inference thread
        self._last_end = 0.0  # perf_counter when the latest call ended
        self._last_cost = 0.0  # its duration (s)
        self._last_submit = 0.0  # perf_counter of the latest request's arrival
        self._run = run
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.batches = 0  # model calls made
        self.batched = 0  # requests they served (batched / batches = mean batch size)
        # the latest model call (stage timings): perf_counter when the loop handed it off, when the inference
        # thread started and ended it, when the loop had the result back; and the thread's CPU seconds in it
        self.last_call = (0.0, 0.0, 0.0, 0.0, 0.0)
        self._thread_span = (0.0, 0.0, 0.0)
        self._queue: deque[tuple[T, asyncio.Future[R], float]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its own result (or its batch's BatchError)."""
        if self._closed:
            raise BatcherClosed("the inference batcher is shut down")
        if self._inline_now():
            return self._call_inline(item)
        if self.max_size == 1:
            return (await self._call([item]))[0]
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="nextact-batcher")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, time.monotonic()))
        self._arrived.set()
        return await future

    async def close(self) -> None:
        """Stop the worker, fail whatever has not run, and wait for the running batch's thread to finish."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        _fail(
            [f for _, f, _ in self._queue], BatcherClosed("the service shut down before the prediction ran")
        )
        self._queue.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def _inline_now(self) -> bool:
        """Idle: nothing queued or running, and neither a call's end nor a request's arrival in the last 2x
        the latest call's duration (so a busy loop - many arrivals, e.g. at saturation - never blocks on one)."""
        now, arrived = time.perf_counter(), self._last_submit
        self._last_submit = now
        if not self.inline_max_s or self._running or self._queue or self._last_cost > self.inline_max_s:
            return False
        quiet = 2 * self._last_cost
        return now - self._last_end >= quiet and now - arrived >= quiet

    def _call_inline(self, item: T) -> R:
        """One request's model call on the loop's thread (the batcher is idle: see _inline_now)."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            results = self._run([item])
        except Exception as e:
            self._last_end, self._last_cost = time.perf_counter(), 0.0
            error = BatchError(f"inference failed for a batch of 1: {type(e).__name__}: {e}")
            log.error("%s", error)
            raise error from e
        ended = time.perf_counter()
        self.inlined += 1
        self._account(1, results, (start, start, ended, ended, time.thread_time() - cpu))
        return results[0]

    async def _call(self, items: list[T]) -> Sequence[R]:
        start = time.perf_counter()
        self._running = True
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._timed_run, items)
        except Exception as e:
            self._last_end, self._last_cost = time.perf_counter(), 0.0
            raise BatchError(f"inference failed for a batch of {len(items)}: {type(e).__name__}: {e}") from e
        finally:
            self._running = False
        began, ended, cpu = self._thread_span
        self._account(len(items), results, (start, began, ended, time.perf_counter(), cpu))
        return results

    def _account(
        self, n: int, results: Sequence[R], stamps: tuple[float, float, float, float, float]
    ) -> None:
        if len(results) != n:
            raise BatchError(f"inference returned {len(results)} results for a batch of {n}")
        # read by each caller as it resumes: they resume before the next call can end (FIFO callbacks)
        self.last_call = stamps
        start, began, ended, returned, _ = stamps
        self._last_end, self._last_cost = returned, ended - began
        self.batches += 1
        self.batched += n
        if self._on_batch is not None:
            self._on_batch(n, returned - start)

    def _timed_run(self, items: list[T]) -> Sequence[R]:
        """self._run(items) in the inference thread, stamped (read by the loop once the call's future is done)."""
        began, cpu = time.perf_counter(), time.thread_time()
        results = self._run(items)
        self._thread_span = (began, time.perf_counter(), time.thread_time() - cpu)
        return results

    async def _work(self) -> None:
        queue = self._queue
        while True:
            while not queue:
                self._arrived.clear()
                await self._arrived.wait()
            if 1 < len(queue) < self.max_size and self.max_wait_s > 0:
                await self._fill(deadline=queue[0][2] + self.max_wait_s)
            batch = [queue.popleft() for _ in range(min(self.max_size, len(queue)))]
            batch = [entry for entry in batch if not entry[1].done()]  # callers that gave up (cancelled)
            if not batch:
                continue
            futures = [future for _, future, _ in batch]
            try:
                results = await self._call([item for item, _, _ in batch])
            except BatchError as e:
                log.error("%s", e)
                _fail(futures, e)
            except asyncio.CancelledError:
                _fail(futures, BatcherClosed("the service shut down while the prediction was running"))
                raise
            else:
                for future, result in zip(futures, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    async def _fill(self, deadline: float) -> None:
        """Wait until max_size are queued or the deadline passes."""
        while len(self._queue) < self.max_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                return


def _fail(futures: list[asyncio.Future[R]], error: BatchError) -> None:
    """Give each waiting caller its own copy of the error (one exception object must not be raised twice)."""
    for future in futures:
        if not future.done():
            copy = type(error)(str(error))
            copy.__cause__ = error.__cause__
            future.set_exception(copy)
