"""Attribution: which pod uses which device, and each pod's own share of a shared device.

Pure functions over the readers' plain data, with no I/O, so every rule here is tested directly.
Two sources are joined: the kubelet's device allocations (pod-resources) and the GPU processes'
cgroups (named through the Kubernetes API's pods on this node). Attribution fails soft: a device
no pod can be tied to keeps its series with empty pod labels.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from exporter.attribution.deviceids import DeviceRef, is_gpu_resource, parse_device_id
from exporter.attribution.dra import fallback_minor, gpu_drivers
from exporter.model import (
    Allocation,
    Attribution,
    ClaimAllocation,
    DeviceKey,
    DeviceReading,
    GpuSeries,
    PodInfo,
    ProcessOwner,
    ResolvedClaim,
)

PodKey = tuple[str, str]  # (namespace, pod name)


@dataclass
class _Holder:
    """A pod on one device: its containers and the processes cgroups tie to it."""

    containers: set[str]
    pids: set[int]


class _DeviceIndex:
    """Resolves a DeviceRef against the devices NVML reported on this node."""

    def __init__(self, devices: Iterable[DeviceReading]) -> None:
        self.by_uuid: dict[str, DeviceReading] = {}
        self.by_minor: dict[int, DeviceReading] = {}
        self.mig_by_parent: dict[tuple[str, int], DeviceReading] = {}
        for device in devices:
            self.by_uuid[device.uuid] = device
            if device.parent_uuid is None and device.minor_number is not None:
                self.by_minor[device.minor_number] = device
            if device.parent_uuid is not None and device.gpu_instance_id is not None:
                self.mig_by_parent[(device.parent_uuid, device.gpu_instance_id)] = device

    def resolve(self, ref: DeviceRef) -> DeviceReading | None:
        if ref.uuid is not None:
            return self.by_uuid.get(ref.uuid)
        parent_uuid = ref.parent_uuid
        if parent_uuid is None and ref.minor_number is not None:
            gpu = self.by_minor.get(ref.minor_number)
            if gpu is None:
                return None
            if ref.gpu_instance_id is None:
                return gpu
            parent_uuid = gpu.uuid
        if parent_uuid is None or ref.gpu_instance_id is None:
            return None
        return self.mig_by_parent.get((parent_uuid, ref.gpu_instance_id))


def attribute(
    devices: Iterable[DeviceReading],
    allocations: Iterable[Allocation],
    owners: Mapping[int, ProcessOwner | None],
    pods: Mapping[str, PodInfo] | None,
    dra_devices: Mapping[DeviceKey, str] | None = None,
) -> Attribution:
    """Joins one poll's readings into labelled series.

    ``owners`` maps each GPU process's PID to its cgroup owner (None: the process exited before
    its cgroup was read; a PID missing from it is pending, its cgroup not read yet). ``pods`` maps
    pod UID to the pod, or is None when the Kubernetes API is not available; then only the
    kubelet's allocations name pods, and shares of a shared device cannot be measured.
    ``dra_devices`` maps the DRA devices of this node's ResourceSlices to NVML UUIDs, or is None
    while no slice can be read (then NVIDIA's ``gpu-<minor>`` device names are read instead).
    """
    device_list = list(devices)
    finished = {(p.namespace, p.name) for p in (pods or {}).values() if p.finished}
    holders: dict[str, dict[PodKey, _Holder]] = defaultdict(dict)
    index = _DeviceIndex(device_list)
    allocation_list = list(allocations)
    plugin = [a for a in allocation_list if not isinstance(a, ClaimAllocation)]
    unknown_ids = _hold_allocated(holders, index, plugin, finished)
    claims = [a for a in allocation_list if isinstance(a, ClaimAllocation)]
    claimed = _hold_claimed(holders, index, claims, finished, dra_devices, unknown_ids)
    by_owner, foreign = _hold_by_process(holders, device_list, owners, pods)
    series: list[GpuSeries] = []
    sharing: dict[str, int] = {}
    for device in device_list:
        pods_here = holders.get(device.uuid, {})
        if pods_here:
            sharing[device.uuid] = len(pods_here)
        measurable = pods is not None and _shares_measurable(device, foreign)
        series.extend(_device_series(device, pods_here, measurable))
    return Attribution(
        series=tuple(series),
        sharing_pods=sharing,
        unknown_device_ids=dict(unknown_ids),
        processes_by_owner=dict(by_owner),
        dra_allocations=claimed,
    )


def _hold_allocated(
    holders: dict[str, dict[PodKey, _Holder]],
    index: _DeviceIndex,
    allocations: Iterable[Allocation],
    finished: set[PodKey],
) -> Counter[str]:
    """Adds the kubelet's allocations to ``holders``; returns the ids that name no device here."""
    unknown_ids: Counter[str] = Counter()
    for allocation in allocations:
        if not is_gpu_resource(allocation.resource_name):
            continue
        ref = parse_device_id(allocation.device_id)
        device = index.resolve(ref) if ref is not None else None
        _hold(holders, device, allocation, finished, unknown_ids, allocation.resource_name)
    return unknown_ids


def _hold(
    holders: dict[str, dict[PodKey, _Holder]],
    device: DeviceReading | None,
    allocation: Allocation,
    finished: set[PodKey],
    unknown_ids: Counter[str],
    counted_as: str,
) -> bool:
    """Adds one allocation's pod and container to ``holders`` of ``device``; an allocation naming
    no device here, or no pod, is counted under ``counted_as``. False when nothing was added."""
    if device is None or not allocation.namespace or not allocation.pod:
        unknown_ids[counted_as] += 1
        return False
    key = (allocation.namespace, allocation.pod)
    if key in finished:
        return False
    holder = holders[device.uuid].setdefault(key, _Holder(set(), set()))
    if allocation.container:
        holder.containers.add(allocation.container)
    return True


def _hold_claimed(
    holders: dict[str, dict[PodKey, _Holder]],
    index: _DeviceIndex,
    claims: Iterable[ClaimAllocation],
    finished: set[PodKey],
    dra_devices: Mapping[DeviceKey, str] | None,
    unknown_ids: Counter[str],
) -> tuple[ResolvedClaim, ...]:
    """Adds DRA allocations of GPUs to ``holders``, resolved through the ResourceSlices' ``uuid``
    attribute (or, while no slice can be read, a ``gpu-<minor>`` name); counts those that resolve
    to no device here in ``unknown_ids`` by driver, and returns the resolved ones. Several claims
    or share ids on one device share it as device-plugin replicas do."""
    ours = gpu_drivers(dra_devices)
    resolved: list[ResolvedClaim] = []
    for claim in claims:
        if claim.driver not in ours:
            continue
        if dra_devices is not None:
            uuid = dra_devices.get((claim.driver, claim.pool, claim.device))
            ref = DeviceRef(uuid=uuid) if uuid is not None else None
        else:
            minor = fallback_minor(claim.driver, claim.device)
            ref = DeviceRef(minor_number=minor) if minor is not None else None
        device = index.resolve(ref) if ref is not None else None
        if _hold(holders, device, claim, finished, unknown_ids, claim.driver) and device is not None:
            resolved.append(ResolvedClaim(claim, device.uuid))
    return tuple(resolved)


def _hold_by_process(
    holders: dict[str, dict[PodKey, _Holder]],
    devices: list[DeviceReading],
    owners: Mapping[int, ProcessOwner | None],
    pods: Mapping[str, PodInfo] | None,
) -> tuple[Counter[str], set[str]]:
    """Adds each GPU process's pod to ``holders``; returns the process counts by owner kind and
    the devices where a process that belongs to no running pod we know (host, exited, unknown) used
    the SMs since the last sample. An idle one (a monitoring tool's context) takes nothing away."""
    by_owner: Counter[str] = Counter()
    foreign: set[str] = set()
    for device in devices:
        for process in device.processes or ():
            owner = owners.get(process.pid)
            pod = pods.get(owner.pod_uid) if owner is not None and owner.pod_uid and pods is not None else None
            if process.pid not in owners:
                by_owner["pending"] += 1
            elif owner is None:
                by_owner["exited"] += 1
            elif owner.pod_uid is None:
                by_owner["host"] += 1
            elif pod is None:
                by_owner["unknown_pod"] += 1
            else:
                by_owner["pod"] += 1
            if pod is None or pod.finished:
                if (device.process_sm_percent or {}).get(process.pid, 0.0) > 0:
                    foreign.add(device.uuid)  # work on the device that is none of the holders'
                continue
            holder = holders[device.uuid].setdefault((pod.namespace, pod.name), _Holder(set(), set()))
            holder.pids.add(process.pid)
            container = pod.container_names.get(owner.container_id or "") if owner is not None else None
            if container:
                holder.containers.add(container)
    return by_owner, foreign


def _shares_measurable(device: DeviceReading, foreign: set[str]) -> bool:
    """Per-pod shares are measured only when the work NVML sees on the device belongs to the pods
    holding it. With no process listed (MPS clients show as the MPS server, processes can be
    hidden) or a busy one that is the host's, an exited one's or an unknown pod's, the device's use
    cannot be split: reporting a pod's share as 0 there could tell an HPA a busy pod is idle."""
    return bool(device.processes) and device.uuid not in foreign


@dataclass(frozen=True)
class _ProcessFigures:
    """A shared device's per-process figures, indexed once per device so that each pod's share
    costs its own processes only (not every process on the device once per pod)."""

    sm_percent: Mapping[int, float] | None  # None: no per-process samples, or no device utilisation
    memory_bytes: Mapping[int, int | None] | None  # None: no process list

    @classmethod
    def of(cls, device: DeviceReading) -> _ProcessFigures:
        """NVML only reports processes with non-zero use, so a listed process without a sample was
        idle; but when no process has a sample while the device is busy, the samples do not explain
        the load (the sampling window missed it): the duty cycle cannot be split then."""
        samples, processes, busy = device.process_sm_percent, device.processes, device.duty_cycle_percent
        explained = (
            samples is not None
            and processes is not None
            and busy is not None
            and (busy <= 0 or any(samples.get(p.pid, 0.0) > 0 for p in processes))
        )
        memory = None if processes is None else {p.pid: p.used_memory_bytes for p in processes}
        return cls(samples if explained else None, memory)

    def duty_cycle(self, pids: set[int], fallback: float | None) -> float | None:
        """The pod's processes' SM utilisation summed (capped at 100); the device's when unmeasurable."""
        if self.sm_percent is None:
            return fallback
        return min(100.0, sum(self.sm_percent.get(pid, 0.0) for pid in pids))

    def memory(self, pids: set[int], fallback: int | None) -> int | None:
        """The pod's processes' used memory summed; the device's when any of it is not available."""
        if self.memory_bytes is None:
            return fallback
        used = [self.memory_bytes.get(pid) for pid in pids if pid in self.memory_bytes]
        if any(u is None for u in used):
            return fallback
        return sum(u for u in used if u is not None)


def _device_series(device: DeviceReading, pods_here: Mapping[PodKey, _Holder], measurable: bool) -> list[GpuSeries]:
    if not pods_here:
        return [
            GpuSeries(
                device=device, duty_cycle_percent=device.duty_cycle_percent, memory_used_bytes=device.memory_used_bytes
            )
        ]
    figures = _ProcessFigures.of(device) if len(pods_here) > 1 and measurable else None
    series = []
    for (namespace, name), holder in sorted(pods_here.items()):
        duty, memory = device.duty_cycle_percent, device.memory_used_bytes
        if figures is not None:
            duty = figures.duty_cycle(holder.pids, duty)
            memory = figures.memory(holder.pids, memory)
        series.append(
            GpuSeries(
                device=device,
                namespace=namespace,
                pod=name,
                container=",".join(sorted(holder.containers)),
                duty_cycle_percent=duty,
                memory_used_bytes=memory,
                share_measured=figures is not None and figures.sm_percent is not None,
            )
        )
    return series
