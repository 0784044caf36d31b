"""Plain data that flows through the agent: what the readers produce and what the collector renders.

Every record is frozen so a snapshot, once published, cannot change under a scrape. Units are in
the field names; ``None`` means "not measured" and is never rendered (an HPA fed 0 scales down).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Sample(NamedTuple):
    """One sample of a per-device family: the values of its labels beyond the device's, and its value."""

    labels: tuple[str, ...]
    value: float


Samples = tuple[Sample, ...]


class DeviceError(NamedTuple):
    """An NVML error counted on a device: the GPU's NVML index, the device's UUID, the error kind."""

    gpu: str
    uuid: str
    kind: str


@dataclass(frozen=True)
class GpuProcess:
    """A compute process NVML lists on a device (host PID namespace)."""

    pid: int
    used_memory_bytes: int | None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class DeviceReading:
    """One GPU, or one MIG device of a GPU, as NVML reported it at ``sampled_at``."""

    index: int  # NVML index of the GPU (of the parent GPU for a MIG device)
    uuid: str
    model: str
    sampled_at: float  # time.monotonic() when the read finished
    pci_bus_id: str | None = None  # NVML's busId (a MIG device's is its GPU's); read once
    minor_number: int | None = None
    parent_uuid: str | None = None  # set on MIG devices
    gpu_instance_id: int | None = None
    duty_cycle_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_milliwatts: float | None = None
    # None: the process list could not be read; () is a real "no processes".
    processes: tuple[GpuProcess, ...] | None = None
    # pid -> SM utilisation percent over the last interval; None: not measurable on this device.
    process_sm_percent: Mapping[int, float] | None = None
    # The catalogue's per-device families (exporter.catalogue): family name -> its samples. A family
    # the device does not support is not in it.
    metrics: Mapping[str, Samples] = field(default_factory=dict)
    # The plain value of each catalogue source read (exporter.catalogue.SOURCES key; None: absent),
    # for the health rules. Empty on MIG devices.
    reads: Mapping[str, Any] = field(default_factory=dict)
    # Xid -> time.monotonic() of its latest event on this GPU or any of its GPU instances.
    xid_seen: Mapping[int, float] = field(default_factory=dict)
    # Corrected (volatile) ECC errors per minute over the last minute or more of reads
    # (exporter.sources.errorrate); None before two reads of the count.
    corrected_ecc_per_minute: float | None = None


@dataclass(frozen=True)
class LostGpu:
    """A GPU that NVML lists but that cannot be read: lost (GPU_IS_LOST) or unable to say who it is.
    ``uuid`` and ``model`` are what it last answered ("" if it never did)."""

    index: int
    uuid: str
    model: str
    why: str


@dataclass(frozen=True)
class GpuHealth:
    """One GPU's health verdict: its status (0 healthy, 1 degraded, 2 unhealthy) and the reasons in
    force, each with its severity."""

    index: int
    uuid: str
    model: str
    status: int
    reasons: tuple[tuple[str, str], ...]  # (reason, severity)


@dataclass(frozen=True)
class Allocation:
    """A device id the kubelet says it handed to a container (pod-resources ``List``)."""

    namespace: str
    pod: str
    container: str
    resource_name: str
    device_id: str


@dataclass(frozen=True)
class ClaimAllocation(Allocation):
    """A device Dynamic Resource Allocation handed to a container (pod-resources ``dynamic_resources``).

    ``resource_name`` is the DRA driver and ``device_id`` the device's name in its pool: the
    (driver, pool, device) triple names it in the node's ResourceSlices.
    """

    claim_namespace: str
    claim: str
    pool: str
    share_id: str | None = None  # set when several consumers share the device (Kubernetes 1.35+)

    @property
    def driver(self) -> str:
        return self.resource_name

    @property
    def device(self) -> str:
        return self.device_id


@dataclass(frozen=True)
class ResolvedClaim:
    """A DRA allocation and the NVML device (GPU or MIG UUID) it resolved to on this node."""

    allocation: ClaimAllocation
    uuid: str


DeviceKey = tuple[str, str, str]  # a DRA device: (driver, pool, device)


@dataclass(frozen=True)
class PodInfo:
    """What the Kubernetes API says about a pod on this node."""

    uid: str
    namespace: str
    name: str
    phase: str
    container_names: Mapping[str, str] = field(default_factory=dict)  # container id (no scheme) -> name
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True)
class ProcessOwner:
    """Where a PID lives according to its cgroup: a pod's container, or the host (no pod uid)."""

    pid: int
    pod_uid: str | None
    container_id: str | None


@dataclass(frozen=True)
class GpuSeries:
    """One labelled row of the ``*_current`` gauges: a device, and the pod using it (or none)."""

    device: DeviceReading
    namespace: str = ""
    pod: str = ""
    container: str = ""
    duty_cycle_percent: float | None = None
    memory_used_bytes: int | None = None
    # On a device several pods share: duty_cycle_percent is the pod's own processes' measured share
    # (False: the device's, as the shares could not be measured).
    share_measured: bool = False


@dataclass(frozen=True)
class Attribution:
    """What attribution produced from one poll's readings."""

    series: tuple[GpuSeries, ...]
    sharing_pods: Mapping[str, int]  # device uuid -> number of pods using it
    unknown_device_ids: Mapping[str, int]  # resource name -> ids that name no device here
    processes_by_owner: Mapping[str, int]  # "pod" | "host" | "unknown_pod" | "exited" -> count
    dra_allocations: tuple[ResolvedClaim, ...] = ()  # DRA allocations that name a device here


@dataclass(frozen=True)
class Health:
    """Self-observation published with each snapshot."""

    nvml_up: bool
    nvml_status: str
    pod_resources_up: bool
    kubernetes_up: bool | None  # None: the pod watch is turned off
    poll_duration_seconds: float | None
    last_success_wall_time: float | None
    device_errors: Mapping[tuple[str, str, str], int]  # DeviceError fields -> count
    pod_resources_errors_total: Mapping[str, int]
    accounting_gaps_total: Mapping[str, int] = field(default_factory=dict)  # reason -> intervals skipped


class CostLabels(NamedTuple):
    """A series of the cost families: a device (GPU or MIG) and the pod holding it (or none)."""

    gpu: str  # NVML index of the (parent) GPU
    uuid: str
    model: str
    namespace: str
    pod: str
    container: str


class CostSeries(Protocol):
    """What a series of the cost families was charged since the agent started; None: not measurable
    on its device. (Accounting's own immutable record provides it.)"""

    @property
    def labels(self) -> CostLabels: ...

    @property
    def energy_millijoules(self) -> int: ...

    @property
    def allocated_gpu_seconds(self) -> float | None: ...

    @property
    def busy_gpu_seconds(self) -> float | None: ...

    @property
    def energy_joules(self) -> float: ...


@dataclass(frozen=True)
class Snapshot:
    """Everything one poll learnt, swapped in atomically for the renderer."""

    node: str
    attribution: Attribution
    health: Health
    completed_at: float  # time.monotonic()
    gpu_health: tuple[GpuHealth, ...] = ()  # with the health group on
    driver_version: str = ""  # NVML's, for the dcgm group's DCGM_FI_DRIVER_VERSION label
    costs: tuple[CostSeries, ...] | None = None  # None: the cost group is off


EMPTY_ATTRIBUTION = Attribution(series=(), sharing_pods={}, unknown_device_ids={}, processes_by_owner={})
