"""One backoff for every retry in the agent and the adapter: client-go's reflector backoff manager.

Every node of a fleet retrying the same failed peer at the same moment is a denial of service on
it, so each delay doubles from ``initial_s`` to ``cap_s`` and is stretched by up to ``jitter`` of
itself, which spreads the nodes out. The delay returns to ``initial_s`` after ``reset()`` (the
caller saw success) or once no delay was asked for during ``reset_after_s``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        initial_s: float = 1.0,
        cap_s: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.5,
        reset_after_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.factor = factor
        self.jitter = jitter
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._next_s = initial_s
        self._last: float | None = None

    def next_delay(self) -> float:
        """The seconds to wait before the next attempt; each call lengthens the next delay."""
        now = self._clock()
        if self._last is not None and now - self._last > self.reset_after_s:
            self._next_s = self.initial_s
        self._last = now
        delay = self._next_s
        self._next_s = min(self._next_s * self.factor, self.cap_s)
        return delay * (1 + self.jitter * random.random())

    def reset(self) -> None:
        """The peer answered: the next failure starts from ``initial_s`` again."""
        self._next_s = self.initial_s
        self._last = None
