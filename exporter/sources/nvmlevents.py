"""Xid critical errors from NVML events, counted on a thread of their own.

``nvmlEventSetWait`` blocks, so it never runs on the poll path. The watcher registers the GPUs the
reader found for ``nvmlEventTypeXidCriticalError`` and counts each event once, by GPU UUID and
GPU instance (a MIG device), and by Xid code. Any failure (NVML gone, a GPU lost, an exception
of any type) frees the event set, logs one line per change of state and retries with jittered
exponential backoff (exporter.supervise.Loop); events that happen while it is not
registered are not seen (NVML does not queue them for a set that does not exist). A wait that
ends in TIMEOUT well before its time (a broken driver) is a step that ended too soon: the loop backs
off before the next, keeping the set registered, instead of spinning.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pynvml

from exporter.backoff import Backoff
from exporter.supervise import BackOff, Loop, StateLog

log = logging.getLogger(__name__)

_NO_INSTANCE = 0xFFFFFFFF

XidCounts = dict[tuple[str, int | None], dict[int, int]]  # (GPU uuid, GPU instance id) -> Xid -> count


def _address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


class XidWatcher:
    """Each wait lasts up to ``wait_ms``: a wake-up a second keeps an idle watcher's cost negligible
    while ``close()`` still ends it within a second."""

    def __init__(self, wait_ms: int = 1000, retry_min_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self._wait_ms = wait_ms
        self._lock = threading.Lock()
        self._wanted: tuple[tuple[int, str], ...] = ()
        self._counts: Counter[tuple[str, int | None, int]] = Counter()
        self._seen: dict[str, dict[int, float]] = {}  # GPU uuid -> Xid -> time.monotonic() of its latest
        self._changed = threading.Event()
        self._event_set: Any = None
        self._handles: dict[int, str] = {}  # handle address -> GPU uuid
        self._loop = Loop(
            "nvml-events",
            self._step,
            StateLog(log, "Xid events"),
            Backoff(retry_min_s, retry_max_s),
            expected=(pynvml.NVMLError,),
        )
        self._started = False
        self._watched: frozenset[str] = frozenset()  # the GPUs (uuid) registered for Xid events right now

    def watch(self, gpus: Sequence[tuple[int, str]]) -> None:
        """The GPUs (index, uuid) to watch; the thread starts on the first call. Never blocks."""
        wanted = tuple(gpus)
        with self._lock:
            if wanted == self._wanted and self._started:
                return
            self._wanted = wanted
            self._changed.set()
            if not self._started and not self._loop.stopping:
                self._started = True
                self._loop.start()

    def counts(self) -> XidCounts:
        with self._lock:
            items = list(self._counts.items())
        out: XidCounts = {}
        for (uuid, instance, xid), count in items:
            out.setdefault((uuid, instance), {})[xid] = count
        return out

    @property
    def registered(self) -> int:
        """GPUs registered for Xid events right now."""
        return len(self._watched)

    def watched(self) -> frozenset[str]:
        """The GPUs (uuid) registered for Xid events right now: on the others an Xid goes unseen."""
        with self._lock:
            return self._watched

    def last_seen(self) -> dict[str, dict[int, float]]:
        """GPU uuid -> Xid -> time.monotonic() of its latest event (on the GPU or a GPU instance of it)."""
        with self._lock:
            return {uuid: dict(by_xid) for uuid, by_xid in self._seen.items()}

    def close(self, timeout_s: float = 0.1) -> None:
        """Stops the thread. A wait in progress cannot be interrupted: the thread (a daemon) ends
        when it returns, within ``wait_ms``; shutting NVML down meanwhile ends it sooner."""
        with self._lock:
            self._loop.stop()
        self._changed.set()
        self._loop.join(timeout_s)
        if not self._loop.is_alive():
            self._event_set = self._free(self._event_set)

    def _step(self) -> float:
        """Registers afresh when the GPUs changed, then waits for one event. Any failure frees the
        event set and registers again after the loop's backoff."""
        try:
            if self._changed.is_set():
                self._changed.clear()
                self._event_set = self._free(self._event_set)
                self._event_set, self._handles = self._register()
            if self._event_set is None:
                self._changed.wait(self._wait_ms / 1000)
                return 0.0
            started = time.monotonic()
            try:
                data = pynvml.nvmlEventSetWait_v2(self._event_set, self._wait_ms)
            except pynvml.NVMLError as error:
                if error.value != pynvml.NVML_ERROR_TIMEOUT:
                    raise
                if time.monotonic() - started < self._wait_ms / 2000:
                    raise BackOff("the event wait timed out at once") from error
                data = None
            if data is not None:
                self._count(data, self._handles)
        except BackOff:
            raise  # the set stays registered: events meanwhile wait in it
        except BaseException:
            self._event_set = self._free(self._event_set)
            self._set_watched({})
            self._changed.set()  # register again after the pause
            raise
        finally:
            if self._loop.stopping:
                self._event_set = self._free(self._event_set)
        return 0.0

    def _register(self) -> tuple[Any, dict[int, str]]:
        with self._lock:
            wanted = self._wanted
        if not wanted:
            self._set_watched({})
            return None, {}
        event_set = pynvml.nvmlEventSetCreate()
        handles: dict[int, str] = {}
        try:
            for index, uuid in wanted:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                try:
                    pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
                except pynvml.NVMLError as error:
                    if error.value != pynvml.NVML_ERROR_NOT_SUPPORTED:
                        raise
                    log.info("GPU %d (%s): Xid events not supported; its Xid series are left out", index, uuid)
                    continue
                address = _address(handle)
                if address is not None:
                    handles[address] = uuid
        except BaseException:
            self._free(event_set)
            raise
        if len(handles) != self.registered:
            log.info("Xid events: watching %d of %d GPUs", len(handles), len(wanted))
        self._set_watched(handles)
        if not handles:
            return self._free(event_set), {}
        return event_set, handles

    def _set_watched(self, handles: dict[int, str]) -> None:
        with self._lock:
            self._watched = frozenset(handles.values())

    def _count(self, data: Any, handles: dict[int, str]) -> None:
        if not int(data.eventType) & pynvml.nvmlEventTypeXidCriticalError:
            return
        uuid = handles.get(_address(data.device) or 0)
        if uuid is None:
            return  # not a GPU we registered (cannot happen with one set per watcher)
        instance = int(data.gpuInstanceId)
        key = (uuid, None if instance == _NO_INSTANCE else instance, int(data.eventData))
        with self._lock:
            self._counts[key] += 1
            self._seen.setdefault(uuid, {})[key[2]] = time.monotonic()
        log.warning("GPU %s: Xid %d%s", uuid, key[2], "" if key[1] is None else f" on GPU instance {key[1]}")

    @staticmethod
    def _free(event_set: Any) -> None:
        if event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):  # NVML went away with it
                pynvml.nvmlEventSetFree(event_set)
        return None
