"""The stall-tolerant executor on its own: plain Python work, blocked and released by events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from exporter.stallpool import StallPool


class Work:
    """Work that records the keys it ran, on which thread; a key in ``hang`` blocks until released."""

    def __init__(self, *hang: str) -> None:
        self.ran: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.hang = set(hang)

    def __call__(self, key: str) -> str:
        if key in self.hang:
            self.release.wait(10)
        if key == "raises":
            raise RuntimeError("broken unit")
        self.ran.append((key, threading.current_thread().name))
        return key.upper()


@pytest.fixture
def pools() -> Iterator[list[StallPool[str, str]]]:
    made: list[StallPool[str, str]] = []
    yield made
    for pool in made:
        pool.close(1.0)


def make(pools: list[StallPool[str, str]], work: Work) -> StallPool[str, str]:
    pools.append(StallPool(work, "unit"))
    return pools[-1]


def results(pool: StallPool[str, str], keys: list[str]) -> dict[str, str]:
    taken = {key: pool.take(key) for key in keys}
    return {key: future.result() for key, future in taken.items() if future is not None}


def test_units_run_one_after_another_on_one_thread(pools: list[StallPool[str, str]]) -> None:
    work = Work()
    pool = make(pools, work)
    keys = ["a", "b", "c"]
    for key in keys:
        pool.submit(key)
    pool.wait(keys, timeout_s=5, stall_s=1)
    assert results(pool, keys) == {"a": "A", "b": "B", "c": "C"}
    assert work.ran == [("a", "unit-0"), ("b", "unit-0"), ("c", "unit-0")]
    assert pool.in_flight("a") is None  # taken back exactly once
    assert pool.take("a") is None


def test_a_stalled_unit_strands_nothing_queued_behind_it(pools: list[StallPool[str, str]]) -> None:
    work = Work("stuck")
    pool = make(pools, work)
    keys = ["a", "stuck", "b", "c"]
    for key in keys:
        pool.submit(key)
    pool.wait(keys, timeout_s=0.5, stall_s=0.1)
    assert results(pool, keys) == {"a": "A", "b": "B", "c": "C"}
    assert [thread for key, thread in work.ran if key in "bc"] == ["unit-1", "unit-1"]  # moved to a new thread
    assert set(pool.stalled(0.1)) == {"stuck"}
    assert pool.stalled(60) == {}
    future = pool.in_flight("stuck")
    assert future is not None and future.running()
    with pytest.raises(ValueError):
        pool.submit("stuck")  # one unit per key
    work.release.set()
    pool.wait(["stuck"], timeout_s=5, stall_s=0.1)
    assert results(pool, ["stuck"]) == {"stuck": "STUCK"}
    assert pool.stalled(0) == {}


def test_a_unit_that_hangs_after_the_wait_is_left_on_the_next(pools: list[StallPool[str, str]]) -> None:
    work = Work("late")
    pool = make(pools, work)
    pool.submit("late")
    pool.submit("behind")
    pool.wait([], timeout_s=0.1, stall_s=0.05)  # the caller waited for nothing: "behind" still queued
    time.sleep(0.1)
    assert pool.leave_stalled(0.05)
    pool.wait(["behind"], timeout_s=2, stall_s=0.05)
    assert results(pool, ["behind"]) == {"behind": "BEHIND"}
    assert not pool.leave_stalled(0.05)  # the new thread is idle
    work.release.set()


def test_an_exception_reaches_the_caller_and_the_thread_goes_on(pools: list[StallPool[str, str]]) -> None:
    pool = make(pools, Work())
    pool.submit("raises")
    pool.submit("a")
    pool.wait(["raises", "a"], timeout_s=5, stall_s=1)
    failed = pool.take("raises")
    assert failed is not None and isinstance(failed.exception(), RuntimeError)
    assert results(pool, ["a"]) == {"a": "A"}


def test_close_cancels_queued_units_and_names_the_stuck_ones(pools: list[StallPool[str, str]]) -> None:
    work = Work("stuck")
    pool = make(pools, work)
    pool.submit("stuck")
    pool.submit("queued")
    time.sleep(0.1)
    assert pool.close(timeout_s=0.1) == {"stuck"}
    work.release.set()
    time.sleep(0.2)
    assert [key for key, _ in work.ran] == ["stuck"]  # nothing queued ran after close
    cancelled = pool.take("queued")
    assert cancelled is not None and cancelled.cancelled()
    assert not [t for t in threading.enumerate() if t.name.startswith("unit-")]
    with pytest.raises(RuntimeError):
        pool.submit("a")
