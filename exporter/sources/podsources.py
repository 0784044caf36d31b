"""What names a GPU's pod, refreshed off the NVML path: the kubelet's allocations and the GPU
processes' cgroups, read on a thread of their own.

A kubelet that answers in seconds (or not at all) or a /proc read that blocks would otherwise hold
up the poll, and readings published late are dropped as stale: every GPU series would vanish for
want of a pod label. Here the poll only takes the latest answers; the last good allocation list
bridges a bounded gap, and after that devices are exported without pod labels. Failures back off
with jitter, so a kubelet that is away is not asked again every interval by every node at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from exporter.backoff import Backoff
from exporter.model import Allocation, ProcessOwner
from exporter.sources.podresources.client import PodResourcesClient
from exporter.sources.procfs import ProcReader
from exporter.supervise import Loop, StateLog

log = logging.getLogger(__name__)

# How many poll intervals the last good allocation list stands in for a kubelet that does not
# answer (30 s at the default interval). Allocations change only when pods start or stop; beyond
# this a GPU's pod could have changed unseen, and its series lose their pod labels instead.
ALLOCATIONS_MAX_AGE_INTERVALS = 30
# The kubelet is asked every this many poll intervals (5 s at the default), and at once when NVML
# lists a new set of processes (a new process may be a new pod's). Allocations change only when
# pods start or stop, and every node asking its kubelet every second costs more than it tells.
ALLOCATIONS_REFRESH_INTERVALS = 5
# With the pod watch on, the agent also hears of every change to this node's pods (a pod admitted,
# started, deleted) and asks at once: the kubelet is then asked on change, and otherwise only every
# this many intervals, well within ALLOCATIONS_MAX_AGE_INTERVALS. Dialling the kubelet was the largest
# part of an idle agent's CPU.
ALLOCATIONS_REFRESH_INTERVALS_WATCHED = 15
BACKOFF_MAX_S = 10.0  # the kubelet is local: a cheap call, and labels should return soon after it does


@dataclass(frozen=True)
class PodSourcesView:
    """The latest answers, as the poll sees them."""

    allocations: Sequence[Allocation]
    owners: Mapping[int, ProcessOwner | None]  # only PIDs resolved so far; a missing PID is pending
    pod_resources_up: bool
    pod_resources_errors: Mapping[str, int]


class PodSources:
    """Refreshes allocations every few intervals and when the GPU processes change (backing off on
    failures), and resolves the owners of the PIDs the last poll saw as soon as they are handed over."""

    def __init__(
        self,
        kubelet: PodResourcesClient,
        procs: ProcReader,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        pods_watched: bool = False,
    ) -> None:
        """``pods_watched``: ``pods_changed()`` will be called on every change to this node's pods."""
        self.kubelet = kubelet
        self._refresh_s = interval_s * (
            ALLOCATIONS_REFRESH_INTERVALS_WATCHED if pods_watched else ALLOCATIONS_REFRESH_INTERVALS
        )
        self._procs = procs
        self._interval_s = interval_s
        self._clock = clock
        self._allocations: tuple[float, Sequence[Allocation]] = (float("-inf"), ())
        self._owners: Mapping[int, ProcessOwner | None] = {}
        self._wanted: frozenset[int] = frozenset()
        self._failures = 0
        self._backoff = Backoff(initial_s=interval_s, cap_s=max(interval_s, BACKOFF_MAX_S))
        self._ask_kubelet = False  # the GPU processes or this node's pods changed since the last refresh
        self._next_list = clock()
        self._loop = Loop(
            "pod-sources",
            self._refresh,
            StateLog(log, "refreshing pod attribution sources"),
            Backoff(initial_s=interval_s, cap_s=max(interval_s, BACKOFF_MAX_S)),
        )

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def join(self, timeout_s: float) -> None:
        self._loop.join(timeout_s)

    def want_owners(self, pids: Iterable[int]) -> None:
        """Hands over the PIDs NVML listed; new ones are resolved at once, off the poll thread."""
        wanted = frozenset(pids)
        if wanted != self._wanted:
            self._wanted = wanted
            self._ask_kubelet = True
            self._loop.wake()

    def pods_changed(self) -> None:
        """This node's pods changed (the pod watch saw it): the kubelet is asked at once."""
        self._ask_kubelet = True
        self._loop.wake()

    def view(self) -> PodSourcesView:
        when, allocations = self._allocations
        fresh = self._clock() - when <= ALLOCATIONS_MAX_AGE_INTERVALS * self._interval_s
        owners = self._owners
        return PodSourcesView(
            allocations=allocations if fresh else (),
            owners={pid: owners[pid] for pid in self._wanted if pid in owners},
            pod_resources_up=self.kubelet.up,
            pod_resources_errors=dict(self.kubelet.errors),
        )

    def _refresh(self) -> float:
        """Resolves the wanted PIDs' owners and, when due, the kubelet's allocations; the seconds
        until the next refresh (a new set of processes, or a change to the node's pods, wakes it
        sooner: at most once a poll, as the poll hands both over)."""
        self._owners = self._procs.owners(self._wanted)
        changed, self._ask_kubelet = self._ask_kubelet, False
        if self._clock() >= self._next_list or (changed and self._failures == 0):
            self._next_list = self._clock() + self._refresh_allocations()
        return max(0.0, self._next_list - self._clock())

    def _refresh_allocations(self) -> float:
        """Asks the kubelet; returns the seconds until the next call."""
        allocations = self.kubelet.list_allocations()
        if allocations is not None:
            self._allocations = (self._clock(), allocations)
            self._failures = 0
            self._backoff.reset()
            return self._refresh_s
        self._failures += 1
        return self._backoff.next_delay()
