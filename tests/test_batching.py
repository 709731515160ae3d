"""The micro-batcher: coalescing, the wait bound, no wait when alone, failure isolation, result order, shutdown."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from app.batching import (
    Batcher,
    BatcherClosed,
    BatchError,
    InlineGate,
    choose_inference_on,
    usable_cpus,
)

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch function that doubles numbers, records batch sizes and threads, and can block or fail."""

    def __init__(self, block_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.block_s = block_s

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        if self.block_s:
            time.sleep(self.block_s)
        return [2 * i for i in items]


async def test_a_lone_request_runs_at_once() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=64, max_wait_s=0.5)
    try:
        start = time.perf_counter()
        assert await batcher.submit(21) == 42
        assert time.perf_counter() - start < 0.25  # no max_wait added
        assert await batcher.submit(5) == 10
    finally:
        await batcher.close()
    assert run.batches == [[21], [5]]


async def test_requests_arriving_while_a_batch_runs_are_coalesced() -> None:
    run = Recorder(block_s=0.05)
    batcher = Batcher(run, max_size=64, max_wait_s=0.001)
    try:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)  # the first batch is now running in its thread
        rest = await asyncio.gather(*(batcher.submit(i) for i in range(2, 12)))
        assert await first == 2
    finally:
        await batcher.close()
    assert rest == [2 * i for i in range(2, 12)]  # each caller got its own row, in order
    assert run.batches == [[1], list(range(2, 12))]


async def test_concurrent_requests_wait_at_most_max_wait_for_company() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=64, max_wait_s=0.15)
    try:
        start = time.perf_counter()
        early = asyncio.gather(*(batcher.submit(i) for i in range(3)))  # queued together: the batch waits
        await asyncio.sleep(0.05)
        late = asyncio.gather(batcher.submit(3), batcher.submit(4))  # ... so these join it
        assert await early == [0, 2, 4]
        assert list(await late) == [6, 8]
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert run.batches == [[0, 1, 2, 3, 4]]
    assert 0.13 <= elapsed < 0.6


async def test_a_full_batch_does_not_wait() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=4, max_wait_s=0.3)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert results == [2 * i for i in range(8)]
    assert run.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert elapsed < 0.25


async def test_leftovers_after_full_batches_wait_only_until_the_deadline() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=4, max_wait_s=0.1)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        elapsed = time.perf_counter() - start
    finally:
        await batcher.close()
    assert results == [2 * i for i in range(10)]
    assert run.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert 0.08 <= elapsed < 0.5


async def test_a_failing_batch_fails_only_its_own_callers() -> None:
    run = Recorder(block_s=0.05)
    batcher = Batcher(run, max_size=64, max_wait_s=0.001)
    try:
        good = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        doomed = await asyncio.gather(batcher.submit(-1), batcher.submit(7), return_exceptions=True)
        assert await good == 2
        assert await batcher.submit(3) == 6  # the worker carries on
    finally:
        await batcher.close()
    assert run.batches == [[1], [-1, 7], [3]]
    for error in doomed:
        assert isinstance(error, BatchError)
        assert "inference failed for a batch of 2" in str(error)
        assert "ValueError: negative item in [-1, 7]" in str(error)
        assert isinstance(error.__cause__, ValueError)
    assert doomed[0] is not doomed[1]


async def test_a_wrong_number_of_results_is_an_error() -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: items[:-1], max_size=8, max_wait_s=0)
    try:
        with pytest.raises(BatchError, match="returned 0 results for a batch of 1"):
            await batcher.submit(1)
    finally:
        await batcher.close()


async def test_batch_size_one_turns_batching_off() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=1, max_wait_s=1.0)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        assert time.perf_counter() - start < 0.5
        with pytest.raises(BatchError, match="negative item"):
            await batcher.submit(-5)
    finally:
        await batcher.close()
    assert results == [2 * i for i in range(6)]
    assert all(len(b) == 1 for b in run.batches)


async def test_batches_run_in_a_worker_thread_and_the_loop_stays_free() -> None:
    run = Recorder(block_s=0.2)
    batcher = Batcher(run, max_size=8, max_wait_s=0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(ticker())
    try:
        assert await batcher.submit(4) == 8
    finally:
        task.cancel()
        await batcher.close()
    assert threading.current_thread().name not in run.threads
    assert ticks >= 5  # the event loop kept running while the model call blocked its thread


async def test_close_fails_queued_callers_and_refuses_new_ones() -> None:
    run = Recorder(block_s=0.1)
    batcher = Batcher(run, max_size=2, max_wait_s=0)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.02)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 6)]
    await asyncio.sleep(0)
    await batcher.close()
    outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
    assert all(isinstance(o, BatcherClosed) for o in outcomes), outcomes
    with pytest.raises(BatcherClosed):
        await batcher.submit(9)


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    run = Recorder(block_s=0.05)
    batcher = Batcher(run, max_size=8, max_wait_s=0.001)
    try:
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(2))
        stays = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()
        assert await first == 2
        assert await stays == 6
    finally:
        await batcher.close()
    assert run.batches == [[1], [3]]


async def test_inline_calls_run_on_the_loop_thread_only_when_the_batcher_is_idle() -> None:
    run = Recorder(block_s=0.005)
    batcher = Batcher(run, max_size=64, max_wait_s=0.001, inline_max_s=0.1, name="nextact-test")
    loop_thread = threading.current_thread().name
    try:
        assert await batcher.submit(1) == 2  # the first call's cost is unknown: the inference thread
        assert batcher.inlined == 0 and loop_thread not in run.threads
        await asyncio.sleep(0.05)  # idle for 10x the last call (5 ms)
        assert await batcher.submit(2) == 4  # idle: on this thread, at once
        assert batcher.inlined == 1 and loop_thread in run.threads
        await asyncio.sleep(0.05)
        # a burst: the first finds everything idle and blocks the loop for its call; the others arrive right
        # after it, so they queue for the inference thread and are coalesced there
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3, 9)))
        assert results == [2 * i for i in range(3, 9)]
        assert batcher.inlined == 2
        assert [3] in run.batches and [4, 5, 6, 7, 8] in run.batches
        await asyncio.sleep(0.05)
        with pytest.raises(BatchError, match="ValueError: negative item"):
            await batcher.submit(-1)  # inline too: the caller gets the BatchError
        await asyncio.sleep(0.05)
        assert await batcher.submit(9) == 18  # the batcher carries on, inline again
    finally:
        await batcher.close()
    # the failed call is in run.batches but not counted
    assert (batcher.inlined, batcher.batches, len(run.batches)) == (3, 5, 6)


async def test_no_inline_calls_after_a_slow_model_call() -> None:
    run = Recorder(block_s=0.03)
    batcher = Batcher(run, max_size=64, max_wait_s=0.001, inline_max_s=0.01, name="nextact-test")
    try:
        assert await batcher.submit(1) == 2
        await asyncio.sleep(0.1)
        assert await batcher.submit(2) == 4  # the last call took 30 ms > 10 ms: the inference thread
    finally:
        await batcher.close()
    assert batcher.inlined == 0
    assert run.batches == [[1], [2]] and all(n.startswith("nextact-test") for n in run.threads)


async def test_no_inline_call_while_another_batcher_of_the_app_is_in_its_thread() -> None:
    gate = InlineGate()
    slow, fast = Recorder(block_s=0.3), Recorder(block_s=0.001)
    a = Batcher(slow, max_size=8, max_wait_s=0, inline_max_s=1.0, gate=gate, name="nextact-a")
    b = Batcher(fast, max_size=8, max_wait_s=0, inline_max_s=1.0, gate=gate, name="nextact-b")
    try:
        assert await b.submit(1) == 2  # b's cost is known now (about 1 ms)
        busy = asyncio.ensure_future(a.submit(1))  # a's first call: 300 ms in its thread
        await asyncio.sleep(0.1)
        assert await b.submit(2) == 4  # b is idle, but the loop's other batcher has a call running
        assert b.inlined == 0
        assert await busy == 2
        await asyncio.sleep(0.05)
        assert await b.submit(3) == 6 and b.inlined == 1  # everything idle now
    finally:
        await a.close()
        await b.close()


async def test_a_call_left_by_a_cancelled_caller_still_blocks_inline_calls() -> None:
    def run(items: list[int]) -> list[int]:
        time.sleep(0.4 if 2 in items else 0.005)
        return [2 * i for i in items]

    batcher = Batcher(run, max_size=1, max_wait_s=0, inline_max_s=1.0, name="nextact-test")
    try:
        assert await batcher.submit(1) == 2  # the inference thread; its cost (5 ms) is known now
        left = asyncio.ensure_future(batcher.submit(2))  # right after a call: the thread, for 400 ms
        await asyncio.sleep(0.02)
        left.cancel()
        await asyncio.sleep(0.1)  # quiet for 20x the last call, but the cancelled call still runs
        assert await batcher.submit(3) == 6
        assert batcher.inlined == 0
    finally:
        await batcher.close()


async def test_on_loop_batches_run_on_the_loop_thread_and_coalesce_a_turns_arrivals() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=64, max_wait_s=0.0, on_loop=True)
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(1, 9)))
        again = await batcher.submit(10)
        with pytest.raises(BatchError, match="negative item"):
            await batcher.submit(-1)  # a failing batch fails its callers only; the worker carries on
        after = await batcher.submit(11)
    finally:
        await batcher.close()
    assert results == [2 * i for i in range(1, 9)] and (again, after) == (20, 22)
    assert run.threads == {threading.current_thread().name}  # never the inference thread
    assert run.batches[0] == list(range(1, 9))  # the requests of one loop turn: one call
    assert batcher.inlined == batcher.batches == 3  # every call counted as on the loop (the failed one not)


async def test_on_loop_with_batch_size_one_still_runs_on_the_loop() -> None:
    run = Recorder()
    batcher = Batcher(run, max_size=1, on_loop=True)
    try:
        assert await asyncio.gather(*(batcher.submit(i) for i in (1, 2, 3))) == [2, 4, 6]
    finally:
        await batcher.close()
    assert run.batches == [[1], [2], [3]] and run.threads == {threading.current_thread().name}


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only: the CPU affinity")
def test_usable_cpus_is_the_affinity_capped_by_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = float(len(os.sched_getaffinity(0)))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cpus(cpu_max, tmp_path / "no-v1") == affinity  # no file: the affinity alone
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity  # no quota
    cpu_max.write_text("50000 100000\n")  # docker run --cpus 0.5
    assert usable_cpus(cpu_max) == min(affinity, 0.5)
    cpu_max.write_text("6400000 100000\n")  # a quota above the affinity does not raise it
    assert usable_cpus(cpu_max, tmp_path / "no-v1") == affinity
    cpu_max.write_text("garbage\n")
    assert usable_cpus(cpu_max, tmp_path / "no-v1") == affinity
    v1 = tmp_path / "v1"  # cgroup v1, read when there is no cpu.max
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path / "none", v1) == affinity
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    assert usable_cpus(tmp_path / "none", v1) == min(affinity, 1.5)


def test_auto_runs_batches_on_the_loop_only_on_small_cpu_hosts() -> None:
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert choose_inference_on("auto", cpu, 2.0)[0] == "loop"
    assert choose_inference_on("auto", cpu, 0.5)[0] == "loop"
    on, why = choose_inference_on("auto", cpu, 4.0)
    assert on == "thread" and "4 usable CPUs per worker" in why
    on, why = choose_inference_on("auto", cuda, 1.0)
    assert on == "thread" and cuda in why  # a GPU call waits on the device: the loop goes on meanwhile
    assert choose_inference_on("thread", cpu, 1.0) == ("thread", "set by NEXTACT_INFERENCE_ON")
    assert choose_inference_on("loop", cuda, 64.0) == ("loop", "set by NEXTACT_INFERENCE_ON")
