"""The NVML reader: initialises NVML and turns every GPU into DeviceReadings each poll.

It wires the NVML parts, each in a module of its own: every value is read through the
fault-contained query (exporter.sources.nvmlquery), GPM metrics come from exporter.sources.gpm,
Xid counts from the events watcher (exporter.sources.nvmlevents), merged in at each poll, and the
corrected-ECC rate across polls from exporter.sources.errorrate.
What is read is driven by the metric catalogue (exporter.catalogue): the sources the enabled
groups need, each at its cadence.

The GPUs are read one after another off the poll loop, on a stall-tolerant executor
(exporter.stallpool): NVML calls can block for a long time after some driver faults. A GPU whose
read stalls keeps its last reading, which ages out, and is not asked again until the read returns;
each GPU's state (stalled, lost, failing) is logged once when it begins and once when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import pynvml

from exporter.backoff import Backoff
from exporter.catalogue import (
    DEFAULT_GROUPS,
    XID_COUNTS,
    XID_SEEN,
    Family,
    Source,
    Via,
    device_samples,
    enabled_families,
    reads_for,
)
from exporter.model import DeviceError, DeviceReading, GpuProcess, LostGpu
from exporter.sources.errorrate import PerMinute
from exporter.sources.gpm import GpmSampler
from exporter.sources.nvmlevents import XidCounts, XidWatcher
from exporter.sources.nvmlquery import (
    LIBRARY_FATAL,
    UNEXPECTED,
    CallMemory,
    DeviceQuery,
    LibraryLostError,
    Variant,
    binding,
    decoded,
    error_kind,
    text,
    variants,
)
from exporter.stallpool import StallPool
from exporter.supervise import StateLog, describe

log = logging.getLogger(__name__)

_NO_INSTANCE = 0xFFFFFFFF  # a process on no MIG GPU/compute instance


@dataclass(frozen=True)
class NvmlPoll:
    """One poll: the devices read (fresh or carried over while their read is stuck), errors, and
    the GPUs NVML lists that cannot be read (lost)."""

    devices: tuple[DeviceReading, ...]
    errors: tuple[DeviceError, ...]
    lost: tuple[LostGpu, ...] = ()


class _PlannedRead(NamedTuple):
    key: str
    described: str
    variants: tuple[Variant, ...]
    every: int  # read every this many polls


class _Plan(NamedTuple):
    """What a reader reads on each device, worked out once."""

    calls: tuple[_PlannedRead, ...]
    gpm_key: str | None  # where the GPM metrics go, when an enabled family needs them


def _plan(sources: Iterable[Source]) -> _Plan:
    sources = tuple(sources)
    calls = tuple(
        _PlannedRead(s.key, s.described, variants(s), s.every) for s in sources if s.via is Via.CALLS
    )  # Xid counts come from the events watcher, merged in at the end of a poll
    return _Plan(calls, next((s.key for s in sources if s.via is Via.GPM_SAMPLES), None))


@dataclass
class _GpuResult:
    """What one read of a GPU found; made on a reading thread, taken in on the poll thread."""

    uuid: str  # as it answered, or as it last answered
    devices: tuple[DeviceReading, ...] | None = None  # None: keep the last reading (it ages out)
    errors: list[DeviceError] = field(default_factory=list)
    lost: str | None = None  # why the GPU is lost: its last reading is dropped
    failure: Exception | None = None  # an unexpected fault: its last reading ages out
    library_error: pynvml.NVMLError | None = None


class MigDevice(NamedTuple):
    handle: Any
    uuid: str
    gpu_instance_id: int


def mig_devices(query: DeviceQuery, gpu: Any) -> list[MigDevice]:
    """The MIG devices of a GPU in MIG mode; a slot that is empty, or a device that cannot say who
    it is (it could not be attributed), is skipped."""
    found: list[MigDevice] = []
    slots = query.value("MIG count", gpu, binding("nvmlDeviceGetMaxMigDeviceCount")) or 0
    for slot in range(int(slots)):
        mig = query.value("MIG device", gpu, Variant("nvmlDeviceGetMigDeviceHandleByIndex", _mig_slot(slot)))
        if mig is None:  # an empty slot, or an error counted
            continue
        uuid = query.value("MIG uuid", mig, text(binding("nvmlDeviceGetUUID")))
        instance = query.value("MIG instance", mig, binding("nvmlDeviceGetGpuInstanceId"))
        if uuid is not None and instance is not None:
            found.append(MigDevice(mig, uuid, int(instance)))
    return found


def with_xid_events(
    devices: tuple[DeviceReading, ...],
    counts: XidCounts,
    seen: Mapping[str, Mapping[int, float]],
    watched: frozenset[str],
    families: tuple[Family, ...],
) -> tuple[DeviceReading, ...]:
    """Each device's Xid events as its ``families``' samples: the events counted per code (an event
    naming a GPU instance counts on that MIG device, on its GPU while no such MIG device is known);
    and on a GPU watched or with an event seen, the latest event time per code (for the health rules
    and the last code)."""
    migs = {(d.parent_uuid, d.gpu_instance_id): d.uuid for d in devices if d.parent_uuid is not None}
    per_device: dict[str, Counter[int]] = {}
    for (gpu_uuid, instance), by_xid in counts.items():
        target = migs.get((gpu_uuid, instance), gpu_uuid)
        per_device.setdefault(target, Counter()).update(by_xid)
    merged = []
    for device in devices:
        reads: dict[str, Any] = {}
        if device.uuid in per_device:
            reads[XID_COUNTS] = per_device[device.uuid]
        gpu_seen = seen.get(device.uuid, {}) if device.parent_uuid is None else {}
        if gpu_seen or (device.parent_uuid is None and device.uuid in watched):
            reads[XID_SEEN] = gpu_seen
            device = replace(device, xid_seen=gpu_seen)
        if reads:
            device = replace(device, metrics={**device.metrics, **device_samples(families, reads)})
        merged.append(device)
    return tuple(merged)


class NvmlReader:
    """Initialises NVML (retrying with backoff) and reads every GPU each poll."""

    def __init__(
        self, retry_min_s: float = 1.0, retry_max_s: float = 30.0, groups: Iterable[str] = DEFAULT_GROUPS
    ) -> None:
        self.initialised = False
        self.status = "NVML not initialised yet"
        self.driver_version = ""
        # GPUs whose read has not returned for a quarter of the poll deadline, as of the last poll.
        self.stalled_gpus: frozenset[int] = frozenset()
        self._retry = Backoff(retry_min_s, retry_max_s)
        self._next_init = 0.0
        self._nvml_state = StateLog(log, "NVML", level=logging.ERROR)
        self._closed = False
        self._pool: StallPool[int, _GpuResult] = StallPool(self._read_gpu, "nvml-read")
        self._last: dict[int, tuple[DeviceReading, ...]] = {}
        self._lost: dict[int, LostGpu] = {}  # GPUs lost as of their last read, by index
        # The UUID each index last answered with: a lost GPU often cannot tell it any more.
        self._uuids: dict[int, str] = {}
        self._gpu_states: dict[int, StateLog] = {}
        self._last_seen_us: dict[str, int] = {}
        self._interval_s = 1.0
        self._calls = CallMemory()
        self._families = enabled_families(groups)
        self._gpu_plan = _plan(reads_for(self._families, mig=False))
        self._mig_plan = _plan(reads_for(self._families, mig=True))
        xid_keys = {s.key for s in reads_for(self._families, mig=False) if s.via is Via.XID_EVENTS}
        self._xid_families = tuple(f for f in self._families if xid_keys & set(f.reads))
        self._xid = XidWatcher() if self._xid_families else None
        self._polls = 0
        # Values read every few polls: (uuid, source) -> (poll read at, plain value).
        self._kept: dict[tuple[str, str], tuple[int, Any]] = {}
        # What never changes for a device (its name, its minor number): (uuid, what) -> value.
        self._fixed: dict[tuple[str, str], Any] = {}
        self._present: set[str] = set()  # the UUIDs of the last poll's devices
        self._corrected_ecc = PerMinute()  # for the health rules' correctable-error storm
        self._gpm = GpmSampler()

    @property
    def xid_gpus_watched(self) -> int:
        """GPUs registered for Xid events right now (0 with the health group off)."""
        return self._xid.registered if self._xid is not None else 0

    def try_init(self) -> bool:
        """Initialises NVML if it is time to try; logs one line per change of status."""
        if self.initialised:
            return True
        now = time.monotonic()
        if self._closed or now < self._next_init:
            return False
        try:
            pynvml.nvmlInit()
            self.driver_version = decoded(pynvml.nvmlSystemGetDriverVersion)
        except pynvml.NVMLError as error:
            state = f"init failed: {error_kind(error)} ({error})"
            if error.value == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                state = "init failed: libnvidia-ml.so.1 not found (no NVIDIA driver on this node?)"
            self.status = f"NVML {state}"
            self._nvml_state.failed(state, "exporting self-metrics only, retrying with backoff")
            self._next_init = now + self._retry.next_delay()
            return False
        self.initialised = True
        self._retry.reset()
        self.status = f"NVML initialised, driver {self.driver_version}"
        if not self._nvml_state.recovered(self.status):
            log.info("%s", self.status)
        return True

    def close(self, timeout_s: float = 0.5) -> None:
        """Stops the reading threads (one stuck in a driver call is a daemon and is left behind) and
        shuts NVML down. The reader reads nothing afterwards."""
        self._closed = True
        stuck = self._pool.close(timeout_s)
        if self._xid is not None:
            self._xid.close()
        self._gpm.free(keep_gpus=stuck)  # a stuck read may still hold its samples
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
        self._lost = {i: gpu for i, gpu in self._lost.items() if i < count}
        errors: list[DeviceError] = []
        started: list[int] = []
        stall_s = deadline_s / 4
        self._pool.leave_stalled(stall_s)  # a read that began hanging late in the last poll
        for index in range(count):
            previous = self._pool.in_flight(index)
            if previous is not None and not previous.done():
                if not previous.running():  # queued since the last poll: waited for with this one's
                    started.append(index)
                continue  # else still stuck in an earlier read: serve what we had
            errors.extend(self._absorb(index))
            self._pool.submit(index)
            started.append(index)
        self._pool.wait(started, deadline_s, stall_s)
        for index in started:
            errors.extend(self._absorb(index))
        self._note_stalls(stall_s)
        devices = tuple(d for index in sorted(self._last) if index < count for d in self._last[index])
        self._forget_gone({d.uuid for d in devices})
        if self._xid is not None and self.initialised:
            self._xid.watch([(d.index, d.uuid) for d in devices if d.parent_uuid is None])
            xid = self._xid
            devices = with_xid_events(devices, xid.counts(), xid.last_seen(), xid.watched(), self._xid_families)
        lost = tuple(self._lost[index] for index in sorted(self._lost))
        return NvmlPoll(devices=devices, errors=tuple(errors), lost=lost)

    def _forget_gone(self, present: set[str]) -> None:
        """Drops what is kept by UUID for devices no longer here (MIG devices come and go with every
        reconfiguration), so what is kept stays bounded by the devices present."""
        if present == self._present:
            return
        self._present = present
        self._kept = {key: value for key, value in self._kept.items() if key[0] in present}
        self._fixed = {key: value for key, value in self._fixed.items() if key[0] in present}
        self._corrected_ecc.keep_only(present)

    def _gpu_state(self, index: int) -> StateLog:
        state = self._gpu_states.get(index)
        if state is None:
            state = self._gpu_states[index] = StateLog(log, f"GPU {index}")
        return state

    def _note_stalls(self, stall_s: float) -> None:
        self.stalled_gpus = frozenset(self._pool.stalled(stall_s))
        for index in self.stalled_gpus:
            self._gpu_state(index).failed(
                f"a read has not returned for {stall_s:g} s", "its last reading is served until it ages out"
            )

    def _absorb(self, index: int) -> list[DeviceError]:
        """Takes in the GPU's finished read, if any, exactly once; never raises."""
        future: Future[_GpuResult] | None = self._pool.take(index)
        if future is None or future.cancelled():  # a cancelled read is made again next poll
            return []
        state = self._gpu_state(index)
        error = future.exception()
        if error is not None:  # only what escapes _read_gpu's own guard (a BaseException)
            state.failed(describe(error), "its last reading ages out", exc_info=error)
            return [DeviceError(str(index), self._uuids.get(index, ""), UNEXPECTED)]
        result = future.result()
        if result.library_error is not None:
            self._lose_library(result.library_error)
            return []
        if result.uuid:
            self._uuids[index] = result.uuid
        if result.lost is not None:
            last = self._last.pop(index, None)
            known = self._lost.get(index)
            model = last[0].model if last else known.model if known else ""
            self._lost[index] = LostGpu(index, result.uuid, model, result.lost)
            state.failed(f"{result.uuid or '?'} is lost ({result.lost})", "its series are left out until it answers")
        elif result.failure is not None:
            state.failed(describe(result.failure), "its last reading ages out", exc_info=result.failure)
        elif result.devices is not None:
            self._last[index] = result.devices
            self._lost.pop(index, None)
            state.recovered(f"{result.uuid} answering again")
        return result.errors

    def _lose_library(self, error: pynvml.NVMLError) -> None:
        if not self.initialised:
            return
        if self._xid is not None:
            self._xid.watch(())
        self._gpm.forget()  # allocated by the library that went away
        self.initialised = False
        state = f"lost: {error_kind(error)}"
        self.status = f"NVML {state}"
        self._nvml_state.failed(state, "re-initialising")
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()

    def _read_gpu(self, index: int) -> _GpuResult:
        """One GPU and its MIG devices, on a reading thread; no exception escapes (the result says
        what happened, and the poll thread logs it)."""
        result = _GpuResult(uuid=self._uuids.get(index, ""))
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            query = DeviceQuery(self._calls, result.errors, index, result.uuid)
            uuid = query.value("uuid", handle, text(binding("nvmlDeviceGetUUID")))
            if uuid is None:  # no identity, nothing to attribute: as if lost (the error is counted)
                result.lost = "no UUID"
                return result
            result.uuid = query.uuid = uuid
            result.devices = self._read_device(handle, query)
        except LibraryLostError as lost:
            result.library_error = lost.error
        except pynvml.NVMLError as error:
            if error.value in LIBRARY_FATAL:
                result.library_error = error
            else:
                result.errors.append(DeviceError(str(index), result.uuid, error_kind(error)))
                result.lost = error_kind(error)
        except Exception as error:
            result.errors.append(DeviceError(str(index), result.uuid, UNEXPECTED))
            result.failure = error
        return result

    def _fixed_value(self, query: DeviceQuery, described: str, handle: Any, *variants: Variant) -> Any | None:
        """A value that never changes for a device, read until it is known, then kept by UUID."""
        key = (query.uuid, described)
        value = self._fixed.get(key)
        if value is None:
            value = query.value(described, handle, *variants)
            if value is not None:
                self._fixed[key] = value
        return value

    def _read_device(self, handle: Any, query: DeviceQuery) -> tuple[DeviceReading, ...]:
        model = self._fixed_value(query, "name", handle, text(binding("nvmlDeviceGetName"))) or ""
        bus_id = self._fixed_value(query, "PCI bus id", handle, *_PCI_BUS_ID)
        mig_mode = query.value("MIG mode", handle, binding("nvmlDeviceGetMigMode"))
        migs = (
            [self._read_mig(handle, query, mig, model, bus_id) for mig in mig_devices(query, handle)]
            if mig_mode and mig_mode[0]
            else []
        )
        processes = query.value(
            "process list", handle, Variant("nvmlDeviceGetComputeRunningProcesses", _running_processes)
        )
        own_processes = processes
        if processes is not None and migs:
            mig_gis = {d.gpu_instance_id for d in migs}
            own_processes = tuple(p for p in processes if p.gpu_instance_id not in mig_gis)
            migs = [
                replace(d, processes=tuple(p for p in processes if p.gpu_instance_id == d.gpu_instance_id))
                for d in migs
            ]
        reads = self._read_sources(handle, query, self._gpu_plan)
        utilisation = reads.get("utilisation")
        process_sm: dict[int, float] | None = None
        if utilisation is not None and processes == ():
            process_sm = {}  # no process listed: no sample could name one (an idle node's every poll)
        elif utilisation is not None:
            process_sm = query.value(
                "per-process utilisation",
                handle,
                Variant("nvmlDeviceGetProcessUtilization", lambda h: self._process_sm_percent(h, query.uuid)),
            )
        memory = reads.get("memory")
        minor = self._fixed_value(query, "minor number", handle, binding("nvmlDeviceGetMinorNumber"))
        if "ecc_corrected" in reads and self._read_this_poll(query.uuid, "ecc_corrected"):
            self._corrected_ecc.read(query.uuid, time.monotonic(), reads["ecc_corrected"])
        gpu = DeviceReading(
            index=query.index,
            uuid=query.uuid,
            model=model,
            sampled_at=time.monotonic(),
            pci_bus_id=bus_id,
            minor_number=int(minor) if minor is not None else None,
            duty_cycle_percent=utilisation.gpu if utilisation is not None else None,
            memory_used_bytes=memory.used if memory is not None else None,
            memory_total_bytes=memory.total if memory is not None else None,
            temperature_celsius=reads.get("temperature"),
            power_milliwatts=reads.get("power"),
            processes=own_processes,
            process_sm_percent=process_sm,
            metrics=device_samples(self._families, reads),
            reads=reads,
            corrected_ecc_per_minute=self._corrected_ecc.rate(query.uuid),
        )
        return (gpu, *migs)

    def _read_this_poll(self, uuid: str, key: str) -> bool:
        """Whether the source was read in this poll rather than served from an earlier one."""
        kept = self._kept.get((uuid, key))
        return kept is None or kept[0] == self._polls

    def _read_mig(self, gpu: Any, query: DeviceQuery, mig: MigDevice, model: str, bus_id: str | None) -> DeviceReading:
        mig_query = query.for_device(mig.uuid)
        reads = self._read_sources(mig.handle, mig_query, self._mig_plan, gpu=gpu, instance=mig.gpu_instance_id)
        memory = reads.get("memory")
        return DeviceReading(
            index=query.index,
            uuid=mig.uuid,
            model=self._fixed_value(mig_query, "name", mig.handle, text(binding("nvmlDeviceGetName"))) or model,
            sampled_at=time.monotonic(),
            pci_bus_id=bus_id,  # its GPU's, as dcgm-exporter labels a MIG device
            parent_uuid=query.uuid,
            gpu_instance_id=mig.gpu_instance_id,
            memory_used_bytes=memory.used if memory is not None else None,
            memory_total_bytes=memory.total if memory is not None else None,
            metrics=device_samples(self._families, reads),
        )

    def _read_sources(
        self, handle: Any, query: DeviceQuery, plan: _Plan, gpu: Any = None, instance: int | None = None
    ) -> dict[str, Any]:
        """The plain value of each source (None: absent). A MIG device's GPM sample is taken through
        its ``gpu``'s handle and its GPU ``instance`` id."""
        reads: dict[str, Any] = {}
        for read in plan.calls:
            if read.every > 1:
                cached = self._kept.get((query.uuid, read.key))
                if cached is None or self._polls - cached[0] >= read.every:
                    value = query.value(read.described, handle, *read.variants, exported=True)
                    cached = self._kept[(query.uuid, read.key)] = (self._polls, value)
                reads[read.key] = cached[1]
            else:
                reads[read.key] = query.value(read.described, handle, *read.variants, exported=True)
        if plan.gpm_key is not None:
            reads[plan.gpm_key] = self._gpm.metrics(query, handle if gpu is None else gpu, instance)
        return reads

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


def _bus_id(function: str) -> Variant:
    """The PCI bus id (``00000000:18:00.0``) from a pynvml PCI-info function."""

    def read(handle: Any) -> str:
        bus_id = getattr(pynvml, function)(handle).busId
        return bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)

    return Variant(function, read)


# v3 where the driver has it, else whichever version the bindings' nvmlDeviceGetPciInfo calls.
_PCI_BUS_ID = (_bus_id("nvmlDeviceGetPciInfo_v3"), _bus_id("nvmlDeviceGetPciInfo"))


def _mig_slot(slot: int) -> Callable[[Any], Any]:
    def handle_in_slot(handle: Any) -> Any:
        try:
            return pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError as error:
            if error.value in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT):
                return None  # no MIG device in this slot
            raise

    return handle_in_slot


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
