"""Tests for server.batcher.DynamicBatcher.

Each test runs its own event loop with ``asyncio.run``. Tests assert on
structure (which items shared a call, which failed) rather than on timings;
the waits that guard against hangs are generous.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.batcher import (
    BatcherClosedError,
    DeadlineExceededError,
    DynamicBatcher,
    QueueFullError,
)

HANG_GUARD_S = 5.0  # only reached if something is broken


class Recorder:
    """A batch function that records every call and doubles its payloads.

    If ``gate`` is given, the first call blocks until it is set (the worker is
    then busy and later submits stay queued); ``entered`` is set when it starts.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[object, list]] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, key, payloads):
        self.calls.append((key, list(payloads)))
        self.entered.set()
        if self.gate is not None and len(self.calls) == 1:
            self.gate.wait(HANG_GUARD_S)
        return [p * 2 for p in payloads]

    @property
    def sizes(self) -> list[int]:
        return [len(payloads) for _, payloads in self.calls]

    @property
    def seen(self) -> list:
        return [p for _, payloads in self.calls for p in payloads]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, HANG_GUARD_S)


class RecordingObserver:
    def __init__(self) -> None:
        self.batches: list[tuple[object, int]] = []
        self.waits: list[tuple[object, float]] = []
        self.depths: list[int] = []
        self.drops: list[str] = []

    def batch_formed(self, key, size):
        self.batches.append((key, size))

    def queue_wait(self, key, seconds):
        self.waits.append((key, seconds))

    def queue_depth(self, depth):
        self.depths.append(depth)

    def dropped(self, reason):
        self.drops.append(reason)


async def settle(n: int = 3) -> None:
    """Let already scheduled tasks run (e.g. reach their first await)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_concurrent_submits_are_batched_and_routed():
    process = Recorder()
    observer = RecordingObserver()

    async def main():
        b = DynamicBatcher(process, max_batch_size=8, max_delay_s=0.01, observer=observer)
        b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(100)))
        await b.close()
        return results

    results = asyncio.run(main())
    assert results == [2 * i for i in range(100)]
    assert sorted(process.seen) == list(range(100))
    assert max(process.sizes) <= 8
    assert len(process.calls) < 100  # submits that arrive together share calls
    assert [size for _, size in observer.batches] == process.sizes
    assert len(observer.waits) == 100 and all(s >= 0 for _, s in observer.waits)
    assert observer.depths[-1] == 0
    assert observer.drops == []


def test_items_within_the_delay_window_share_a_batch():
    async def run(max_batch_size):
        process = Recorder()
        b = DynamicBatcher(process, max_batch_size=max_batch_size, max_delay_s=0.2)
        b.start()
        tasks = []
        for i in range(3):  # staggered arrivals, all well inside the 0.2 s window
            tasks.append(asyncio.create_task(b.submit(i)))
            await asyncio.sleep(0.01)
        results = await asyncio.gather(*tasks)
        await b.close()
        return results, process.calls

    results, calls = asyncio.run(run(max_batch_size=32))
    assert results == [0, 2, 4]
    assert calls == [(None, [0, 1, 2])]

    results, calls = asyncio.run(run(max_batch_size=2))
    assert results == [0, 2, 4]
    assert calls == [(None, [0, 1]), (None, [2])]


def test_zero_delay_takes_only_what_is_queued():
    process = Recorder()

    async def main():
        b = DynamicBatcher(process, max_delay_s=0)
        b.start()
        for i in range(3):  # the worker forms each batch before the next arrives
            assert await b.submit(i) == 2 * i
        await b.close()

    asyncio.run(main())
    assert process.sizes == [1, 1, 1]


def test_full_batch_goes_without_waiting_for_the_delay():
    process = Recorder()

    async def main():
        b = DynamicBatcher(process, max_batch_size=2, max_delay_s=60)
        b.start()
        results = await asyncio.wait_for(
            asyncio.gather(b.submit(1), b.submit(2)), HANG_GUARD_S
        )
        await b.close()
        return results

    assert asyncio.run(main()) == [2, 4]
    assert process.sizes == [2]


def test_different_keys_never_share_a_call():
    calls = []

    def process(key, payloads):
        calls.append((key, list(payloads)))
        return [(key, p) for p in payloads]

    submitted = [(k, i) for i, k in enumerate("abacbbca")]

    async def main():
        b = DynamicBatcher(process, max_delay_s=0.05)
        b.start()
        results = await asyncio.gather(*(b.submit(i, key=k) for k, i in submitted))
        await b.close()
        return results

    assert asyncio.run(main()) == submitted
    assert sorted(key for key, _ in calls) == ["a", "b", "c"]  # one batch, one call per key
    for key, payloads in calls:
        assert payloads == [i for k, i in submitted if k == key]  # arrival order kept


def test_queue_full_rejects_at_once_and_earlier_items_complete():
    gate = threading.Event()
    process = Recorder(gate)

    async def main():
        b = DynamicBatcher(process, max_batch_size=1, max_queue_size=3)
        b.start()
        first = asyncio.create_task(b.submit(0))
        await process.wait_entered()  # the worker is now blocked inside process
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
        await settle()
        assert b.queue_depth == 3
        with pytest.raises(QueueFullError):
            await b.submit(4)
        gate.set()
        results = await asyncio.gather(first, *queued)
        await b.close()
        return results

    try:
        assert asyncio.run(main()) == [0, 2, 4, 6]
    finally:
        gate.set()
    assert 4 not in process.seen


def test_expired_deadline_is_dropped_before_compute():
    gate = threading.Event()
    process = Recorder(gate)
    observer = RecordingObserver()

    async def main():
        b = DynamicBatcher(process, observer=observer)
        b.start()
        with pytest.raises(DeadlineExceededError):
            await b.submit(1, deadline=time.monotonic() - 1)

        blocker = asyncio.create_task(b.submit(0))
        await process.wait_entered()
        # Expires while queued behind the blocked batch: the waiter is failed
        # without waiting for the worker.
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(
                b.submit(2, deadline=time.monotonic() + 0.05), HANG_GUARD_S
            )
        assert b.queue_depth == 0
        gate.set()
        assert await blocker == 0
        assert await b.submit(3, deadline=time.monotonic() + HANG_GUARD_S) == 6
        await b.close()

    try:
        asyncio.run(main())
    finally:
        gate.set()
    assert process.seen == [0, 3]
    assert observer.drops == ["deadline", "deadline"]


def test_cancelled_waiter_is_dropped_before_compute():
    gate = threading.Event()
    process = Recorder(gate)
    observer = RecordingObserver()

    async def main():
        b = DynamicBatcher(process, observer=observer)
        b.start()
        blocker = asyncio.create_task(b.submit(0))
        await process.wait_entered()
        leaver = asyncio.create_task(b.submit(1))
        await settle()
        assert b.queue_depth == 1
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        assert b.queue_depth == 0  # the slot is freed at once
        gate.set()
        assert await blocker == 0
        assert await b.submit(2) == 4
        await b.close()

    try:
        asyncio.run(main())
    finally:
        gate.set()
    assert process.seen == [0, 2]
    assert observer.drops == ["cancelled"]


def test_one_bad_input_fails_alone():
    calls = []

    def process(key, payloads):
        calls.append(list(payloads))
        if any(p < 0 for p in payloads):
            raise ValueError("negative input")
        return [p * 2 for p in payloads]

    payloads = [1, 2, 3, -4, 5, 6, 7, 8]

    async def main():
        b = DynamicBatcher(process, max_batch_size=8, max_delay_s=0.05)
        b.start()
        results = await asyncio.gather(*(b.submit(p) for p in payloads), return_exceptions=True)
        await b.close()
        return results

    results = asyncio.run(main())
    assert calls[0] == payloads  # they were tried as one batch first
    assert [r for r in results if not isinstance(r, Exception)] == [2, 4, 6, 10, 12, 14, 16]
    assert isinstance(results[3], ValueError)
    assert [-4] in calls  # split down to the bad input alone


def test_returned_exception_fails_only_its_item():
    calls = []

    def process(key, payloads):
        calls.append(list(payloads))
        return [ValueError(f"bad {p}") if p < 0 else p * 2 for p in payloads]

    async def main():
        b = DynamicBatcher(process, max_delay_s=0.05)
        b.start()
        results = await asyncio.gather(*(b.submit(p) for p in [1, -2, 3]), return_exceptions=True)
        await b.close()
        return results

    results = asyncio.run(main())
    assert calls == [[1, -2, 3]]  # no split: the batch call itself succeeded
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad -2"


def test_wrong_number_of_results_fails_the_batch_with_runtime_error():
    async def main():
        b = DynamicBatcher(lambda key, payloads: payloads[:-1], max_delay_s=0.05)
        b.start()
        results = await asyncio.gather(*(b.submit(p) for p in range(3)), return_exceptions=True)
        await b.close()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "one result per payload" in str(r) for r in results)


def test_close_drains_queued_items_then_refuses():
    process = Recorder()

    async def main():
        b = DynamicBatcher(process, max_batch_size=2)
        b.start()
        assert b.alive
        tasks = [asyncio.create_task(b.submit(i)) for i in range(5)]
        await settle()
        await b.close(grace_s=HANG_GUARD_S)
        assert not b.alive
        assert [t.result() for t in tasks] == [0, 2, 4, 6, 8]
        with pytest.raises(BatcherClosedError):
            await b.submit(9)
        with pytest.raises(BatcherClosedError):
            b.start()

    asyncio.run(main())
    assert 9 not in process.seen


def test_close_after_grace_fails_waiters_and_leaves_no_task():
    gate = threading.Event()
    process = Recorder(gate)
    observer = RecordingObserver()

    async def main():
        b = DynamicBatcher(process, observer=observer)
        b.start()
        in_flight = asyncio.create_task(b.submit(0))
        await process.wait_entered()
        queued = asyncio.create_task(b.submit(1))
        await settle()
        await b.close(grace_s=0.05)
        assert not b.alive
        for task in (in_flight, queued):
            with pytest.raises(BatcherClosedError):
                await task
        assert asyncio.all_tasks() == {asyncio.current_task()}

    try:
        asyncio.run(main())
    finally:
        gate.set()
    assert process.seen == [0]
    assert sorted(observer.drops) == ["closed", "closed"]


def test_submit_requires_a_running_worker():
    async def main():
        b = DynamicBatcher(Recorder())
        assert not b.alive
        with pytest.raises(BatcherClosedError):
            await b.submit(1)
        b.start()
        assert b.alive
        assert await b.submit(1) == 2
        await b.close()
        assert not b.alive

    asyncio.run(main())


class WorkerBug(BaseException):
    """Not an Exception: escapes fault isolation, like a bug in the worker."""


def test_worker_crash_fails_waiters_and_start_restarts():
    crash = True

    def process(key, payloads):
        if crash:
            raise WorkerBug("boom")
        return [p * 2 for p in payloads]

    async def main():
        nonlocal crash
        b = DynamicBatcher(process)
        b.start()
        with pytest.raises(BatcherClosedError) as info:
            await asyncio.wait_for(b.submit(1), HANG_GUARD_S)
        assert isinstance(info.value.__cause__, WorkerBug)
        await settle()
        assert not b.alive
        with pytest.raises(BatcherClosedError):
            await b.submit(2)
        crash = False
        b.start()  # a supervisor restarts the worker
        assert b.alive
        assert await b.submit(3) == 6
        await b.close()

    asyncio.run(main())


def test_failing_observer_does_not_break_serving():
    class BrokenObserver(RecordingObserver):
        def batch_formed(self, key, size):
            raise RuntimeError("metrics bug")

    async def main():
        b = DynamicBatcher(Recorder(), observer=BrokenObserver())
        b.start()
        assert await asyncio.gather(b.submit(1), b.submit(2)) == [2, 4]
        assert b.alive
        await b.close()

    asyncio.run(main())


def test_unhashable_key_fails_the_caller_not_the_worker():
    async def main():
        b = DynamicBatcher(Recorder())
        b.start()
        with pytest.raises(TypeError):
            await b.submit(1, key=["unhashable"])
        assert b.alive
        assert await b.submit(1) == 2
        await b.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs", [{"max_batch_size": 0}, {"max_delay_s": -1}, {"max_queue_size": 0}]
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        DynamicBatcher(Recorder(), **kwargs)
