"""Dynamic Resource Allocation (``resource.k8s.io``): which NVML device a DRA-allocated device is.

The kubelet names a DRA device by (driver, pool, device); the node's ResourceSlices say what each
one is, and NVIDIA's driver (``gpu.nvidia.com``) lists a ``uuid`` attribute per device: the GPU's
UUID, or the MIG device's for a MIG device. That attribute is the join to NVML. Device names are
the driver's own (``gpu-<minor>``, MIG patterns that changed between releases) and are read only
as a fallback while no slice can be read, and only in the full-GPU form ``gpu-<minor>``.

Pure functions: the ResourceSlice watch (exporter.resourceslices) turns each slice into a
``SliceRecord`` with ``slice_record`` and hands the records to ``device_uuids``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NVIDIA_GPU_DRIVER = "gpu.nvidia.com"
_GPU_NAME = re.compile(r"gpu-(\d+)")  # a full GPU in NVIDIA's driver's naming
_NVML_UUID = re.compile(r"(GPU|MIG)-[0-9a-fA-F-]{8,}")

DeviceKey = tuple[str, str, str]  # (driver, pool, device)


@dataclass(frozen=True)
class SliceRecord:
    """What attribution needs of one ResourceSlice: its devices' UUID attributes."""

    driver: str
    pool: str
    generation: int  # the pool's generation: a newer one replaces what older slices said
    uuids: tuple[tuple[str, str], ...]  # (device name, uuid attribute) for devices that have one


def slice_record(raw: Mapping[str, Any]) -> SliceRecord:
    """A ResourceSlice's JSON in ``resource.k8s.io/v1`` (and v1beta2: attributes on the device) or
    ``v1beta1`` (attributes under ``basic``) reduced to its devices' ``uuid`` attributes."""
    spec = raw["spec"]
    driver = str(spec["driver"])
    pool = spec.get("pool") or {}
    uuids = []
    for device in spec.get("devices") or ():
        attributes = (device.get("basic") or device).get("attributes") or {}
        # An unqualified name is in the driver's domain; a qualified one may be written out.
        value = attributes.get("uuid") or attributes.get(f"{driver}/uuid") or {}
        uuid = value.get("string") if isinstance(value, dict) else None
        if isinstance(uuid, str) and _NVML_UUID.fullmatch(uuid):
            uuids.append((str(device["name"]), uuid))
    return SliceRecord(
        driver=driver,
        pool=str(pool.get("name", "")),
        generation=int(pool.get("generation") or 0),
        uuids=tuple(uuids),
    )


def device_uuids(slices: Iterable[SliceRecord]) -> dict[DeviceKey, str]:
    """(driver, pool, device) -> NVML UUID over all slices; of a pool's slices, the newest
    generation's win, as the scheduler reads them while a driver republishes."""
    newest: dict[tuple[str, str], int] = {}
    records = list(slices)
    for record in records:
        key = (record.driver, record.pool)
        newest[key] = max(newest.get(key, record.generation), record.generation)
    return {
        (record.driver, record.pool, name): uuid
        for record in records
        if record.generation == newest[(record.driver, record.pool)]
        for name, uuid in record.uuids
    }


def gpu_drivers(known: Mapping[DeviceKey, str] | None) -> frozenset[str]:
    """NVIDIA's GPU driver, and any driver whose slices give its devices NVML UUIDs: claims of
    other drivers (NICs, IMEX channels) are none of ours and are not counted as unknown."""
    return frozenset({NVIDIA_GPU_DRIVER, *(driver for driver, _, _ in known or {})})


def fallback_minor(driver: str, device: str) -> int | None:
    """The minor number in NVIDIA's ``gpu-<minor>`` name, for use only while slices cannot be read.
    MIG device names are not read: their pattern changed between driver releases."""
    match = _GPU_NAME.fullmatch(device) if driver == NVIDIA_GPU_DRIVER else None
    return int(match.group(1)) if match else None
