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

Inline calls (inline_max_s > 0): a request that finds every batcher of its app idle (the batchers share an
InlineGate: nothing queued, no call in an inference thread, no call ended and no request arrived in the last
2x this batcher's latest call) runs at once on the event loop's own thread, provided that latest call took
at most inline_max_s. The first call always goes to the inference thread (its cost is unknown until then),
and a failed call never makes the next one look cheaper. At light load that saves the two thread hand-offs
(loop -> inference thread -> loop) and their wake-ups; the loop is blocked for one short model call while
it runs. Under load the batcher is rarely idle that long, so requests keep going to the inference thread.

On the loop (on_loop=True): every batch runs on the event loop's own thread, never in the inference thread: the
worker takes what is queued when it gets its turn of the loop (every request that arrived in the loop's
previous turns) and calls the model there. One thread does everything, so no two threads of the service
compete for a core or the interpreter lock, and nothing is handed off; a request arriving during a call waits
for the loop's next turn. For machines whose cores are shared with Redis and other processes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

LOOP_MAX_CPUS = (
    2.0  # NEXTACT_INFERENCE_ON=auto runs batches on the loop up to this many usable CPUs per worker
)


def usable_cpus(
    cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max"), cgroup_v1: Path = Path("/sys/fs/cgroup/cpu")
) -> float:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (`docker run --cpus`, a
    Kubernetes CPU limit): cgroup v2's cpu.max, else cgroup v1's cpu.cfs_quota_us / cpu.cfs_period_us."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = float(os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1: -1 means no quota
            quota = (cgroup_v1 / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup_v1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus  # no quota readable: the affinity stands
    try:
        if quota not in ("max", "-1") and int(period) > 0:
            cpus = min(cpus, int(quota) / int(period))
    except ValueError:
        pass
    return cpus


def choose_inference_on(setting: str, provider: str, cpus: float) -> tuple[str, str]:
    """(`thread` or `loop`, why) for NEXTACT_INFERENCE_ON=`setting`, the model on `provider`, `cpus` per worker.

    auto picks `loop` where one inference thread would compete with the event loop, Redis and the rest for
    a core (at most LOOP_MAX_CPUS usable CPUs, the model on the CPU; measured in docs/performance.md, stages 6
    and 7), and `thread` where it can run beside the loop (more cores) or waits on a device (a GPU)."""
    if setting != "auto":
        return setting, "set by NEXTACT_INFERENCE_ON"
    if provider != "CPUExecutionProvider":
        return "thread", f"auto: the model runs on {provider}, the loop goes on while it computes"
    if cpus <= LOOP_MAX_CPUS:
        return (
            "loop",
            f"auto: {cpus:g} usable CPUs per worker (at most {LOOP_MAX_CPUS:g}), the model on the CPU",
        )
    return (
        "thread",
        f"auto: {cpus:g} usable CPUs per worker (more than {LOOP_MAX_CPUS:g}), the model on the CPU",
    )


T = TypeVar("T")
R = TypeVar("R")


class BatchError(Exception):
    """A batch's model call failed; every request in that batch gets one of these."""


class BatcherClosed(BatchError):
    """The batcher was shut down before this request ran."""


Stamps = tuple[float, float, float, float, float]


class InlineGate:
    """Whether a request may run on the event loop's thread, shared by every batcher of one app (one loop):
    an inline call blocks the loop, so it needs every batcher idle, not just its own."""

    def __init__(self) -> None:
        self.in_flight = 0  # calls running in any of the batchers' inference threads
        self.last_submit = 0.0  # perf_counter of the latest request to any of them
        self.last_end = 0.0  # perf_counter when the latest call of any of them ended
        self.members: list[Batcher[Any, Any]] = []


class Batcher(Generic[T, R]):
    """Coalesces `submit(item)` calls into `run(items) -> results` calls made in a worker thread."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        max_size: int = 64,
        max_wait_s: float = 0.0015,
        on_batch: Callable[[int, float, bool], None] | None = None,
        name: str = "nextact-infer",
        inline_max_s: float = 0.0,
        gate: InlineGate | None = None,
        on_loop: bool = False,
    ) -> None:
        if max_size < 1 or max_wait_s < 0 or inline_max_s < 0:
            raise ValueError(
                "batcher needs max_size >= 1, max_wait_s >= 0 and inline_max_s >= 0, "
                f"got {max_size}, {max_wait_s}, {inline_max_s}"
            )
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.inline_max_s = inline_max_s
        self.on_loop = on_loop
        self.inlined = 0  # calls made on the loop's thread (counted in batches too)
        self._gate = gate if gate is not None else InlineGate()
        self._gate.members.append(self)
        # the latest call's duration (s); unknown (never inline) until one has run in the inference thread
        self._last_cost = math.inf
        self._run = run
        self._on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.batches = 0  # model calls made
        self.batched = 0  # requests they served (batched / batches = mean batch size)
        self._queue: deque[tuple[T, asyncio.Future[tuple[R, Stamps]], float]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its own result (or its batch's BatchError)."""
        return (await self.submit_timed(item))[0]

    async def submit_timed(self, item: T) -> tuple[R, Stamps]:
        """submit(item), with the stamps of the call that served it (perf_counter when the loop handed it
        off, when the inference thread started and ended it, when the loop had the result back; and the
        thread's CPU seconds in it): the stage timings. An inline call's hand-off and return are zero."""
        if self._closed:
            raise BatcherClosed("the inference batcher is shut down")
        if self._inline_now():
            return self._call_inline(item)
        if self.max_size == 1 and not self.on_loop:
            results, stamps = await self._call([item])
            return results[0], stamps
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="nextact-batcher")
        future: asyncio.Future[tuple[R, Stamps]] = asyncio.get_running_loop().create_future()
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
        """Records this arrival; True when every batcher of the gate is idle: nothing queued, nothing in an
        inference thread, and neither a call's end nor a request's arrival in the last 2x this batcher's
        latest call (so a busy loop - many arrivals, e.g. at saturation - never blocks on a model call)."""
        gate = self._gate
        now, arrived = time.perf_counter(), gate.last_submit
        gate.last_submit = now
        if not self.inline_max_s or gate.in_flight or self._last_cost > self.inline_max_s:
            return False
        if any(b._queue for b in gate.members):
            return False
        quiet = 2 * self._last_cost
        return now - gate.last_end >= quiet and now - arrived >= quiet

    def _call_inline(self, item: T) -> tuple[R, Stamps]:
        """One request's model call on the loop's thread (the batchers are idle: see _inline_now)."""
        try:
            results, stamps = self._call_on_loop([item])
        except BatchError as e:
            log.error("%s", e)
            raise
        return results[0], stamps

    def _call_on_loop(self, items: list[T]) -> tuple[Sequence[R], Stamps]:
        """One model call on the loop's own thread; hand-off and return are zero."""
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            results = self._run(items)
        except Exception as e:
            self._failed(start)
            raise BatchError(f"inference failed for a batch of {len(items)}: {type(e).__name__}: {e}") from e
        ended = time.perf_counter()
        stamps = (start, start, ended, ended, time.thread_time() - cpu)
        self._account(len(items), results, stamps, inline=True)
        self.inlined += 1
        return results, stamps

    async def _call(self, items: list[T]) -> tuple[Sequence[R], Stamps]:
        start = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._timed_run, items)
        self._gate.in_flight += 1  # until the thread is done, whether or not its caller still waits
        future.add_done_callback(self._thread_done)
        try:
            results, (began, ended, cpu) = await asyncio.shield(future)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._failed(start)
            raise BatchError(f"inference failed for a batch of {len(items)}: {type(e).__name__}: {e}") from e
        stamps = (start, began, ended, time.perf_counter(), cpu)
        self._account(len(items), results, stamps)
        return results, stamps

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self._gate.in_flight -= 1

    def _failed(self, start: float) -> None:
        """A failed call: its end counts, and it never makes the next call look cheaper."""
        now = time.perf_counter()
        self._gate.last_end = now
        self._last_cost = max(self._last_cost, now - start)

    def _account(self, n: int, results: Sequence[R], stamps: Stamps, inline: bool = False) -> None:
        if len(results) != n:
            raise BatchError(f"inference returned {len(results)} results for a batch of {n}")
        start, began, ended, returned, _ = stamps
        self._gate.last_end = returned
        self._last_cost = ended - began
        self.batches += 1
        self.batched += n
        if self._on_batch is not None:
            self._on_batch(n, returned - start, inline)

    def _timed_run(self, items: list[T]) -> tuple[Sequence[R], tuple[float, float, float]]:
        """self._run(items) in the inference thread, with its start, end and thread CPU time."""
        began, cpu = time.perf_counter(), time.thread_time()
        results = self._run(items)
        return results, (began, time.perf_counter(), time.thread_time() - cpu)

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
            items = [item for item, _, _ in batch]
            try:
                results, stamps = self._call_on_loop(items) if self.on_loop else await self._call(items)
            except BatchError as e:
                log.error("%s", e)
                _fail(futures, e)
            except asyncio.CancelledError:
                _fail(futures, BatcherClosed("the service shut down while the prediction was running"))
                raise
            else:
                for future, result in zip(futures, results, strict=True):
                    if not future.done():
                        future.set_result((result, stamps))
            if self.on_loop:
                await asyncio.sleep(0)  # the answers out and new requests in before the next batch

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


def _fail(futures: list[asyncio.Future[Any]], error: BatchError) -> None:
    """Give each waiting caller its own copy of the error (one exception object must not be raised twice)."""
    for future in futures:
        if not future.done():
            copy = type(error)(str(error))
            copy.__cause__ = error.__cause__
            future.set_exception(copy)
