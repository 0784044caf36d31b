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

from exporter.deviceids import DeviceRef, is_gpu_resource, parse_device_id
from exporter.model import (
    Allocation,
    Attribution,
    DeviceReading,
    GpuSeries,
    PodInfo,
    ProcessOwner,
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
) -> Attribution:
    """Joins one poll's readings into labelled series.

    ``owners`` maps each GPU process's PID to its cgroup owner (None: the process exited before
    its cgroup was read). ``pods`` maps pod UID to the pod, or is None when the Kubernetes API is
    not available; then only the kubelet's allocations name pods, and shares of a shared device
    cannot be measured.
    """
    device_list = list(devices)
    index = _DeviceIndex(device_list)
    finished = {(p.namespace, p.name) for p in (pods or {}).values() if p.finished}
    holders: dict[str, dict[PodKey, _Holder]] = defaultdict(dict)
    unknown_ids: Counter[str] = Counter()

    for allocation in allocations:
        if not is_gpu_resource(allocation.resource_name):
            continue
        ref = parse_device_id(allocation.device_id)
        device = index.resolve(ref) if ref is not None else None
        if device is None or not allocation.namespace or not allocation.pod:
            unknown_ids[allocation.resource_name] += 1
            continue
        key = (allocation.namespace, allocation.pod)
        if key in finished:
            continue
        holder = holders[device.uuid].setdefault(key, _Holder(set(), set()))
        if allocation.container:
            holder.containers.add(allocation.container)

    by_owner: Counter[str] = Counter()
    # Devices where some GPU process belongs to a pod we cannot name: a pod's share there is unknown.
    unmeasurable: set[str] = set()
    for device in device_list:
        for process in device.processes or ():
            owner = owners.get(process.pid)
            if owner is None:
                by_owner["exited"] += 1
                continue
            if owner.pod_uid is None:
                by_owner["host"] += 1
                continue
            pod = pods.get(owner.pod_uid) if pods is not None else None
            if pod is None:
                by_owner["unknown_pod"] += 1
                unmeasurable.add(device.uuid)
                continue
            by_owner["pod"] += 1
            if pod.finished:
                continue
            holder = holders[device.uuid].setdefault((pod.namespace, pod.name), _Holder(set(), set()))
            holder.pids.add(process.pid)
            container = pod.container_names.get(owner.container_id or "")
            if container:
                holder.containers.add(container)

    series: list[GpuSeries] = []
    sharing: dict[str, int] = {}
    for device in device_list:
        pods_here = holders.get(device.uuid, {})
        if not pods_here:
            series.append(
                GpuSeries(
                    device=device,
                    duty_cycle_percent=device.duty_cycle_percent,
                    memory_used_bytes=device.memory_used_bytes,
                )
            )
            continue
        sharing[device.uuid] = len(pods_here)
        measurable = pods is not None and device.uuid not in unmeasurable
        for (namespace, name), holder in sorted(pods_here.items()):
            duty, memory = device.duty_cycle_percent, device.memory_used_bytes
            if len(pods_here) > 1 and measurable:
                duty = _pod_duty_cycle(device, holder.pids, duty)
                memory = _pod_memory(device, holder.pids, memory)
            series.append(
                GpuSeries(
                    device=device,
                    namespace=namespace,
                    pod=name,
                    container=",".join(sorted(holder.containers)),
                    duty_cycle_percent=duty,
                    memory_used_bytes=memory,
                )
            )
    return Attribution(
        series=tuple(series),
        sharing_pods=sharing,
        unknown_device_ids=dict(unknown_ids),
        processes_by_owner=dict(by_owner),
    )


def _pod_duty_cycle(device: DeviceReading, pids: set[int], fallback: float | None) -> float | None:
    """The pod's processes' SM utilisation summed (capped at 100); the device's when unmeasurable.

    NVML only reports processes with non-zero use, so a listed process without a sample was idle.
    """
    if device.process_sm_percent is None or device.processes is None or device.duty_cycle_percent is None:
        return fallback
    return min(100.0, sum(device.process_sm_percent.get(pid, 0.0) for pid in pids))


def _pod_memory(device: DeviceReading, pids: set[int], fallback: int | None) -> int | None:
    """The pod's processes' used memory summed; the device's when any of it is not available."""
    if device.processes is None:
        return fallback
    used = [p.used_memory_bytes for p in device.processes if p.pid in pids]
    if any(u is None for u in used):
        return fallback
    return sum(u for u in used if u is not None)
