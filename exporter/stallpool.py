"""A keyed executor that survives stalled work: one call that never returns strands nothing else.

Each key has at most one unit of work in flight. Units run one after another on a daemon thread;
when the unit under way has run for ``stall_s``, the thread is left to it and every unit queued
behind it moves to a new thread. The left thread exits once its call returns; a call that never
returns (a ctypes call cannot be interrupted) keeps only that daemon thread, which does not hold
up the process's exit. One thread at a time, not one per unit: calls that release the GIL spend
more time passing it between threads than working when many run at once.

It knows nothing of what the work is; the caller reads results through ``concurrent.futures``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")


class _Worker(Generic[Key, Result]):
    """A daemon thread running the units queued to it. Once retired it runs nothing more than the
    units left in its queue (the pool cancels those it moves elsewhere) and exits."""

    def __init__(self, work: Callable[[Key], Result], name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Key, Future[Result]] | None] = queue.SimpleQueue()
        self._work = work
        self._under_way: tuple[Key, float] | None = None  # the key being worked on, since when
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, key: Key) -> Future[Result]:
        future: Future[Result] = Future()
        self._jobs.put((key, future))
        return future

    def under_way(self) -> tuple[Key, float] | None:
        """The key being worked on and for how many seconds; None when idle."""
        current = self._under_way
        return None if current is None else (current[0], time.monotonic() - current[1])

    def retire(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            key, future = job
            if not future.set_running_or_notify_cancel():
                continue  # moved to another thread
            self._under_way = (key, time.monotonic())
            try:
                future.set_result(self._work(key))
            except BaseException as error:  # handed to the caller through the future
                future.set_exception(error)
            finally:
                self._under_way = None


class StallPool(Generic[Key, Result]):
    """Runs ``work(key)`` off the caller's thread; threads are named ``name``-N.

    Not thread-safe: one caller thread submits, waits, takes results and closes.
    """

    def __init__(self, work: Callable[[Key], Result], name: str) -> None:
        self._work = work
        self._name = name
        self._current: _Worker[Key, Result] | None = None
        self._workers: list[_Worker[Key, Result]] = []  # the current one and those left to a stalled unit
        self._in_flight: dict[Key, Future[Result]] = {}
        self._closed = False

    def in_flight(self, key: Key) -> Future[Result] | None:
        """The key's unit that has not been taken back yet: queued, under way or done."""
        return self._in_flight.get(key)

    def submit(self, key: Key) -> Future[Result]:
        """Queues ``work(key)``; the key must have no unit in flight (take it back first)."""
        if key in self._in_flight:
            raise ValueError(f"{key!r} already has a unit in flight")
        if self._closed:
            raise RuntimeError("the pool is closed")
        future = self._in_flight[key] = self._worker().submit(key)
        return future

    def take(self, key: Key) -> Future[Result] | None:
        """The key's unit if it is done (cancelled included), no longer in flight; else None."""
        future = self._in_flight.get(key)
        if future is None or not future.done():
            return None
        del self._in_flight[key]
        return future

    def wait(self, keys: Iterable[Key], timeout_s: float, stall_s: float) -> None:
        """Waits until the keys' units are done, ``timeout_s`` has passed or the pool is closed,
        leaving a thread whose unit has stalled for ``stall_s`` (see ``leave_stalled``)."""
        keys = tuple(keys)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0 and not self._closed:
            pending = [f for key in keys if (f := self._in_flight.get(key)) is not None and not f.done()]
            if not pending:
                return
            wait_futures(pending, timeout=min(remaining, stall_s))
            self.leave_stalled(stall_s)

    def leave_stalled(self, stall_s: float) -> bool:
        """When the current thread's unit has been under way for ``stall_s``, leaves the thread to it
        and moves every unit queued behind it to a new thread. True when it did."""
        stalled = self._current
        under_way = stalled.under_way() if stalled is not None else None
        if stalled is None or under_way is None or under_way[1] < stall_s or self._closed:
            return False
        self._current = None
        fresh = self._worker()  # before any unit is taken off the old thread: starting it may fail
        stalled.retire()
        for key, future in list(self._in_flight.items()):
            if future.cancel():  # queued, not begun
                self._in_flight[key] = fresh.submit(key)
        return True

    def stalled(self, stall_s: float) -> dict[Key, float]:
        """The keys whose unit has been under way for ``stall_s`` or longer, and for how long."""
        found: dict[Key, float] = {}
        for worker in self._workers:
            under_way = worker.under_way()
            if under_way is not None and under_way[1] >= stall_s:
                found[under_way[0]] = under_way[1]
        return found

    def close(self, timeout_s: float) -> set[Key]:
        """Cancels the queued units (none begins after this), waits up to ``timeout_s`` for the
        threads and returns the keys whose unit is still under way (their threads are left)."""
        self._closed = True
        self._current = None
        for future in self._in_flight.values():
            future.cancel()
        for worker in self._workers:
            worker.retire()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        return {key for key, future in self._in_flight.items() if not future.done()}

    def _worker(self) -> _Worker[Key, Result]:
        if self._current is None:
            self._workers = [w for w in self._workers if w.thread.is_alive()]
            self._current = _Worker(self._work, f"{self._name}-{len(self._workers)}")
            self._workers.append(self._current)
        return self._current
