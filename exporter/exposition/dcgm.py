"""The dcgm group's series: dcgm-exporter's families (exporter.catalogue.DCGM_FAMILIES) with its
labels, one series per device and pod holding it, from the same snapshot as every other family.

A device no pod holds has one series without pod labels; a shared device one per pod, where
DCGM_FI_DEV_GPU_UTIL and DCGM_FI_DEV_FB_USED carry the pod's own share and every other field the
device's value (as dcgm-exporter does since its per-process split). A MIG device's series name its
GPU (gpu, UUID, modelName are the parent's, as in dcgm-exporter) and add its GPU instance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import Metric

from exporter.catalogue import DCGM_FAMILIES, DCGM_LABELS, DCGM_POD_LABELS, Family
from exporter.model import DeviceReading, GpuSeries, Sample, Samples, Snapshot

Labels = dict[str, str]


def dcgm_families(snapshot: Snapshot, fresh: Sequence[GpuSeries]) -> Iterator[Metric]:
    """Each dcgm family that has a value somewhere; a field no device has is left out, as
    dcgm-exporter leaves out a field DCGM does not report."""
    gpus = {s.device.uuid: s.device for s in fresh if s.device.parent_uuid is None}
    rows = [(series, _labels(snapshot, series, gpus)) for series in fresh]
    for declared in DCGM_FAMILIES:
        # A Metric named as exposed: dcgm-exporter's counters have no _total suffix.
        family = Metric(declared.name, declared.help, declared.type)
        extra = declared.labels[len(DCGM_LABELS) :]  # beyond dcgm-exporter's common ones (err_code)
        for series, labels in rows:
            for sample in _samples(declared, series):
                family.add_sample(declared.name, labels | dict(zip(extra, sample.labels, strict=True)), sample.value)
        if family.samples:
            yield family


def _samples(declared: Family, series: GpuSeries) -> Samples:
    if declared.pod_value is not None:
        value = declared.pod_value(series)
        return () if value is None else (Sample((), value),)
    return series.device.metrics.get(declared.name, ())


def _labels(snapshot: Snapshot, series: GpuSeries, gpus: dict[str, DeviceReading]) -> Labels:
    device = series.device
    gpu_uuid = device.parent_uuid or device.uuid
    gpu = gpus.get(gpu_uuid, device)  # a MIG device whose GPU's reading aged out keeps its own name
    labels = {"gpu": str(device.index), "UUID": gpu_uuid}
    if gpu.pci_bus_id is not None:  # left out when NVML could not say it, never made up
        labels["pci_bus_id"] = gpu.pci_bus_id
    labels |= {
        "device": f"nvidia{device.index}",
        "modelName": gpu.model,
        "Hostname": snapshot.node,
        "hostname": snapshot.node,
        "DCGM_FI_DRIVER_VERSION": snapshot.driver_version,
    }
    if device.parent_uuid is not None:
        profile = mig_profile(device.model)
        if profile:
            labels["GPU_I_PROFILE"] = profile
        if device.gpu_instance_id is not None:
            labels["GPU_I_ID"] = str(device.gpu_instance_id)
    if series.pod:
        labels.update(zip(DCGM_POD_LABELS, (series.namespace, series.pod, series.container), strict=True))
    return labels


def mig_profile(name: str) -> str:
    """The GPU instance profile in a MIG device's NVML name ("NVIDIA A100-SXM4-40GB MIG 1g.5gb");
    "" when the name has none."""
    _, marker, profile = name.rpartition(" MIG ")
    return profile.strip() if marker else ""
