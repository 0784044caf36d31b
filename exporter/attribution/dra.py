"""Dynamic Resource Allocation (``resource.k8s.io``): which NVML device a DRA-allocated device is.

The kubelet names a DRA device by (driver, pool, device); the node's ResourceSlices say what each
one is, and NVIDIA's driver (``gpu.nvidia.com``) lists a ``uuid`` attribute per device: the GPU's
UUID, or the MIG device's for a MIG device. That attribute is the join to NVML. Device names are
the driver's own (``gpu-<minor>``, MIG patterns that changed between releases) and are read only
as a fallback while no slice can be read, and only in the full-GPU form ``gpu-<minor>``.

Pure functions: the ResourceSlice watch (exporter.sources.resourceslices) turns each slice into a
``SliceRecord`` with ``slice_record`` and hands the records to ``device_uuids``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from exporter.model import DeviceKey

NVIDIA_GPU_DRIVER = "gpu.nvidia.com"
_GPU_NAME = re.compile(r"gpu-(\d+)")  # a full GPU in NVIDIA's driver's naming


def gpu_drivers(known: Mapping[DeviceKey, str] | None) -> frozenset[str]:
    """NVIDIA's GPU driver, and any driver whose slices give its devices NVML UUIDs: claims of
    other drivers (NICs, IMEX channels) are none of ours and are not counted as unknown."""
    return frozenset({NVIDIA_GPU_DRIVER, *(driver for driver, _, _ in known or {})})


def fallback_minor(driver: str, device: str) -> int | None:
    """The minor number in NVIDIA's ``gpu-<minor>`` name, for use only while slices cannot be read.
    MIG device names are not read: their pattern changed between driver releases."""
    match = _GPU_NAME.fullmatch(device) if driver == NVIDIA_GPU_DRIVER else None
    return int(match.group(1)) if match else None
