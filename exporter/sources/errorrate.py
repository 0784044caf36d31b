"""Per-minute rates of a GPU's error counters, from the reader's reads of them.

The health rules judge rates (a correctable-error storm) but stay pure functions of one reading: the
state across polls lives here, in the reader. A rate is the increase since the newest read at least
a minute old (else the oldest read kept), divided by the time between the two reads but by no less
than a minute: reads a few seconds apart are never extrapolated into a storm, and the first read of
a count (errors since the driver loaded) is no rate at all.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

WINDOW_S = 60.0
# Reads kept per device: more than a minute's at the fastest cadence (ECC counts: every SLOW_EVERY polls of
# the shortest --interval).
MAX_READS = 128


class PerMinute:
    """One counter's rate per minute on each device (by UUID)."""

    def __init__(self) -> None:
        self._reads: dict[str, deque[tuple[float, int]]] = {}
        self._rates: dict[str, float | None] = {}

    def read(self, uuid: str, at: float, count: int | None) -> float | None:
        """Takes in a fresh read of the counter (``at``: time.monotonic()); None: it could not be read."""
        reads = self._reads.setdefault(uuid, deque(maxlen=MAX_READS))
        if count is None or (reads and count < reads[-1][1]):
            reads.clear()  # unreadable, or reset (driver reloaded, GPU reset): start afresh
        if count is not None:
            reads.append((at, count))
        while len(reads) > 1 and at - reads[1][0] >= WINDOW_S:
            reads.popleft()
        rate = None
        if len(reads) > 1:
            (since, first), (now, last) = reads[0], reads[-1]
            rate = (last - first) * WINDOW_S / max(now - since, WINDOW_S)
        self._rates[uuid] = rate
        return rate

    def rate(self, uuid: str) -> float | None:
        """The rate as of the last read of the device's counter; None before two reads."""
        return self._rates.get(uuid)

    def keep_only(self, uuids: Iterable[str]) -> None:
        """Forgets devices no longer present, so what is kept stays bounded by the devices present."""
        present = set(uuids)
        self._reads = {uuid: reads for uuid, reads in self._reads.items() if uuid in present}
        self._rates = {uuid: rate for uuid, rate in self._rates.items() if uuid in present}
