"""Device ids as the kubelet reports them for NVIDIA resources, parsed into what they point at.

Pure functions; which physical device a reference means is decided in ``attribute`` against the
devices NVML reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REPLICA_SUFFIX = re.compile(r"::\d+$")  # time-slicing / MPS replicas of the NVIDIA device plugin
_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9a-fA-F-]+)/(\d+)/(\d+)$")  # drivers before R470
_UUID = re.compile(r"(GPU|MIG)-[0-9a-fA-F-]{8,}")
_GKE = re.compile(r"^nvidia(\d+)(?:/gi(\d+))?(?:/vgpu\d+)?$")  # GKE: nvidia0, nvidia0/gi0/vgpu1


@dataclass(frozen=True)
class DeviceRef:
    """What a device id names: a UUID, or a GPU (by UUID or minor number) plus a GPU instance."""

    uuid: str | None = None
    parent_uuid: str | None = None
    minor_number: int | None = None
    gpu_instance_id: int | None = None


def is_gpu_resource(resource_name: str) -> bool:
    """nvidia.com/gpu, nvidia.com/gpu.shared (renamed replicas) and nvidia.com/mig-<profile>."""
    return (
        resource_name == "nvidia.com/gpu"
        or resource_name.startswith("nvidia.com/gpu.")
        or resource_name.startswith("nvidia.com/mig-")
    )


def parse_device_id(device_id: str) -> DeviceRef | None:
    """Returns what the id refers to, or None for an id in no format we know (never guessed)."""
    plain = _REPLICA_SUFFIX.sub("", device_id.strip())
    legacy = _LEGACY_MIG.match(plain)
    if legacy:
        return DeviceRef(parent_uuid=legacy.group(1), gpu_instance_id=int(legacy.group(2)))
    if _UUID.fullmatch(plain):
        return DeviceRef(uuid=plain)
    gke = _GKE.match(plain)
    if gke:
        gi = gke.group(2)
        return DeviceRef(minor_number=int(gke.group(1)), gpu_instance_id=int(gi) if gi is not None else None)
    return None
