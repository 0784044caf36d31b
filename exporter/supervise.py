"""How every long-running thread in the agent and the adapter survives a failure, one way.

``StateLog`` says a failing state once when it begins or changes and once when it ends, so a fault
that repeats every poll is one line, not one a second. ``Loop`` runs one unit of work after another
on a thread of its own: any exception in a step (of any type) is logged through its StateLog and
followed by a backoff delay, never a tight retry, and the thread goes on. A step that did not fail
outright but must not be repeated at once (a watch that ended right after it began) raises
``BackOff``. ``wait_for_signal`` blocks the main thread until the process is told to stop.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from exporter.backoff import Backoff


class BackOff(Exception):  # noqa: N818 (an instruction to the loop, not an error)
    """Raised by a step that ended well but too soon: the loop waits a backoff delay before the next."""


def describe(error: BaseException) -> str:
    """An exception as a one-line state: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class StateLog:
    """Logs ``what`` failing once per change of state, and once when it recovers.

    ``failing`` is the state last logged (None while healthy) and ``failures`` counts failed
    attempts since the last recovery, so readiness and metrics can read them too. Safe to share
    between threads (an adapter's request threads share one backend's); a success while healthy,
    every request's case, takes no lock.
    """

    def __init__(self, logger: logging.Logger, what: str, consequence: str = "", level: int = logging.WARNING) -> None:
        self.logger = logger
        self.what = what
        self.consequence = consequence
        self.level = level
        self.failing: str | None = None
        self.failures = 0
        self._lock = threading.Lock()

    def failed(self, state: str, consequence: str = "", *, exc_info: BaseException | bool = False) -> bool:
        """Records a failed attempt; logs it when ``state`` differs from the last one. True if logged.
        ``consequence`` (else the one given at construction) says what users see meanwhile."""
        with self._lock:
            self.failures += 1
            if state == self.failing:
                return False
            self.failing = state
        consequence = consequence or self.consequence
        suffix = f"; {consequence}" if consequence else ""
        self.logger.log(self.level, "%s failing (%s)%s", self.what, state, suffix, exc_info=exc_info)
        return True

    def recovered(self, detail: str = "") -> bool:
        """Records a success; logs the recovery if it was failing. True if logged."""
        if self.failing is None and self.failures == 0:
            return False
        with self._lock:
            if self.failing is None:
                self.failures = 0
                return False
            failures, self.failing, self.failures = self.failures, None, 0
        plural = "" if failures == 1 else "s"
        suffix = f" ({detail})" if detail else ""
        self.logger.info("%s recovered after %d failed attempt%s%s", self.what, failures, plural, suffix)
        return True


class Loop:
    """Runs ``step`` on a daemon thread until stopped.

    ``step`` returns the seconds to wait before the next step (0 for at once: it may wait itself).
    An exception from it is a failure: logged once per state by ``state`` (with a traceback the
    first time, unless its type is one of ``expected``), and the next step comes after
    ``backoff.next_delay()``. A step that returns normally is a success: the state recovers and
    the backoff resets. ``wake()`` cuts a wait short; ``stop()`` ends the thread after its step.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], float],
        state: StateLog,
        backoff: Backoff,
        *,
        consequence: str = "retrying with backoff",
        expected: tuple[type[BaseException], ...] = (),
        describe: Callable[[BaseException], str] = describe,
    ) -> None:
        self.name = name
        self.state = state
        self.backoff = backoff
        self._step = step
        self._consequence = consequence
        self._expected = expected
        self._describe = describe
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def run_once(self) -> float:
        """One step with the loop's failure handling; the seconds to wait before the next."""
        try:
            wait_s = self._step()
        except Exception as error:  # any fault in one unit of work: log by state, back off, go on
            if self._stop.is_set():
                return 0.0
            if isinstance(error, BackOff):
                self.state.failed(str(error) or "ended too soon", self._consequence)
            else:
                self.state.failed(
                    self._describe(error),
                    self._consequence,
                    exc_info=not isinstance(error, self._expected) and error,
                )
            return self.backoff.next_delay()
        self.state.recovered()
        self.backoff.reset()
        return wait_s

    def _run(self) -> None:
        while not self._stop.is_set():
            wait_s = self.run_once()
            if wait_s > 0 and not self._stop.is_set():
                self._wake.wait(wait_s)
            self._wake.clear()


def wait_for_signal(logger: logging.Logger) -> None:
    """Blocks until SIGTERM or SIGINT, logging which arrived."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
