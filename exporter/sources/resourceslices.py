"""This node's ResourceSlices (``resource.k8s.io``), watched to resolve DRA devices to NVML devices.

One reflector (exporter.sources.kube) restricted to ``spec.nodeName=<node>``, in the newest version the
server serves (``v1``, else ``v1beta2``, else ``v1beta1``: discovered from ``/apis/resource.k8s.io``
at each list), with the same backoff, health and logging as the pod watch. It starts only when the
kubelet first reports a DRA allocation: a node without DRA never asks the API for slices and
needs no RBAC for them. Each slice is kept as the ``uuid`` attributes of its devices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.backoff import Backoff
from exporter.model import Allocation, ClaimAllocation, DeviceKey
from exporter.sources.kube import Reflector
from exporter.sources.kubeclient import ApiError, KubeClient, load_credentials

GROUP = "resource.k8s.io"
VERSIONS = ("v1", "v1beta2", "v1beta1")  # preferred first; all carry the devices' uuid attribute


_NVML_UUID = re.compile(r"(GPU|MIG)-[0-9a-fA-F-]{8,}")


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


def discover(client: KubeClient) -> str:
    """The ResourceSlice collection path in the newest version the server serves."""
    group = client.get_json(f"/apis/{GROUP}", {}, "application/json", 30)
    served = {v.get("version") for v in group.get("versions") or () if isinstance(v, dict)}
    for version in VERSIONS:
        if version in served:
            return f"/apis/{GROUP}/{version}/resourceslices"
    raise ApiError(404, "NotFound", f"{GROUP} serves none of {', '.join(VERSIONS)} (only {sorted(map(str, served))})")


class SliceWatcher:
    """The ResourceSlices of ``node_name``, read through the Kubernetes API once DRA is in use."""

    def __init__(self, node_name: str, kubeconfig: str | None, backoff: Backoff | None = None) -> None:
        self.reflector: Reflector[SliceRecord] = Reflector(
            f"ResourceSlices on node {node_name}",
            discover,
            slice_record,
            connect=lambda: KubeClient(load_credentials(kubeconfig)),
            field_selector=f"spec.nodeName={node_name}",
            backoff=backoff,
        )
        self._started = False
        self._index: tuple[Mapping[str, SliceRecord] | None, dict[DeviceKey, str] | None] = (None, None)

    def devices(self, allocations: Iterable[Allocation]) -> Mapping[DeviceKey, str] | None:
        """(driver, pool, device) -> NVML UUID, or None while slices cannot be read (not listed yet,
        forbidden, not served, API away before the first list). Starts the watch the first time
        ``allocations`` hold a DRA allocation."""
        if not self._started and any(isinstance(a, ClaimAllocation) for a in allocations):
            self._started = True
            self.reflector.start()
        items = self.reflector.items
        if items is None:
            return None
        seen, index = self._index
        if seen is not items or index is None:  # the reflector publishes a new mapping on each change
            index = device_uuids(items.values())
            self._index = (items, index)
        return index

    def stop(self) -> None:
        self.reflector.stop()

    def join(self, timeout: float | None = None) -> None:
        self.reflector.join(timeout)
