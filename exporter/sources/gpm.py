"""GPM (GPU performance monitoring, Hopper and newer): metrics between two samples a poll apart.

Each device keeps two sample buffers, used in turn, and one metrics request, reused each poll; a
MIG device is sampled through its GPU's handle and its GPU instance id. Every call goes through
the device's query (exporter.sources.nvmlquery), so a fault leaves the metrics out, never 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pynvml

from exporter.catalogue import GPM_METRICS
from exporter.sources.nvmlquery import DeviceQuery, Variant, binding


@dataclass
class _Buffers:
    """One device's two sample buffers and its metrics request."""

    samples: tuple[Any, Any]
    request: Any
    latest: int | None = None  # the buffer holding the last sample taken

    @classmethod
    def allocate(cls) -> _Buffers:
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


class GpmSampler:
    """The GPM metrics of every device, each device's buffers kept between polls. A device is read
    by one thread at a time; different devices may be read on different threads."""

    def __init__(self) -> None:
        self._supported: dict[str, bool] = {}  # device uuid -> whether its GPU has GPM
        self._buffers: dict[tuple[int, str], _Buffers] = {}  # (GPU index, device uuid) -> its buffers

    def metrics(self, query: DeviceQuery, gpu_handle: Any, instance: int | None = None) -> dict[int, float] | None:
        """{GPM metric id: percent} between the device's last sample and one taken now; None where
        GPM is not supported (before Hopper) and on the first poll, which only takes a sample.
        ``instance``: the GPU instance id of a MIG device, sampled through its GPU's handle."""
        supported = self._supported.get(query.uuid)
        if supported is None:
            support = query.value("GPM support", gpu_handle, binding("nvmlGpmQueryDeviceSupport"))
            if support is None:
                return None  # unsupported or failed: asked again next poll
            supported = self._supported[query.uuid] = bool(support.isSupportedDevice)
        if not supported:
            return None
        key = (query.index, query.uuid)
        sample = Variant("nvmlGpmSampleGet", lambda handle: self._between_samples(handle, key, instance))
        result: dict[int, float] | None = query.value("GPM metrics", gpu_handle, sample, exported=True)
        return result

    def forget(self) -> None:
        """The library that allocated the buffers went away: they are not freed, only dropped."""
        self._buffers.clear()

    def free(self, keep_gpus: Iterable[int] = ()) -> None:
        """Frees every device's buffers but those of ``keep_gpus`` (a stuck read may still hold
        them), and drops them all."""
        keep = set(keep_gpus)
        for (index, _uuid), buffers in list(self._buffers.items()):
            if index not in keep:
                buffers.free()
        self._buffers.clear()

    def _between_samples(self, handle: Any, key: tuple[int, str], instance: int | None) -> dict[int, float] | None:
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = _Buffers.allocate()
        target = 1 if buffers.latest == 0 else 0  # the buffer not holding the last sample
        if instance is None:
            pynvml.nvmlGpmSampleGet(handle, buffers.samples[target])
        else:
            pynvml.nvmlGpmMigSampleGet(handle, instance, buffers.samples[target])
        previous, buffers.latest = buffers.latest, target
        if previous is None:
            return None
        request = buffers.request
        request.sample1, request.sample2 = buffers.samples[previous], buffers.samples[target]
        pynvml.nvmlGpmMetricsGet(request)
        answered = [request.metrics[slot] for slot in range(len(GPM_METRICS))]
        return {int(m.metricId): float(m.value) for m in answered if m.nvmlReturn == pynvml.NVML_SUCCESS}
