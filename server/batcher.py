"""Explicit dynamic batcher with a bounded queue.

Requests are submitted one at a time from async handlers; a single worker task
(the only consumer of the queue) groups them into batches and runs a blocking
``process(key, payloads)`` function in an executor thread, so the event loop
never blocks on compute.

The design follows MLServer's explicit batcher (bounded queue, admission
control) and text-embeddings-inference's queue discipline:

* admission control never blocks: a full queue is rejected at once
  (:class:`QueueFullError`);
* requests whose deadline passed, or whose caller went away, are dropped
  before compute;
* items with different keys never share a ``process`` call;
* one bad input fails alone: a batch whose ``process`` call raises is split in
  halves and retried, down to single items (this also lets an out-of-memory
  batch succeed in smaller pieces).

The module knows nothing of gRPC or torch; the server maps the exceptions
below to status codes and implements :class:`BatchObserver` with metrics.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import enum
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

__all__ = [
    "BatchFn",
    "BatchObserver",
    "BatcherClosedError",
    "DeadlineExceededError",
    "DynamicBatcher",
    "QueueFullError",
]

logger = logging.getLogger(__name__)

BatchFn = Callable[[Hashable, list[Any]], list[Any]]
"""``process(key, payloads) -> results``: one result per payload, in order.

A result may be an :class:`Exception` instance, meaning that item failed alone.
Runs in an executor thread, never on the event loop.
"""


class QueueFullError(Exception):
    """The queue holds ``max_queue_size`` items; the request was not admitted."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its compute started."""


class BatcherClosedError(Exception):
    """The batcher is closed (draining) or its worker is not running."""


class BatchObserver(Protocol):
    """Receives batching events, e.g. to export metrics. Default: no-op.

    Methods are called on the event loop thread and should be cheap. An
    exception raised by an observer is logged and otherwise ignored.
    """

    def batch_formed(self, key: Hashable, size: int) -> None:
        """A ``process`` call for ``size`` items of ``key`` is about to start."""

    def queue_wait(self, key: Hashable, seconds: float) -> None:
        """One item waited ``seconds`` from arrival to compute start."""

    def queue_depth(self, depth: int) -> None:
        """The number of queued items changed to ``depth``."""

    def dropped(self, reason: str) -> None:
        """One item got no result: ``"deadline"``, ``"cancelled"`` or ``"closed"``."""


class _NullObserver:
    """The default :class:`BatchObserver`: ignores every event."""

    def batch_formed(self, key: Hashable, size: int) -> None:
        pass

    def queue_wait(self, key: Hashable, seconds: float) -> None:
        pass

    def queue_depth(self, depth: int) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass


class _State(enum.Enum):
    QUEUED = enum.auto()  # in the queue
    TAKEN = enum.auto()  # taken by the worker into a batch, compute not started
    STARTED = enum.auto()  # handed to ``process``; no longer droppable by its waiter
    DROPPED = enum.auto()  # failed or cancelled without a result from ``process``


class _Item:
    """One submitted request and the future its waiter awaits."""

    __slots__ = ("payload", "key", "deadline", "arrival", "future", "state")

    def __init__(
        self, payload: Any, key: Hashable, deadline: float | None, future: asyncio.Future[Any]
    ) -> None:
        self.payload = payload
        self.key = key
        self.deadline = deadline
        self.arrival = time.monotonic()
        self.future = future
        self.state = _State.QUEUED


class DynamicBatcher:
    """Batch concurrent requests for a blocking batch function.

    Parameters
    ----------
    process
        ``process(key, payloads) -> results``, see :data:`BatchFn`.
    max_batch_size
        Most items in one ``process`` call.
    max_delay_s
        Longest time to wait, from the arrival of a batch's first item, for
        more items to fill the batch. ``0`` takes only what is already queued.
    max_queue_size
        Most items waiting in the queue; beyond it :meth:`submit` raises
        :class:`QueueFullError`.
    executor
        Where ``process`` runs. Default: a single-thread executor owned by the
        batcher and shut down by :meth:`close`. A given executor is not shut down.
    observer
        Receives batching events (metrics); see :class:`BatchObserver`.
    name
        Used in log messages, error messages, and task and thread names.

    Notes
    -----
    All methods must be called from the event loop that ran :meth:`start`.
    Only the worker task takes items off the queue. A waiter may withdraw its
    own item that has not started compute (cancellation, deadline), which is
    safe because everything runs on the one event loop thread, and frees its
    queue slot at once instead of when the worker reaches it.
    """

    def __init__(
        self,
        process: BatchFn,
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.002,
        max_queue_size: int = 256,
        executor: concurrent.futures.Executor | None = None,
        observer: BatchObserver | None = None,
        name: str = "",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self._process = process
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue_size = max_queue_size
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"batcher-{name}" if name else "batcher"
        )
        self._observer: BatchObserver = observer or _NullObserver()
        self._name = name
        self._queue: collections.deque[_Item] = collections.deque()
        # Items the worker has taken off the queue and not yet settled.
        self._batch: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ public

    @property
    def queue_depth(self) -> int:
        """Number of items waiting in the queue (not yet taken into a batch)."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """Whether the worker task is running."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Create the worker task on the running event loop.

        Does nothing if the worker is already running; after a worker crash it
        starts a new one.

        Raises
        ------
        BatcherClosedError
            If the batcher was closed.
        RuntimeError
            If no event loop is running.
        """
        if self._closed:
            raise BatcherClosedError(f"batcher {self._name!r} is closed; it cannot be restarted")
        if self.alive:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._worker(), name=f"batcher-worker-{self._name}"
        )

    async def submit(
        self, payload: Any, *, key: Hashable = None, deadline: float | None = None
    ) -> Any:
        """Queue one payload and wait for its result.

        Parameters
        ----------
        payload
            Passed to ``process`` within the ``payloads`` list.
        key
            Items are batched only with items of an equal key.
        deadline
            A :func:`time.monotonic` time by which compute must have started.

        Returns
        -------
        Any
            This payload's element of the ``process`` results.

        Raises
        ------
        QueueFullError
            At once, if ``max_queue_size`` items are waiting.
        BatcherClosedError
            If the batcher is closed or its worker is not running, or if it is
            closed or its worker crashes before this item completes.
        DeadlineExceededError
            If the deadline passes before compute starts.
        TypeError
            If ``key`` is not hashable.
        Exception
            The item's own failure, as raised or returned by ``process``.

        Notes
        -----
        If the awaiting task is cancelled before compute starts, the item is
        dropped; once compute started, its result is discarded.
        """
        if self._closed:
            raise BatcherClosedError(f"batcher {self._name!r} is closed")
        if not self.alive:
            raise BatcherClosedError(f"batcher {self._name!r} worker is not running")
        hash(key)  # fail the caller now rather than the worker later
        if deadline is not None and deadline <= time.monotonic():
            self._observe("dropped", "deadline")
            raise DeadlineExceededError("deadline passed before the request was queued")
        if len(self._queue) >= self._max_queue_size:
            raise QueueFullError(
                f"batcher {self._name!r} queue is full ({self._max_queue_size} items)"
            )

        loop = asyncio.get_running_loop()
        item = _Item(payload, key, deadline, loop.create_future())
        self._queue.append(item)
        self._wakeup.set()
        self._observe("queue_depth", len(self._queue))
        timer = None
        if deadline is not None:
            timer = loop.call_later(deadline - time.monotonic(), self._expire, item)
        try:
            return await item.future
        except asyncio.CancelledError:
            if item.state in (_State.QUEUED, _State.TAKEN):
                self._drop(item, "cancelled")
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def close(self, grace_s: float = 10.0) -> None:
        """Stop accepting requests, drain, and stop the worker.

        New submits raise :class:`BatcherClosedError` at once. Queued and
        in-flight items may finish within ``grace_s`` seconds; then the worker
        is cancelled and the remaining waiters get :class:`BatcherClosedError`.
        A ``process`` call already running in a thread cannot be interrupted;
        its result is discarded. The owned executor is shut down without
        waiting for it. Calling ``close`` again is harmless.
        """
        self._closed = True
        self._wakeup.set()  # an idle worker sees the closed flag and exits
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=grace_s)
            if not done:
                task.cancel()
                await asyncio.wait({task})
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ worker

    async def _worker(self) -> None:
        """Form batches and run them until closed and drained."""
        try:
            while await self._next_batch():
                await self._run_batch()
        except asyncio.CancelledError:
            self._fail_pending(BatcherClosedError(f"batcher {self._name!r} closed"))
            raise
        except BaseException as exc:
            # A bug in the worker (or a BaseException out of ``process``): nobody
            # would ever settle the pending futures, so fail them and stop; a
            # supervisor may call start() again.
            logger.exception("batcher %r worker crashed", self._name)
            error = BatcherClosedError(f"batcher {self._name!r} worker crashed")
            error.__cause__ = exc
            self._fail_pending(error)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise

    async def _next_batch(self) -> bool:
        """Move the next batch from the queue into ``self._batch``.

        Returns ``False`` when the batcher is closed and the queue is empty.
        """
        while not self._queue:
            if self._closed:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()

        first = self._take()
        window_end = first.arrival + self._max_delay_s
        while len(self._batch) < self._max_batch_size:
            if self._queue:
                self._take()
                continue
            remaining = window_end - time.monotonic()
            if remaining <= 0 or self._closed:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        self._observe("queue_depth", len(self._queue))
        return True

    def _take(self) -> _Item:
        item = self._queue.popleft()
        item.state = _State.TAKEN
        self._batch.append(item)
        return item

    async def _run_batch(self) -> None:
        """Run ``self._batch`` as one ``process`` call per key, in arrival order."""
        groups: dict[Hashable, list[_Item]] = {}
        for item in self._batch:
            groups.setdefault(item.key, []).append(item)
        for key, items in groups.items():
            # Checked per group: a group may wait for the previous groups' compute.
            live = self._admit(items)
            if live:
                self._observe("batch_formed", key, len(live))
                await self._run(key, live)
        self._batch.clear()

    def _admit(self, items: list[_Item]) -> list[_Item]:
        """Drop cancelled and expired items; mark the rest as started."""
        now = time.monotonic()
        live = []
        for item in items:
            if item.state is _State.DROPPED:
                continue
            if item.future.cancelled():
                self._drop(item, "cancelled")
            elif item.deadline is not None and item.deadline <= now:
                self._drop(item, "deadline", DeadlineExceededError("deadline passed in the queue"))
            else:
                item.state = _State.STARTED
                self._observe("queue_wait", item.key, now - item.arrival)
                live.append(item)
        return live

    async def _run(self, key: Hashable, items: list[_Item]) -> None:
        """Run ``process`` on ``items``; on failure, split and retry each half."""
        loop = asyncio.get_running_loop()
        payloads = [item.payload for item in items]
        try:
            results = await loop.run_in_executor(self._executor, self._process, key, payloads)
        except Exception as exc:
            if len(items) == 1:
                self._settle(items[0], exc)
                return
            logger.debug(
                "batcher %r: process failed for %d items (%r); splitting",
                self._name, len(items), exc,
            )
            mid = len(items) // 2
            await self._run(key, items[:mid])
            await self._run(key, items[mid:])
            return

        try:
            count_ok = len(results) == len(items)
        except TypeError:
            count_ok = False
        if not count_ok:
            error = RuntimeError(
                f"batcher {self._name!r}: process returned {_describe_count(results)} "
                f"for {len(items)} payloads; it must return one result per payload"
            )
            for item in items:
                self._settle(item, error)
            return
        for item, result in zip(items, results):
            self._settle(item, result)

    # ----------------------------------------------------------------- helpers

    def _settle(self, item: _Item, result: Any) -> None:
        """Deliver a result (an Exception instance fails the item) unless the waiter left."""
        if item.future.done():
            return
        if isinstance(result, Exception):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)

    def _expire(self, item: _Item) -> None:
        """Deadline timer callback: drop the item unless its compute started."""
        if item.state in (_State.QUEUED, _State.TAKEN):
            self._drop(item, "deadline", DeadlineExceededError("deadline passed in the queue"))

    def _drop(self, item: _Item, reason: str, error: Exception | None = None) -> None:
        """Fail ``item`` with ``error`` (cancel it if ``None``) without a result. Idempotent."""
        if item.state is _State.DROPPED:
            return
        if item.state is _State.QUEUED:
            self._queue.remove(item)
            self._observe("queue_depth", len(self._queue))
        item.state = _State.DROPPED
        if not item.future.done():
            if error is None:
                item.future.cancel()
            else:
                item.future.set_exception(error)
        self._observe("dropped", reason)

    def _fail_pending(self, error: Exception) -> None:
        """Fail every unsettled item, queued or taken, when the worker stops early."""
        for item in [*self._batch, *self._queue]:
            if item.state is _State.STARTED and item.future.done():
                continue  # settled, or its waiter left after compute started
            # A cancelled future means the waiter left first; its own handler
            # would drop it later, which _drop makes a no-op.
            self._drop(item, "cancelled" if item.future.cancelled() else "closed", error)
        self._batch.clear()

    def _observe(self, event: str, *args: Any) -> None:
        """Call an observer method; a failing observer must not break serving."""
        try:
            getattr(self._observer, event)(*args)
        except Exception:
            logger.exception("batcher %r: observer %s() failed", self._name, event)


def _describe_count(results: Any) -> str:
    try:
        return f"{len(results)} results"
    except TypeError:
        return f"a {type(results).__name__} without a length"
