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
from prometheus_client.samples import Sample

from exporter.catalogue import (
    ACCOUNTING_GAPS,
    ALLOCATED_GPU_SECONDS,
    BUSY_GPU_SECONDS,
    CURRENT_FAMILIES,
    DATA_AGE,
    DEVICE_DATA_AGE,
    DEVICE_ERRORS,
    DEVICE_FAMILIES,
    DRA_ALLOCATION_INFO,
    ENERGY,
    GPU_HEALTH_REASON,
    GPU_HEALTH_STATUS,
    GPU_PROCESSES,
    GPU_SHARING_PODS,
    KUBERNETES_UP,
    LAST_SUCCESSFUL_POLL,
    NVML_UP,
    POD_INFO,
    POD_RESOURCES_ERRORS,
    POD_RESOURCES_UP,
    POLL_DURATION,
    STALE_SERIES,
    UNKNOWN_DEVICE_IDS,
    Family,
    SelfMetric,
)
from exporter.exposition.dcgm import dcgm_families
from exporter.model import CostSeries, DeviceReading, GpuSeries, Health, Snapshot


def declared_family(declared: Family | SelfMetric) -> GaugeMetricFamily | CounterMetricFamily:
    """An empty family as the catalogue declares it (a counter's exposed ``_total`` is the client's)."""
    kind = CounterMetricFamily if declared.type == "counter" else GaugeMetricFamily
    return kind(declared.name, declared.help, labels=list(declared.labels))


def _value(declared: SelfMetric, value: float) -> Metric:
    family = declared_family(declared)
    family.add_metric([], value)
    return family


class SnapshotCollector(Collector):
    def __init__(
        self,
        latest: Callable[[], Snapshot | None],
        max_staleness_s: float,
        clock: Callable[[], float] = time.monotonic,
        dcgm: bool = False,
    ) -> None:
        self._latest = latest
        self._max_staleness_s = max_staleness_s
        self._clock = clock
        self._dcgm = dcgm  # the dcgm group: dcgm-exporter's series too

    def collect(self) -> Iterator[Metric]:
        snapshot = self._latest()
        if snapshot is None:
            return
        now = self._clock()
        fresh = [s for s in snapshot.attribution.series if now - s.device.sampled_at <= self._max_staleness_s]
        for declared in CURRENT_FAMILIES:
            family = declared_family(declared)
            for series in fresh:
                value = declared.pod_value(series) if declared.pod_value is not None else None
                if value is not None:
                    family.add_metric(_labels(snapshot.node, series), value)
            yield family
        yield from _device_families(snapshot.node, fresh)
        fresh_uuids = {s.device.uuid for s in fresh}
        if self._dcgm:
            yield from dcgm_families(snapshot, fresh)
        yield _dra_allocations(snapshot, fresh_uuids)
        yield from _gpu_health(snapshot)
        if snapshot.costs is not None:
            yield from _cost_families(snapshot.node, [c for c in snapshot.costs if c.labels.uuid in fresh_uuids])
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
        yield _value(DATA_AGE, max(0.0, now - snapshot.completed_at))
        ages = declared_family(DEVICE_DATA_AGE)
        sampled = {s.device.uuid: s.device for s in snapshot.attribution.series}
        for uuid, device in sorted(sampled.items()):
            ages.add_metric([str(device.index), uuid], max(0.0, now - device.sampled_at))
        yield ages


def _device_families(node: str, fresh: list[GpuSeries]) -> Iterator[Metric]:
    """gpu_pod_info, then the catalogue's per-device families: once per device, however many pods
    use it (a pod label on a shared GPU's counter would count it once per pod)."""
    info = declared_family(POD_INFO)
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
        family = declared_family(declared)
        for device, samples in rows:
            for extra, value in samples:
                family.add_metric([node, str(device.index), device.uuid, device.model, *extra], value)
        yield family


def _dra_allocations(snapshot: Snapshot, fresh_uuids: set[str]) -> Metric:
    """One series per DRA allocation resolved to a device here, so a claim joins to its GPU."""
    family = declared_family(DRA_ALLOCATION_INFO)
    for resolved in snapshot.attribution.dra_allocations:
        claim = resolved.allocation
        if resolved.uuid in fresh_uuids:
            holder = (claim.namespace, claim.pod, claim.container)
            source = (claim.claim_namespace, claim.claim, claim.driver, claim.pool, claim.device)
            family.add_metric([snapshot.node, *holder, *source, resolved.uuid], 1)
    return family


def _gpu_health(snapshot: Snapshot) -> Iterator[Metric]:
    """Each GPU's verdict, stale or not: a GPU whose reads stall is unhealthy, not absent."""
    if not snapshot.gpu_health:
        return
    status, reasons = declared_family(GPU_HEALTH_STATUS), declared_family(GPU_HEALTH_REASON)
    for verdict in snapshot.gpu_health:
        device = [snapshot.node, str(verdict.index), verdict.uuid, verdict.model]
        status.add_metric(device, verdict.status)
        for reason, severity in verdict.reasons:
            reasons.add_metric([*device, reason, severity], 1)
    yield status
    yield reasons


def _cost_families(node: str, costs: list[CostSeries]) -> Iterator[Metric]:
    """Each pod's energy, allocated and busy GPU-seconds on each device; a value not measured is left out.

    The three families label a series alike: one label dict per series serves all three (what
    ``add_metric`` would build three times)."""
    energy, allocated, busy = (declared_family(d) for d in (ENERGY, ALLOCATED_GPU_SECONDS, BUSY_GPU_SECONDS))
    for cost in costs:
        labels = dict(zip(ENERGY.labels, (node, *cost.labels), strict=True))
        energy.samples.append(Sample(energy.name + "_total", labels, cost.energy_joules))
        if cost.allocated_gpu_seconds is not None:
            allocated.samples.append(Sample(allocated.name + "_total", labels, cost.allocated_gpu_seconds))
        if cost.busy_gpu_seconds is not None:
            busy.samples.append(Sample(busy.name + "_total", labels, cost.busy_gpu_seconds))
    yield energy
    yield allocated
    yield busy


def _labels(node: str, series: GpuSeries) -> list[str]:
    device = series.device
    return [node, str(device.index), device.uuid, device.model, series.namespace, series.pod, series.container]


def _self_metrics(snapshot: Snapshot, stale: int) -> Iterator[Metric]:
    yield from _health_gauges(snapshot.health, stale)
    yield from _counted_families(snapshot)


def _health_gauges(health: Health, stale: int) -> Iterator[Metric]:
    """Whether each outside system answers, and how fresh the poll is."""
    yield _value(NVML_UP, float(health.nvml_up))
    yield _value(POD_RESOURCES_UP, float(health.pod_resources_up))
    if health.kubernetes_up is not None:
        yield _value(KUBERNETES_UP, float(health.kubernetes_up))
    if health.poll_duration_seconds is not None:
        yield _value(POLL_DURATION, health.poll_duration_seconds)
    if health.last_success_wall_time is not None:
        yield _value(LAST_SUCCESSFUL_POLL, health.last_success_wall_time)
    yield _value(STALE_SERIES, float(stale))


def _counted_families(snapshot: Snapshot) -> Iterator[Metric]:
    """Errors, unknown ids, sharing and process owners, each a labelled family."""
    health, attribution = snapshot.health, snapshot.attribution
    yield _labelled(DEVICE_ERRORS, health.device_errors)
    yield _labelled(UNKNOWN_DEVICE_IDS, attribution.unknown_device_ids)
    yield _labelled(POD_RESOURCES_ERRORS, health.pod_resources_errors_total)
    yield _labelled(GPU_SHARING_PODS, attribution.sharing_pods)
    yield _labelled(GPU_PROCESSES, attribution.processes_by_owner)
    yield _labelled(ACCOUNTING_GAPS, health.accounting_gaps_total)


def _labelled(declared: SelfMetric, values: Mapping[Any, int]) -> Metric:
    """The declared family filled from a mapping keyed by one label value or a tuple of them."""
    family = declared_family(declared)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family
