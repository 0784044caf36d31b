"""The NVML edge: the only module that imports ``pynvml``. Turns the driver into DeviceReadings.

Faults are contained per value and per GPU, as nvitop's query wrapper does: every value is read
through ``_Query.value``, where NOT_SUPPORTED leaves the value out (never 0), a function missing
from the bindings (``AttributeError``) or the driver (FUNCTION_NOT_FOUND) falls back to the older
call or leaves the value out for good, bytes that are no UTF-8 are decoded with replacement, and
any other error is counted and leaves that one value out. Which call variant answers on a device
(v2 memory info or v1, TemperatureV or Temperature) is remembered, not retried every poll.

The GPUs are read one after another on a daemon thread, off the poll loop: NVML calls can block
for a long time after some driver faults (a ctypes call cannot be interrupted). When one read
stalls, the GPUs queued behind it move to a new thread and the stalled one is left to its call, so
one stuck GPU stops neither the others nor the process from exiting. One thread rather than one per
GPU: threads reading at once spent most of a poll's CPU passing the GIL between them (each ctypes
call releases it).

What is read is driven by the metric catalogue (exporter.catalogue): the sources the enabled
groups need, each at its cadence, GPM metrics between two samples a poll apart, and Xid counts
from the events watcher (exporter.sources.nvmlevents), merged in at each poll.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from typing import Any

import pynvml

from exporter.backoff import Backoff
from exporter.catalogue import (
    GPM_METRICS,
    GROUPS,
    SOURCES,
    Call,
    Family,
    Source,
    device_samples,
    enabled_families,
    reads_for,
)
from exporter.model import DeviceReading, GpuProcess
from exporter.sources.nvmlevents import XidCounts, XidWatcher

log = logging.getLogger(__name__)

_NO_INSTANCE = 0xFFFFFFFF
_ERROR_NAMES = {
    getattr(pynvml, name): name.removeprefix("NVML_ERROR_") for name in dir(pynvml) if name.startswith("NVML_ERROR_")
}
# Errors after which the handle itself is gone: the whole device is dropped from this poll.
_DEVICE_FATAL = {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED}
# Errors that mean NVML itself went away: re-initialise.
_LIBRARY_FATAL = {pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED}
# The newer call variant does not answer on this device: use the older one.
_TRY_OLDER = {pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH}
# The error kind counted for an exception that is no NVML error (a bug, or bindings we do not know).
UNEXPECTED = "UNEXPECTED"


def error_kind(error: pynvml.NVMLError) -> str:
    return _ERROR_NAMES.get(error.value, f"CODE_{error.value}")


class _LibraryLostError(Exception):
    """NVML itself went away during a read (uninitialised, driver unloaded)."""

    def __init__(self, error: pynvml.NVMLError) -> None:
        super().__init__(str(error))
        self.error = error


# One way to read a value: the binding's function name (to remember it missing) and the call.
Variant = tuple[str, Callable[[Any], Any]]


def _binding(name: str, *args: Any, **kwargs: Any) -> Variant:
    """A pynvml function called with the handle and ``args``, looked up when called: an older
    nvidia-ml-py without it raises AttributeError there, which the query contains."""
    return name, lambda handle: getattr(pynvml, name)(handle, *args, **kwargs)


def _source_variant(source: Source, call: Call) -> Variant:
    """A catalogue call; its answer made plain inside the contained call. The binding is looked up
    once (the module does not change while the agent runs); one these bindings lack raises
    AttributeError when called, which the query contains."""
    label = f"{call.function} ({call.version})" if call.version else call.function
    function = getattr(pynvml, call.function, None)
    version = getattr(pynvml, call.version, None) if call.version else None
    plain, args = source.plain, call.args
    if function is None or (call.version and version is None):

        def missing(_handle: Any) -> Any:
            raise AttributeError(f"pynvml has no {label}")

        return label, missing
    if call.version:
        return label, lambda handle: plain(function(handle, *args, version=version))
    return label, lambda handle: plain(function(handle, *args))


_VARIANTS = {key: tuple(_source_variant(source, call) for call in source.calls) for key, source in SOURCES.items()}

# What a reader reads on each device, worked out once: (key, description, variants, every n polls).
_Plan = tuple[tuple[str, str, tuple[Variant, ...], int], ...]


def _plan(sources: Iterable[Source]) -> _Plan:
    return tuple(
        (source.key, source.described, _VARIANTS[source.key], source.every) for source in sources if source.key != "xid"
    )  # Xid counts come from the events watcher, merged in at the end of a poll


@dataclass
class _GpmState:
    """One device's two GPM sample buffers, used in turn, and its metrics request, reused each poll."""

    samples: tuple[Any, Any]
    request: Any
    latest: int | None = None  # the buffer holding the last sample taken

    @classmethod
    def allocate(cls) -> _GpmState:
        first = pynvml.nvmlGpmSampleAlloc()
        try:
            second = pynvml.nvmlGpmSampleAlloc()
        except BaseException:
            pynvml.nvmlGpmSampleFree(first)
            raise
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(GPM_METRICS)
        for slot, metric in enumerate(GPM_METRICS):
            request.metrics[slot].metricId = metric
        return cls((first, second), request)

    def free(self) -> None:
        for sample in self.samples:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlGpmSampleFree(sample)


def _text(variant: Variant) -> Variant:
    """pynvml decodes names and UUIDs as strict UTF-8; a byte that is none gets U+FFFD instead of
    an exception (the exception carries the bytes the driver returned)."""
    name, call = variant

    def read(handle: Any) -> str:
        try:
            return str(call(handle))
        except UnicodeDecodeError as error:
            return bytes(error.object).decode("utf-8", errors="replace")

    return name, read


@dataclass(frozen=True)
class NvmlPoll:
    """One poll: the devices read (fresh or carried over while their read is stuck) and errors."""

    devices: tuple[DeviceReading, ...]
    errors: tuple[tuple[str, str, str], ...]  # (gpu index, uuid, error kind)


@dataclass
class _GpuResult:
    index: int
    devices: tuple[DeviceReading, ...] | None = None  # None: keep the last reading (it ages out)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    lost: bool = False
    library_error: pynvml.NVMLError | None = None


class _ReadThread:
    """A daemon thread that reads the GPUs queued to it, one after another. Abandoned when a read
    stalls: it reads nothing more and exits once that read returns (a hung call may never)."""

    def __init__(self, read: Callable[[int], _GpuResult], name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[int, Future[_GpuResult]] | None] = queue.SimpleQueue()
        self._read = read
        self._reading_since: float | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, index: int) -> Future[_GpuResult]:
        future: Future[_GpuResult] = Future()
        self._jobs.put((index, future))
        return future

    def stalled_for(self) -> float:
        """Seconds the read under way has taken; 0 when idle."""
        since = self._reading_since
        return 0.0 if since is None else time.monotonic() - since

    def abandon(self) -> None:
        """Ends the thread once the reads queued to it are done; the caller cancels those it moves
        elsewhere (a cancelled one is skipped), so it reads nothing more than its read under way."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            index, future = job
            if not future.set_running_or_notify_cancel():
                continue  # moved to another thread
            self._reading_since = time.monotonic()
            try:
                future.set_result(self._read(index))
            except BaseException as error:  # surfaced to the poll loop through the future
                future.set_exception(error)
            finally:
                self._reading_since = None


class _OncePer:
    """Logs a message once per key: a fault that repeats every poll is one line, not one a second."""

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()

    def first(self, *key: Any) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class _Query:
    """Contained reads of one device during one read of its GPU (see the module docstring)."""

    def __init__(self, reader: NvmlReader, errors: list[tuple[str, str, str]], index: int, uuid: str) -> None:
        self._reader = reader
        self._errors = errors
        self._index = index
        self.uuid = uuid

    def value(self, name: str, handle: Any, *variants: Variant, exported: bool = False) -> Any | None:
        """The first variant that answers, starting from the one that answered here before; None
        when unsupported, missing or failed. Lost GPUs and a lost library are raised. An
        ``exported`` value that is not supported is logged once: its series will be missing."""
        reader = self._reader
        remembered = (self.uuid, name)
        first = reader.variant_of.get(remembered, 0) if len(variants) > 1 else 0
        for position in range(first, len(variants)):
            function, call = variants[position]
            if function in reader.missing_functions:
                continue
            try:
                result = call(handle)
            except pynvml.NVMLError as error:
                if error.value in _LIBRARY_FATAL:
                    raise _LibraryLostError(error) from error
                if error.value in _DEVICE_FATAL:
                    raise
                if error.value == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                    reader.forget_function(function, "the driver")
                    continue
                if error.value in _TRY_OLDER and position + 1 < len(variants):
                    reader.variant_of[remembered] = position + 1
                    continue
                if error.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
                    self._unsupported(name, exported)
                    return None
                self.count(error_kind(error))
                return None
            except AttributeError:  # not in these bindings (or a struct field they lack)
                reader.forget_function(function, "nvidia-ml-py")
                continue
            except Exception:
                self.count(UNEXPECTED)
                if reader.logged.first("unexpected", self.uuid, name):
                    log.exception("GPU %d (%s): reading %s failed; left out", self._index, self.uuid, name)
                return None
            return result
        self._unsupported(name, exported)  # every variant is missing from the bindings or the driver
        return None

    def count(self, kind: str) -> None:
        self._errors.append((str(self._index), self.uuid, kind))

    def for_device(self, uuid: str) -> _Query:
        """The same GPU's errors, for another device of it (a MIG device)."""
        return _Query(self._reader, self._errors, self._index, uuid)

    def _unsupported(self, name: str, exported: bool) -> None:
        if exported and self._reader.logged.first("unsupported", self.uuid, name):
            log.info("GPU %d (%s): %s not supported; that series is left out", self._index, self.uuid, name)


class NvmlReader:
    """Initialises NVML (retrying with backoff) and reads every GPU each poll."""

    def __init__(self, retry_min_s: float = 1.0, retry_max_s: float = 30.0, groups: Iterable[str] = GROUPS) -> None:
        self.initialised = False
        self.status = "NVML not initialised yet"
        self.driver_version = ""
        self._retry = Backoff(retry_min_s, retry_max_s)
        self._next_init = 0.0
        self._closed = False
        self._read_thread: _ReadThread | None = None
        self._read_threads: list[_ReadThread] = []  # the current one and those left to a stalled read
        self._in_flight: dict[int, Future[_GpuResult]] = {}
        self._last: dict[int, tuple[DeviceReading, ...]] = {}
        # The UUID each index last answered with: a lost GPU often cannot tell it any more.
        self._uuids: dict[int, str] = {}
        self._lost: set[int] = set()
        self._last_seen_us: dict[str, int] = {}
        self._interval_s = 1.0
        # What this process learnt about the calls: functions missing from the bindings or the
        # driver (they do not come back while it runs), and per (device, value) the variant to use.
        self.missing_functions: set[str] = set()
        self.variant_of: dict[tuple[str, str], int] = {}
        self.logged = _OncePer()
        self._families = enabled_families(groups)
        self._gpu_plan = _plan(reads_for(self._families, mig=False))
        self._mig_plan = _plan(reads_for(self._families, mig=True))
        self._xid_families = tuple(f for f in self._families if "xid" in f.reads)
        self._xid = XidWatcher() if self._xid_families else None
        self._polls = 0
        # Values read every few polls: (uuid, source) -> (poll read at, plain value).
        self._kept: dict[tuple[str, str], tuple[int, Any]] = {}
        self._gpm_supported: dict[str, bool] = {}
        self._gpm: dict[tuple[int, str], _GpmState] = {}  # (GPU index, device uuid) -> its GPM buffers

    @property
    def xid_gpus_watched(self) -> int:
        """GPUs registered for Xid events right now (0 with the health group off)."""
        return self._xid.registered if self._xid is not None else 0

    def forget_function(self, function: str, where: str) -> None:
        if function not in self.missing_functions:
            self.missing_functions.add(function)
            log.warning("%s is not in %s here: the older call is used, or the value is left out", function, where)

    def try_init(self) -> bool:
        """Initialises NVML if it is time to try; logs one line per change of status."""
        if self.initialised:
            return True
        now = time.monotonic()
        if self._closed or now < self._next_init:
            return False
        try:
            pynvml.nvmlInit()
            self.driver_version = _decoded(pynvml.nvmlSystemGetDriverVersion)
        except pynvml.NVMLError as error:
            status = f"NVML init failed: {error_kind(error)} ({error})"
            if error.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                status = "NVML init failed: libnvidia-ml.so.1 not found (no NVIDIA driver on this node?)"
            if status != self.status:
                log.error("%s; exporting self-metrics only, retrying with backoff", status)
            self.status = status
            self._next_init = now + self._retry.next_delay()
            return False
        self.initialised = True
        self._retry.reset()
        self.status = f"NVML initialised, driver {self.driver_version}"
        log.info("%s", self.status)
        return True

    def _lose_library(self, error: pynvml.NVMLError) -> None:
        if not self.initialised:
            return
        if self._xid is not None:
            self._xid.watch(())
        self._gpm.clear()  # allocated by the library that went away
        self.initialised = False
        self.status = f"NVML lost: {error_kind(error)}"
        log.error("%s; re-initialising", self.status)
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

    def close(self, timeout_s: float = 0.5) -> None:
        """Stops the GPU threads (one stuck in a driver call is a daemon and is left behind) and
        shuts NVML down. The reader reads nothing afterwards."""
        self._closed = True
        self._read_thread = None
        for future in list(self._in_flight.values()):
            future.cancel()  # queued reads are not begun after close
        for thread in self._read_threads:
            thread.abandon()
        deadline = time.monotonic() + timeout_s
        if self._xid is not None:
            self._xid.close()
        for thread in self._read_threads:
            thread.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = {index for index, future in list(self._in_flight.items()) if not future.done()}
        for (index, _uuid), state in list(self._gpm.items()):
            if index not in stuck:  # a stuck read may still hold its samples
                state.free()
        self._gpm.clear()
        if self.initialised:
            self.initialised = False
            self.status = "NVML shut down"
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    def poll(self, interval_s: float, deadline_s: float) -> NvmlPoll:
        """Reads all GPUs, waiting at most ``deadline_s`` for them; stuck GPUs keep their last reading."""
        if not self.try_init():
            return NvmlPoll(devices=(), errors=())
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as error:
            self._lose_library(error)
            return NvmlPoll(devices=(), errors=())
        self._interval_s = interval_s
        self._polls += 1
        for gone in [i for i in self._last if i >= count]:
            del self._last[gone]
        errors: list[tuple[str, str, str]] = []
        started: dict[int, Future[_GpuResult]] = {}
        stall_s = deadline_s / 4
        self._leave_stalled_thread(stall_s)  # a read that began hanging late in the last poll
        for index in range(count):
            previous = self._in_flight.get(index)
            if previous is not None and not previous.done():
                if not previous.running():  # queued since the last poll: waited for with this one's
                    started[index] = previous
                continue  # else still stuck in an earlier read: serve what we had
            if previous is not None:
                errors.extend(self._absorb(index, previous))
            started[index] = self._in_flight[index] = self._reading_thread().submit(index)
        self._wait_for_reads(started, deadline_s, stall_s)
        for index, future in started.items():
            if future.done():
                errors.extend(self._absorb(index, future))
        devices = tuple(d for index in sorted(self._last) if index < count for d in self._last[index])
        if self._xid is not None and self.initialised:
            self._xid.watch([(d.index, d.uuid) for d in devices if d.parent_uuid is None])
            devices = _with_xid(devices, self._xid.counts(), self._xid_families)
        return NvmlPoll(devices=devices, errors=tuple(errors))

    def _reading_thread(self) -> _ReadThread:
        if self._read_thread is None:
            self._read_threads = [t for t in self._read_threads if t.thread.is_alive()]
            self._read_thread = _ReadThread(self._read_gpu, f"nvml-read-{len(self._read_threads)}")
            self._read_threads.append(self._read_thread)
        return self._read_thread

    def _wait_for_reads(self, started: dict[int, Future[_GpuResult]], deadline_s: float, stall_s: float) -> None:
        """Waits until every read is done or ``deadline_s`` has passed (or the reader is closed),
        moving reads off a thread whose read has stalled."""
        deadline = time.monotonic() + deadline_s
        while (remaining := deadline - time.monotonic()) > 0 and not self._closed:
            pending = [future for future in started.values() if not future.done()]
            if not pending:
                return
            wait_futures(pending, timeout=min(remaining, stall_s))
            if self._leave_stalled_thread(stall_s):
                for index in started:
                    started[index] = self._in_flight[index]

    def _leave_stalled_thread(self, stall_s: float) -> bool:
        """When the reading thread's read has been under way for ``stall_s``, leaves the thread to
        it and moves every read queued behind it, from this poll or an earlier one, to a new
        thread. True when it did."""
        stalled = self._read_thread
        if stalled is None or stalled.stalled_for() < stall_s or self._closed:
            return False
        self._read_thread = None
        fresh = self._reading_thread()  # before any read is taken off the old one: this may fail
        stalled.abandon()
        for index, future in list(self._in_flight.items()):
            if future.cancel():  # queued, not begun
                self._in_flight[index] = fresh.submit(index)
        return True

    def _absorb(self, index: int, future: Future[_GpuResult]) -> list[tuple[str, str, str]]:
        """Takes in one finished read, exactly once (the future is dropped); never raises."""
        del self._in_flight[index]
        if future.cancelled():  # taken off a thread and not given to another: read again next poll
            return []
        error = future.exception()
        if error is not None:  # only what escapes _read_gpu's own guard (a BaseException)
            if self.logged.first("read escaped", index, type(error)):
                log.error("GPU %d: read failed: %r; its last reading ages out", index, error)
            return [(str(index), self._uuids.get(index, ""), UNEXPECTED)]
        result = future.result()
        if result.library_error is not None:
            self._lose_library(result.library_error)
            return []
        if result.lost:
            self._last.pop(result.index, None)
        elif result.devices is not None:
            self._last[result.index] = result.devices
        return result.errors

    def _read_gpu(self, index: int) -> _GpuResult:
        """One GPU and its MIG devices; no exception escapes (the result says what happened)."""
        result = _GpuResult(index=index)
        uuid = self._uuids.get(index, "")
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            query = _Query(self, result.errors, index, uuid)
            read_uuid = query.value("uuid", handle, _text(_binding("nvmlDeviceGetUUID")))
            if read_uuid is None:  # no identity, nothing to attribute: as if lost (the error is counted)
                result.lost = True
                self._log_lost(index, uuid, "no UUID")
                return result
            uuid = self._uuids[index] = query.uuid = read_uuid
            result.devices = self._read_device(handle, index, query)
        except _LibraryLostError as lost:
            result.library_error = lost.error
            return result
        except pynvml.NVMLError as error:
            if error.value in _LIBRARY_FATAL:
                result.library_error = error
                return result
            result.errors.append((str(index), uuid, error_kind(error)))
            result.lost = True
            self._log_lost(index, uuid, error_kind(error))
            return result
        except Exception:
            result.errors.append((str(index), uuid, UNEXPECTED))
            if self.logged.first("gpu read", index):
                log.exception("GPU %d (%s): read failed; its last reading ages out", index, uuid or "uuid unknown")
            return result
        if index in self._lost:
            self._lost.discard(index)
            log.info("GPU %d (%s) is answering again", index, uuid)
        return result

    def _log_lost(self, index: int, uuid: str, why: str) -> None:
        if index not in self._lost:
            self._lost.add(index)
            log.warning("GPU %d (%s) is lost (%s); its series are left out until it answers", index, uuid or "?", why)

    def _read_device(self, handle: Any, index: int, query: _Query) -> tuple[DeviceReading, ...]:
        model = query.value("name", handle, _text(_binding("nvmlDeviceGetName"))) or ""
        mig_mode = query.value("MIG mode", handle, _binding("nvmlDeviceGetMigMode"))
        mig_devices = self._read_mig_devices(handle, index, query, model) if mig_mode and mig_mode[0] else ()
        processes = query.value("process list", handle, ("nvmlDeviceGetComputeRunningProcesses", _running_processes))
        own_processes = processes
        if processes is not None and mig_devices:
            mig_gis = {d.gpu_instance_id for d in mig_devices}
            own_processes = tuple(p for p in processes if p.gpu_instance_id not in mig_gis)
            mig_devices = tuple(
                replace(d, processes=tuple(p for p in processes if p.gpu_instance_id == d.gpu_instance_id))
                for d in mig_devices
            )
        reads = self._read_sources(handle, query, self._gpu_plan)
        utilisation = reads.get("utilisation")
        process_sm = (
            query.value(
                "per-process utilisation",
                handle,
                ("nvmlDeviceGetProcessUtilization", lambda h: self._process_sm_percent(h, query.uuid)),
            )
            if utilisation is not None
            else None
        )
        memory = reads.get("memory")
        minor = query.value("minor number", handle, _binding("nvmlDeviceGetMinorNumber"))
        gpu = DeviceReading(
            index=index,
            uuid=query.uuid,
            model=model,
            sampled_at=time.monotonic(),
            minor_number=int(minor) if minor is not None else None,
            duty_cycle_percent=utilisation[0] if utilisation is not None else None,
            memory_used_bytes=memory[0] if memory is not None else None,
            memory_total_bytes=memory[1] if memory is not None else None,
            temperature_celsius=reads.get("temperature"),
            power_milliwatts=reads.get("power"),
            processes=own_processes,
            process_sm_percent=process_sm,
            metrics=device_samples(self._families, reads),
        )
        return (gpu, *mig_devices)

    def _read_sources(
        self, handle: Any, query: _Query, plan: _Plan, parent: Any = None, instance: int | None = None
    ) -> dict[str, Any]:
        """The plain value of each source (None: absent). A MIG device's GPM sample is taken through
        its ``parent`` GPU's handle and its GPU ``instance`` id."""
        reads: dict[str, Any] = {}
        for key, described, variants, every in plan:
            if key == "gpm":
                reads[key] = self._read_gpm(handle if parent is None else parent, query, instance)
            elif every > 1:
                cached = self._kept.get((query.uuid, key))
                if cached is None or self._polls - cached[0] >= every:
                    cached = self._kept[(query.uuid, key)] = (
                        self._polls,
                        query.value(described, handle, *variants, exported=True),
                    )
                reads[key] = cached[1]
            else:
                reads[key] = query.value(described, handle, *variants, exported=True)
        return reads

    def _read_gpm(self, handle: Any, query: _Query, instance: int | None) -> dict[int, float] | None:
        """GPM metrics between the device's last sample and one taken now; None where GPM is not
        supported (before Hopper) and on the first poll, which only takes a sample."""
        supported = self._gpm_supported.get(query.uuid)
        if supported is None:
            support = query.value("GPM support", handle, _binding("nvmlGpmQueryDeviceSupport"))
            if support is None:
                return None  # unsupported or failed: asked again next poll
            supported = self._gpm_supported[query.uuid] = bool(support.isSupportedDevice)
        if not supported:
            return None
        key = (query._index, query.uuid)
        result: dict[int, float] | None = query.value(
            "GPM metrics", handle, ("nvmlGpmSampleGet", lambda h: self._gpm_metrics(h, key, instance)), exported=True
        )
        return result

    def _gpm_metrics(self, handle: Any, key: tuple[int, str], instance: int | None) -> dict[int, float] | None:
        state = self._gpm.get(key)
        if state is None:
            state = self._gpm[key] = _GpmState.allocate()
        target = 1 if state.latest == 0 else 0  # the buffer not holding the last sample
        if instance is None:
            pynvml.nvmlGpmSampleGet(handle, state.samples[target])
        else:
            pynvml.nvmlGpmMigSampleGet(handle, instance, state.samples[target])
        previous, state.latest = state.latest, target
        if previous is None:
            return None
        request = state.request
        request.sample1, request.sample2 = state.samples[previous], state.samples[target]
        pynvml.nvmlGpmMetricsGet(request)
        answered = [request.metrics[slot] for slot in range(len(GPM_METRICS))]
        return {int(m.metricId): float(m.value) for m in answered if m.nvmlReturn == pynvml.NVML_SUCCESS}

    def _read_mig_devices(self, handle: Any, index: int, query: _Query, model: str) -> tuple[DeviceReading, ...]:
        found: list[DeviceReading] = []
        slots = query.value("MIG count", handle, _binding("nvmlDeviceGetMaxMigDeviceCount")) or 0
        for slot in range(int(slots)):
            mig = query.value("MIG device", handle, ("nvmlDeviceGetMigDeviceHandleByIndex", _mig_slot(slot)))
            if mig is None:  # an empty slot, or an error counted
                continue
            mig_uuid = query.value("MIG uuid", mig, _text(_binding("nvmlDeviceGetUUID")))
            instance = query.value("MIG instance", mig, _binding("nvmlDeviceGetGpuInstanceId"))
            if mig_uuid is None or instance is None:
                continue  # a MIG device that cannot say who it is cannot be attributed
            mig_query = query.for_device(mig_uuid)
            reads = self._read_sources(mig, mig_query, self._mig_plan, parent=handle, instance=int(instance))
            memory = reads.get("memory")
            found.append(
                DeviceReading(
                    index=index,
                    uuid=mig_uuid,
                    model=mig_query.value("name", mig, _text(_binding("nvmlDeviceGetName"))) or model,
                    sampled_at=time.monotonic(),
                    parent_uuid=query.uuid,
                    gpu_instance_id=int(instance),
                    memory_used_bytes=memory[0] if memory is not None else None,
                    memory_total_bytes=memory[1] if memory is not None else None,
                    metrics=device_samples(self._families, reads),
                )
            )
        return tuple(found)

    def _process_sm_percent(self, handle: Any, uuid: str) -> dict[int, float]:
        """Latest SM utilisation per PID among samples newer than the last one seen on this GPU."""
        now_us = int(time.time() * 1e6)
        since = self._last_seen_us.get(uuid, now_us - int(self._interval_s * 1e6))
        try:
            samples = pynvml.nvmlDeviceGetProcessUtilization(handle, since)
        except pynvml.NVMLError as error:
            if error.value == pynvml.NVML_ERROR_NOT_FOUND:
                return {}  # no process used the GPU since the last sample
            raise
        latest: dict[int, tuple[int, float]] = {}
        for sample in samples:
            if sample.pid not in latest or sample.timeStamp >= latest[sample.pid][0]:
                latest[sample.pid] = (sample.timeStamp, float(sample.smUtil))
        if latest:
            self._last_seen_us[uuid] = max(ts for ts, _ in latest.values())
        return {pid: util for pid, (_, util) in latest.items()}


def _mig_slot(slot: int) -> Callable[[Any], Any]:
    def handle_in_slot(handle: Any) -> Any:
        try:
            return pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError as error:
            if error.value in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                return None  # no MIG device in this slot
            raise

    return handle_in_slot


def _decoded(call: Callable[[], Any]) -> str:
    try:
        return str(call())
    except UnicodeDecodeError as error:
        return bytes(error.object).decode("utf-8", errors="replace")


def _with_xid(
    devices: tuple[DeviceReading, ...], counts: XidCounts, families: tuple[Family, ...]
) -> tuple[DeviceReading, ...]:
    """Each device's Xid counts: an event naming a GPU instance counts on that MIG device (on its
    GPU while no such MIG device is known)."""
    migs = {(d.parent_uuid, d.gpu_instance_id): d.uuid for d in devices if d.parent_uuid is not None}
    per_device: dict[str, Counter[int]] = {}
    for (gpu_uuid, instance), by_xid in counts.items():
        target = migs.get((gpu_uuid, instance), gpu_uuid)
        per_device.setdefault(target, Counter()).update(by_xid)
    merged = []
    for device in devices:
        xids: Mapping[int, int] | None = per_device.get(device.uuid)
        if xids:
            device = replace(device, metrics={**device.metrics, **device_samples(families, {"xid": xids})})
        merged.append(device)
    return tuple(merged)


def _running_processes(handle: Any) -> tuple[GpuProcess, ...]:
    def instance(value: int) -> int | None:
        return None if value == _NO_INSTANCE else value

    return tuple(
        GpuProcess(
            pid=int(p.pid),
            used_memory_bytes=p.usedGpuMemory,
            gpu_instance_id=instance(p.gpuInstanceId),
            compute_instance_id=instance(p.computeInstanceId),
        )
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    )
