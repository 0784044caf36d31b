"""Identical work within a second done once: concurrent requests wait for the one in flight (and
share its failure), later ones reuse its answer for ``max_age_s``. Prometheus scrapes every 15-60 s
and the HPA syncs every 15 s, so an answer a second old is as fresh as a new one, and every HPA of
a namespace asking at once, or many clients of one, cost one computation a second, not one each.
Failures are never kept beyond the requests that waited for them. Bounded: answers weighing at most
``max_weight`` together (``weigh`` says what one weighs: bytes of a body, pods of a query's
answer), each dropped once ``max_age_s`` old; one heavier than the bound alone is not kept. A
request waits for another's computation at most ``wait_s`` (then ``WaitTimeoutError``): a stuck
computation pins its own thread, never every thread that asked the same thing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

SHARE_S = 1.0
WAIT_S = 30.0


class WaitTimeoutError(TimeoutError):
    """The identical computation in flight did not finish within ``wait_s``."""


class _Flight:
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class SharedAnswers:
    def __init__(
        self,
        max_weight: int,
        weigh: Callable[[Any], int],
        max_age_s: float = SHARE_S,
        clock: Callable[[], float] = time.monotonic,
        wait_s: float = WAIT_S,
    ) -> None:
        self._max_weight = max_weight
        self._wait_s = wait_s
        self._weigh = weigh
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, Any, int]] = {}  # oldest first
        self._weight = 0
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        """The answers kept now."""
        return len(self._answers)

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self._lock:
            answer = self._answers.get(key)
            if answer is not None and self._clock() - answer[0] < self._max_age_s:
                return answer[1]
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if not flight.done.wait(self._wait_s):
                raise WaitTimeoutError(f"the identical computation in flight took over {self._wait_s:g} s")
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = compute()
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                del self._flights[key]
                if flight.error is None:
                    self._keep(key, flight.value)
            flight.done.set()
        return flight.value

    def _keep(self, key: str, value: Any) -> None:
        """Under the lock: answers kept in the order they were made, so the expired ones (and, at the
        bound, the oldest) are dropped from the front."""
        now, weight = self._clock(), self._weigh(value)
        self._drop(key)
        while self._answers:
            oldest = next(iter(self._answers))
            made = self._answers[oldest][0]
            if now - made < self._max_age_s and self._weight + weight <= self._max_weight:
                break
            self._drop(oldest)
        if weight <= self._max_weight:
            self._answers[key] = (now, value, weight)
            self._weight += weight

    def _drop(self, key: str) -> None:
        dropped = self._answers.pop(key, None)
        if dropped is not None:
            self._weight -= dropped[2]
