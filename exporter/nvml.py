"""The NVML edge: the only module that imports ``pynvml``. Turns the driver into DeviceReadings.

Every NVML call goes through ``_query``, which maps NOT_SUPPORTED to a sentinel so an unsupported
value is left out rather than reported as 0. Each GPU is read on its own daemon thread: NVML calls
can block for a long time after some driver faults (a ctypes call cannot be interrupted), and one
stuck GPU must not stop the others from being read, nor the process from exiting.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

import pynvml

from exporter.model import DeviceReading, GpuProcess

log = logging.getLogger(__name__)

T = TypeVar("T")
_NO_INSTANCE = 0xFFFFFFFF
_ERROR_NAMES = {
    getattr(pynvml, name): name.removeprefix("NVML_ERROR_") for name in dir(pynvml) if name.startswith("NVML_ERROR_")
}
# Errors after which the handle itself is gone: the whole device is dropped from this poll.
_DEVICE_FATAL = {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED}
# Errors that mean NVML itself went away: re-initialise.
_LIBRARY_FATAL = {pynvml.NVML_ERROR_UNINITIALIZED, pynvml.NVML_ERROR_DRIVER_NOT_LOADED}
# A newer call variant this driver lacks: use the older one.
_TRY_OLDER = {
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
}
# Values that become series: an unsupported one is logged once, as its series will be missing.
_EXPORTED = {"utilisation", "memory info", "temperature", "power usage"}


class _Unsupported:
    """The value the device does not support: leave the sample out."""

    def __repr__(self) -> str:
        return "UNSUPPORTED"


UNSUPPORTED = _Unsupported()


def error_kind(error: pynvml.NVMLError) -> str:
    return _ERROR_NAMES.get(error.value, f"CODE_{error.value}")


def _query(fn: Callable[..., T], *args: Any) -> T | _Unsupported:
    try:
        return fn(*args)
    except pynvml.NVMLError as error:
        if error.value == pynvml.NVML_ERROR_NOT_SUPPORTED:
            return UNSUPPORTED
        raise


def _value(result: T | _Unsupported) -> T | None:
    return None if isinstance(result, _Unsupported) else result


@dataclass(frozen=True)
class NvmlPoll:
    """One poll: the devices read (fresh or carried over while their read is stuck) and errors."""

    devices: tuple[DeviceReading, ...]
    errors: tuple[tuple[str, str, str], ...]  # (gpu index, uuid, error kind)


@dataclass
class _GpuResult:
    index: int
    devices: tuple[DeviceReading, ...] = ()
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    lost: bool = False


class _GpuWorker:
    """A daemon thread that reads one GPU when asked; a hung call blocks only this thread."""

    def __init__(self, index: int, read: Callable[[int], _GpuResult]) -> None:
        self._requests: queue.Queue[Future[_GpuResult]] = queue.Queue()
        self._read = read
        self._index = index
        threading.Thread(target=self._run, name=f"nvml-gpu{index}", daemon=True).start()

    def submit(self) -> Future[_GpuResult]:
        future: Future[_GpuResult] = Future()
        self._requests.put(future)
        return future

    def _run(self) -> None:
        while True:
            future = self._requests.get()
            try:
                future.set_result(self._read(self._index))
            except BaseException as error:  # surfaced to the poll loop through the future
                future.set_exception(error)


class NvmlReader:
    """Initialises NVML (retrying with backoff) and reads every GPU each poll."""

    def __init__(self, retry_min_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.initialised = False
        self.status = "NVML not initialised yet"
        self.driver_version = ""
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._retry_s = retry_min_s
        self._next_init = 0.0
        self._workers: dict[int, _GpuWorker] = {}
        self._in_flight: dict[int, Future[_GpuResult]] = {}
        self._last: dict[int, tuple[DeviceReading, ...]] = {}
        self._last_seen_us: dict[str, int] = {}
        self._unsupported_logged: set[tuple[str, str]] = set()
        self._interval_s = 1.0

    def try_init(self) -> bool:
        """Initialises NVML if it is time to try; logs one line per change of status."""
        if self.initialised:
            return True
        now = time.monotonic()
        if now < self._next_init:
            return False
        try:
            pynvml.nvmlInit()
            self.driver_version = str(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as error:
            status = f"NVML init failed: {error_kind(error)} ({error})"
            if error.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                status = "NVML init failed: libnvidia-ml.so.1 not found (no NVIDIA driver on this node?)"
            if status != self.status:
                log.error("%s; exporting self-metrics only, retrying with backoff", status)
            self.status = status
            self._next_init = now + self._retry_s
            self._retry_s = min(self._retry_s * 2, self._retry_max_s)
            return False
        self.initialised = True
        self._retry_s = self._retry_min_s
        self.status = f"NVML initialised, driver {self.driver_version}"
        log.info("%s", self.status)
        return True

    def _lose_library(self, error: pynvml.NVMLError) -> None:
        self.initialised = False
        self.status = f"NVML lost: {error_kind(error)}"
        log.error("%s; re-initialising", self.status)
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

    def poll(self, interval_s: float, deadline_s: float) -> NvmlPoll:
        """Reads all GPUs, waiting at most ``deadline_s`` for them; stuck GPUs keep their last reading."""
        if not self.try_init():
            return NvmlPoll(devices=(), errors=())
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as error:
            self._lose_library(error)
            return NvmlPoll(devices=(), errors=())
        self._interval_s = interval_s
        for gone in [i for i in self._last if i >= count]:
            del self._last[gone]
        started: dict[int, Future[_GpuResult]] = {}
        for index in range(count):
            previous = self._in_flight.get(index)
            if previous is not None and not previous.done():
                continue  # still stuck in an earlier read: serve what we had
            if previous is not None:
                self._absorb(previous)
            worker = self._workers.get(index)
            if worker is None:
                worker = self._workers[index] = _GpuWorker(index, self._read_gpu)
            started[index] = self._in_flight[index] = worker.submit()
        wait_futures(list(started.values()), timeout=deadline_s)
        errors: list[tuple[str, str, str]] = []
        for index, future in started.items():
            if future.done():
                errors.extend(self._absorb(future))
                del self._in_flight[index]
        devices = tuple(d for index in sorted(self._last) if index < count for d in self._last[index])
        return NvmlPoll(devices=devices, errors=tuple(errors))

    def _absorb(self, future: Future[_GpuResult]) -> list[tuple[str, str, str]]:
        error = future.exception()
        if error is not None:
            if isinstance(error, pynvml.NVMLError) and error.value in _LIBRARY_FATAL:
                self._lose_library(error)
                return []
            raise error
        result = future.result()
        if result.lost:
            self._last.pop(result.index, None)
        else:
            self._last[result.index] = result.devices
        return result.errors

    def _read_gpu(self, index: int) -> _GpuResult:
        result = _GpuResult(index=index)
        known = self._last.get(index)
        uuid = known[0].uuid if known else ""  # a lost GPU often cannot tell its UUID any more
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = str(pynvml.nvmlDeviceGetUUID(handle))
            result.devices = self._read_device(handle, index, uuid, result.errors)
        except pynvml.NVMLError as error:
            if error.value in _LIBRARY_FATAL:
                raise
            result.errors.append((str(index), uuid, error_kind(error)))
            result.lost = True
            if error.value not in _DEVICE_FATAL:
                log.warning("GPU %d (%s): %s", index, uuid or "uuid unknown", error)
        return result

    def _field(
        self, errors: list[tuple[str, str, str]], index: int, uuid: str, name: str, fn: Callable[..., T], *args: Any
    ) -> T | None:
        """One value; unsupported or failed values are left out (failures counted, lost GPUs raised)."""
        try:
            result = _query(fn, *args)
        except pynvml.NVMLError as error:
            if error.value in _DEVICE_FATAL or error.value in _LIBRARY_FATAL:
                raise
            errors.append((str(index), uuid, error_kind(error)))
            return None
        if isinstance(result, _Unsupported) and (uuid, name) not in self._unsupported_logged:
            self._unsupported_logged.add((uuid, name))
            if name in _EXPORTED:
                log.info("GPU %d (%s): %s not supported; that series is left out", index, uuid, name)
        return _value(result)

    def _read_device(
        self, handle: Any, index: int, uuid: str, errors: list[tuple[str, str, str]]
    ) -> tuple[DeviceReading, ...]:
        field = partial(self._field, errors, index, uuid)
        model = field("name", _name, handle) or ""
        mig_devices = (
            self._read_mig_devices(handle, index, uuid, model, errors) if field("MIG mode", _mig_mode, handle) else ()
        )
        processes = field("process list", _running_processes, handle)
        own_processes = processes
        if processes is not None and mig_devices:
            mig_gis = {d.gpu_instance_id for d in mig_devices}
            own_processes = tuple(p for p in processes if p.gpu_instance_id not in mig_gis)
            mig_devices = tuple(
                replace(d, processes=tuple(p for p in processes if p.gpu_instance_id == d.gpu_instance_id))
                for d in mig_devices
            )
        utilisation = field("utilisation", _utilisation, handle)
        process_sm = (
            field("per-process utilisation", self._process_sm_percent, handle, uuid)
            if utilisation is not None
            else None
        )
        memory = field("memory info", _memory_info, handle)
        gpu = DeviceReading(
            index=index,
            uuid=uuid,
            model=model,
            sampled_at=time.monotonic(),
            minor_number=field("minor number", _minor_number, handle),
            duty_cycle_percent=utilisation,
            memory_used_bytes=memory[0] if memory else None,
            memory_total_bytes=memory[1] if memory else None,
            temperature_celsius=field("temperature", _temperature, handle),
            power_milliwatts=field("power usage", _power, handle),
            processes=own_processes,
            process_sm_percent=process_sm,
        )
        return (gpu, *mig_devices)

    def _read_mig_devices(
        self, handle: Any, index: int, uuid: str, model: str, errors: list[tuple[str, str, str]]
    ) -> tuple[DeviceReading, ...]:
        found: list[DeviceReading] = []
        slots = self._field(errors, index, uuid, "MIG count", pynvml.nvmlDeviceGetMaxMigDeviceCount, handle)
        for slot in range(slots or 0):
            try:
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except pynvml.NVMLError as error:
                if error.value in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                    continue  # an empty slot
                raise
            mig_uuid = str(pynvml.nvmlDeviceGetUUID(mig))
            field = partial(self._field, errors, index, mig_uuid)
            memory = field("memory info", _memory_info, mig)
            found.append(
                DeviceReading(
                    index=index,
                    uuid=mig_uuid,
                    model=field("name", _name, mig) or model,
                    sampled_at=time.monotonic(),
                    parent_uuid=uuid,
                    gpu_instance_id=int(pynvml.nvmlDeviceGetGpuInstanceId(mig)),
                    memory_used_bytes=memory[0] if memory else None,
                    memory_total_bytes=memory[1] if memory else None,
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


def _memory_info(handle: Any) -> tuple[int, int]:
    """(used, total) bytes; v2 where the driver has it (v1 counts reserved memory as used)."""
    try:
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except pynvml.NVMLError as error:
        if error.value not in _TRY_OLDER:
            raise
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return int(memory.used), int(memory.total)


def _temperature(handle: Any) -> float:
    """The GPU core sensor; the versioned call where the driver has it, else the deprecated one."""
    try:
        return float(pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU))
    except pynvml.NVMLError as error:
        if error.value not in _TRY_OLDER:
            raise
        return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


def _name(handle: Any) -> str:
    return str(pynvml.nvmlDeviceGetName(handle))


def _minor_number(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetMinorNumber(handle))


def _mig_mode(handle: Any) -> bool:
    return bool(pynvml.nvmlDeviceGetMigMode(handle)[0])


def _utilisation(handle: Any) -> float:
    return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def _power(handle: Any) -> float:
    return float(pynvml.nvmlDeviceGetPowerUsage(handle))
