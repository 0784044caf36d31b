"""The one way every thread survives a failure: a state logged once per change and once on recovery,
and a loop that goes on after any exception in a step, waiting a growing delay between failures."""

from __future__ import annotations

import itertools
import logging
import threading
import time

import pytest

from exporter.backoff import Backoff
from exporter.supervise import BackOff, Loop, StateLog

log = logging.getLogger("test.supervise")


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


def test_a_state_is_logged_once_per_change_and_once_on_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    state = StateLog(log, "the kubelet")
    for _ in range(50):
        state.failed("UNAVAILABLE", "exporting without pod labels")
    state.failed("DEADLINE_EXCEEDED")
    state.failed("DEADLINE_EXCEEDED")
    assert state.failing == "DEADLINE_EXCEEDED" and state.failures == 52
    state.recovered()
    state.recovered()
    assert messages(caplog) == [
        "the kubelet failing (UNAVAILABLE); exporting without pod labels",
        "the kubelet failing (DEADLINE_EXCEEDED)",
        "the kubelet recovered after 52 failed attempts",
    ]
    assert state.failing is None and state.failures == 0


class Steps:
    """A step that fails in the ways given, then succeeds, recording when it ran."""

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.times: list[float] = []
        self.done = threading.Event()

    def __call__(self) -> float:
        self.times.append(time.monotonic())
        if self.failures:
            raise self.failures.pop(0)
        self.done.set()
        return 3600.0


def test_any_exception_in_a_step_is_survived_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    odd = [
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        AttributeError("module 'pynvml' has no attribute 'nvmlDeviceGetTemperatureV'"),
        RecursionError("maximum recursion depth exceeded"),
        KeyError("metadata"),
    ]
    steps = Steps(list(odd))
    loop = Loop("test", steps, StateLog(log, "the test source"), Backoff(initial_s=0.05, cap_s=1.0, jitter=0.0))
    loop.start()
    try:
        assert steps.done.wait(10), "the loop did not come back after the failures"
    finally:
        loop.stop()
        loop.join(1)
    gaps = [later - earlier for earlier, later in itertools.pairwise(steps.times)]
    assert len(gaps) == 4
    assert all(later > earlier * 1.5 for earlier, later in itertools.pairwise(gaps)), gaps
    lines = messages(caplog)
    assert len(lines) == 5 and lines[-1] == "the test source recovered after 4 failed attempts"
    # A type outside ``expected`` is logged with its traceback, once.
    assert all(r.exc_info for r in caplog.records[:4])


def test_a_step_that_ends_too_soon_backs_off_instead_of_spinning() -> None:
    calls: list[float] = []

    def ends_at_once() -> float:
        calls.append(time.monotonic())
        raise BackOff("the watch ended right after it began")

    state = StateLog(log, "the watch")
    loop = Loop("spin", ends_at_once, state, Backoff(initial_s=0.1, cap_s=0.4, jitter=0.0))
    loop.start()
    time.sleep(1.0)
    loop.stop()
    loop.join(1)
    # 0.1 + 0.2 + 0.4 + 0.4 ...: a handful of steps in a second, not thousands.
    assert 3 <= len(calls) <= 6, len(calls)
    assert state.failing == "the watch ended right after it began"


def test_expected_failures_are_one_line_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    steps = Steps([ConnectionRefusedError(111, "Connection refused")])
    loop = Loop("test", steps, StateLog(log, "the API"), Backoff(initial_s=0.01, jitter=0.0), expected=(OSError,))
    assert loop.run_once() > 0
    assert loop.run_once() == 3600.0
    assert not any(r.exc_info for r in caplog.records if r.name == log.name)
    assert (
        messages(caplog)[0]
        == "the API failing (ConnectionRefusedError: [Errno 111] Connection refused); retrying with backoff"
    )


def test_stop_and_wake_cut_a_wait_short() -> None:
    steps = Steps([])
    loop = Loop("test", steps, StateLog(log, "x"), Backoff())
    loop.start()
    assert steps.done.wait(5)
    loop.wake()
    deadline = time.monotonic() + 5
    while len(steps.times) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(steps.times) == 2, "wake() did not start the next step"
    started = time.monotonic()
    loop.stop()
    loop.join(5)
    assert not loop.is_alive() and time.monotonic() - started < 1
