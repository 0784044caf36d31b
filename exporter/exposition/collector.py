"""The expose step: a prometheus_client custom collector that builds every family from a snapshot.

Families are rebuilt on each collection, so a pod or GPU that is gone from the snapshot is gone
from the output: no stale label set survives. Values that were not measured (None) are left out,
and so is every series of a device whose reading is older than the staleness bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.catalogue import DEVICE_FAMILIES, POD_FAMILIES, POD_LABELS
from exporter.model import DeviceReading, GpuSeries, Health, Snapshot

GPU_LABELS = list(POD_LABELS)

# name -> (help text with the unit, how to read the value from a series): the seed's *_current
# families, declared in the catalogue.
GPU_GAUGES: dict[str, tuple[str, Callable[[GpuSeries], float | int | None]]] = {
    f.name: (f.help, f.pod_value) for f in POD_FAMILIES if f.labels == POD_LABELS and f.pod_value is not None
}
_POD_INFO = next(f for f in POD_FAMILIES if f.name == "gpu_pod_info")


class SnapshotCollector(Collector):
    def __init__(
        self,
        latest: Callable[[], Snapshot | None],
        max_staleness_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._latest = latest
        self._max_staleness_s = max_staleness_s
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snapshot = self._latest()
        if snapshot is None:
            return
        now = self._clock()
        fresh = [s for s in snapshot.attribution.series if now - s.device.sampled_at <= self._max_staleness_s]
        for name, (help_text, value_of) in GPU_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=GPU_LABELS)
            for series in fresh:
                value = value_of(series)
                if value is not None:
                    family.add_metric(_labels(snapshot.node, series), value)
            yield family
        yield from _device_families(snapshot.node, fresh)
        yield _dra_allocations(snapshot, {s.device.uuid for s in fresh})
        yield from _self_metrics(snapshot, stale=len(snapshot.attribution.series) - len(fresh))


class AgeCollector(Collector):
    """The age gauges, collected when scraped: an age rendered with the exposition would freeze
    with it and look fresh while the data behind it is not."""

    def __init__(self, latest: Callable[[], Snapshot | None], clock: Callable[[], float] = time.monotonic) -> None:
        self._latest = latest
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snapshot = self._latest()
        if snapshot is None:
            return
        now = self._clock()
        yield _gauge(
            "gpu_exporter_data_age_seconds",
            "Seconds since the poll whose data is served finished, measured at scrape time.",
            max(0.0, now - snapshot.completed_at),
        )
        ages = GaugeMetricFamily(
            "gpu_exporter_device_data_age_seconds",
            "Seconds since each device was last read, measured at scrape time; its series are dropped past "
            "the staleness bound (a GPU whose NVML calls hang shows here).",
            labels=["gpu", "uuid"],
        )
        sampled = {s.device.uuid: s.device for s in snapshot.attribution.series}
        for uuid, device in sorted(sampled.items()):
            ages.add_metric([str(device.index), uuid], max(0.0, now - device.sampled_at))
        yield ages


def _device_families(node: str, fresh: list[GpuSeries]) -> Iterator[Metric]:
    """gpu_pod_info, then the catalogue's per-device families: once per device, however many pods
    use it (a pod label on a shared GPU's counter would count it once per pod)."""
    info = GaugeMetricFamily(_POD_INFO.name, _POD_INFO.help, labels=list(_POD_INFO.labels))
    devices: dict[str, DeviceReading] = {}
    for series in fresh:
        device = devices.setdefault(series.device.uuid, series.device)
        if series.pod:
            info.add_metric([node, str(device.index), device.uuid, series.namespace, series.pod, series.container], 1)
    yield info
    for declared in DEVICE_FAMILIES:
        rows = [(device, samples) for device in devices.values() if (samples := device.metrics.get(declared.name))]
        if not rows:
            continue  # not enabled, or no device supports it
        kind = CounterMetricFamily if declared.type == "counter" else GaugeMetricFamily
        family = kind(declared.name, declared.help, labels=list(declared.labels))
        for device, samples in rows:
            for extra, value in samples:
                family.add_metric([node, str(device.index), device.uuid, device.model, *extra], value)
        yield family


DRA_HOLDER_LABELS = ("node", "namespace", "pod", "container")
DRA_DEVICE_LABELS = ("claim_namespace", "claim", "driver", "pool", "device", "uuid")


def _dra_allocations(snapshot: Snapshot, fresh_uuids: set[str]) -> Metric:
    """One series per DRA allocation resolved to a device here, so a claim joins to its GPU."""
    family = GaugeMetricFamily(
        "gpu_dra_allocation_info",
        "1 for each device a container holds through a Dynamic Resource Allocation claim, resolved to its GPU "
        "or MIG device (uuid) through the node's ResourceSlices: join claims to per-device families on uuid.",
        labels=[*DRA_HOLDER_LABELS, *DRA_DEVICE_LABELS],
    )
    for resolved in snapshot.attribution.dra_allocations:
        claim = resolved.allocation
        if resolved.uuid in fresh_uuids:
            holder = (claim.namespace, claim.pod, claim.container)
            source = (claim.claim_namespace, claim.claim, claim.driver, claim.pool, claim.device)
            family.add_metric([snapshot.node, *holder, *source, resolved.uuid], 1)
    return family


def _labels(node: str, series: GpuSeries) -> list[str]:
    device = series.device
    return [node, str(device.index), device.uuid, device.model, series.namespace, series.pod, series.container]


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _self_metrics(snapshot: Snapshot, stale: int) -> Iterator[Metric]:
    yield from _health_gauges(snapshot.health, stale)
    yield from _counted_families(snapshot)


def _health_gauges(health: Health, stale: int) -> Iterator[Metric]:
    """Whether each outside system answers, and how fresh the poll is."""
    yield _gauge("gpu_exporter_nvml_up", "1 when NVML is initialised and answering, else 0.", float(health.nvml_up))
    yield _gauge(
        "gpu_exporter_pod_resources_up",
        "1 when the last kubelet pod-resources List succeeded, else 0 (series then carry no pod labels).",
        float(health.pod_resources_up),
    )
    if health.kubernetes_up is not None:
        yield _gauge(
            "gpu_exporter_kubernetes_up",
            "1 when the pod watch on the Kubernetes API is connected, else 0.",
            float(health.kubernetes_up),
        )
    if health.poll_duration_seconds is not None:
        yield _gauge(
            "gpu_exporter_poll_duration_seconds", "Duration of the last poll, in seconds.", health.poll_duration_seconds
        )
    if health.last_success_wall_time is not None:
        yield _gauge(
            "gpu_exporter_last_successful_poll_timestamp_seconds",
            "Unix time, in seconds, at which the last poll with NVML up finished.",
            health.last_success_wall_time,
        )
    yield _gauge(
        "gpu_exporter_stale_series",
        "GPU series left out because their device reading is older than the staleness bound.",
        float(stale),
    )


def _counted_families(snapshot: Snapshot) -> Iterator[Metric]:
    """Errors, unknown ids, sharing and process owners, each a labelled family."""
    health, attribution = snapshot.health, snapshot.attribution
    yield _labelled(
        CounterMetricFamily(
            "gpu_exporter_device_errors", "NVML errors per device, by NVML error kind.", labels=["gpu", "uuid", "kind"]
        ),
        health.device_errors,
    )
    yield _labelled(
        GaugeMetricFamily(
            "gpu_exporter_unknown_device_ids",
            "Device ids in the kubelet's last answer, for GPU resources, that name no device on this node "
            "(unknown format, another node's GPU, or no pod name); they are not guessed.",
            labels=["resource"],
        ),
        attribution.unknown_device_ids,
    )
    yield _labelled(
        CounterMetricFamily(
            "gpu_exporter_pod_resources_errors",
            "Failed kubelet pod-resources calls, by gRPC status code.",
            labels=["code"],
        ),
        health.pod_resources_errors_total,
    )
    yield _labelled(
        GaugeMetricFamily(
            "gpu_exporter_gpu_sharing_pods",
            "Pods using each device; above 1 the device is shared (time-slicing, MPS).",
            labels=["uuid"],
        ),
        attribution.sharing_pods,
    )
    yield _labelled(
        GaugeMetricFamily(
            "gpu_exporter_gpu_processes",
            "GPU processes in the last poll by what their cgroup says: pod, host, unknown_pod (not in the pod "
            "watch), exited (gone before its cgroup was read), pending (cgroup not read yet).",
            labels=["owner"],
        ),
        attribution.processes_by_owner,
    )


def _labelled(family: GaugeMetricFamily | CounterMetricFamily, values: Mapping[Any, int]) -> Metric:
    """Fills a labelled family from a mapping keyed by one label value or a tuple of them."""
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family
