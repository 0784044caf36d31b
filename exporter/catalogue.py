"""The metric catalogue: every family the agent exports, declared once, by its exposed name.

Each GPU family (``FAMILIES``) says its name, help, unit, type, group (``--metrics``), the devices
it covers (GPU, MIG) and the NVML read behind it. The NVML reader reads exactly the sources the
enabled groups need and turns them into samples here. The agent's families about itself
(``SELF_METRICS``, ``gpu_exporter_*``) say their name, help, unit, type and labels. The collector
renders all of them from these declarations; the README's metric tables are checked against them
(tests/test_catalogue.py). A new metric is one entry.

Pure data and pure functions: the NVML calls are named, not imported (exporter.sources.nvml calls them),
and the values handed to ``Source.plain`` are the bindings' structs read by attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, NamedTuple

from exporter.model import GpuSeries, Sample, Samples

SEED = "seed"
DCGM = "dcgm"
COST = "cost"
GROUPS = (SEED, "health", "clocks", "power", "pcie", "media", "profiling", COST, DCGM)
# --metrics: seed is always on; the default (all) is every group but dcgm, which is asked for by name.
DEFAULT_GROUPS = tuple(group for group in GROUPS if group != DCGM)
# Groups another one needs: cost divides the energy counter the power group reads.
IMPLIED_GROUPS = {COST: "power"}

# The labels of every per-device family; the extra ones of a family follow them.
DEVICE_LABELS = ("node", "gpu", "uuid", "model")
# The seed's *_current families carry the pod using the device, as they always have.
POD_LABELS = ("node", "gpu", "uuid", "model", "namespace", "pod", "container")
# The join from a device to the pods using it.
POD_INFO_LABELS = ("node", "gpu", "uuid", "namespace", "pod", "container")
# The join from a DRA claim to its device: who holds it, then the claim and the device.
DRA_LABELS = ("node", "namespace", "pod", "container", "claim_namespace", "claim", "driver", "pool", "device", "uuid")
# dcgm-exporter's labels (internal/pkg/rendermetrics/render_metrics.go): every series has these, a MIG
# device's adds GPU_I_PROFILE and GPU_I_ID, and a device a pod holds DCGM_POD_LABELS (a series per pod).
# The node name twice: "hostname" since dcgm-exporter#655 (4.6+), "Hostname" for older consumers.
DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "hostname", "DCGM_FI_DRIVER_VERSION")
DCGM_POD_LABELS = ("namespace", "pod", "container")

# NVML's enum values passed as call arguments (the catalogue imports no pynvml).
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
NVML_VOLATILE_ECC = 0
NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230  # a field value of newer drivers
NVML_FI_DEV_MEMORY_TEMP = 82  # HBM parts only: NOT_SUPPORTED elsewhere


# The sources the events watcher feeds (Via.XID_EVENTS), by key.
XID_COUNTS, XID_SEEN = "xid", "xid_seen"


class Utilisation(NamedTuple):
    gpu: float  # percent of the sample period a kernel ran
    memory: float  # percent of it memory was read or written


class Memory(NamedTuple):
    used: int
    total: int
    free: int
    reserved: int | None  # v2 only: v1 counts it as used


class FieldValues(NamedTuple):
    """The fields read in one nvmlDeviceGetFieldValues call; None where that field does not answer."""

    recovery_action: int | None
    memory_temperature: float | None


class RemappedRows(NamedTuple):
    correctable: int
    uncorrectable: int
    pending: bool
    failed: bool


@dataclass(frozen=True)
class Call:
    """A pynvml function, called with the device handle then ``args`` (a tuple of ints is passed as a
    list, e.g. field ids); ``version`` names the pynvml struct-version object passed as ``version=``
    (e.g. ``nvmlMemory_v2``)."""

    function: str
    args: tuple[int | tuple[int, ...], ...] = ()
    version: str | None = None


class Via(Enum):
    """How the reader gets a source's value."""

    CALLS = "calls"  # the source's own calls, through the query
    GPM_SAMPLES = "GPM samples"  # between two GPM samples a poll apart (exporter.sources.gpm)
    XID_EVENTS = "Xid events"  # counted by the events watcher (exporter.sources.nvmlevents)


@dataclass(frozen=True)
class Source:
    """One NVML read of a device. ``calls`` are variants, newest first: the reader remembers per
    device which one answers. ``plain`` turns the answer into plain data (numbers, named tuples)."""

    key: str
    calls: tuple[Call, ...]
    plain: Callable[[Any], Any] = lambda answer: answer
    every: int = 1  # read every this many polls (the last answer is served in between)
    mig: bool = False  # read on MIG devices too
    what: str = ""  # for the logs, when not the key
    via: Via = Via.CALLS

    @property
    def described(self) -> str:
        return self.what or self.key.replace("_", " ")


# Cadences. The seed's values (what the HPA reads) and GPM's every poll; point samples that a scrape
# every 15 s or so would see one of anyway (clocks, PCIe throughput, codecs, throttle reasons, the
# energy counter) every SAMPLED_EVERY polls; rarely changing values (ECC counts, remapped rows, PCIe
# replays, the power limit) every SLOW_EVERY polls. With every group on, that keeps a poll's NVML
# calls per GPU near 1.35 times the seed's.
SAMPLED_EVERY = 5
SLOW_EVERY = 10


# nvmlValueType_t -> the member of nvmlValue_t holding it.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _field(value: Any) -> float | None:
    """One field's answer as a number; None where it does not answer (each field has its own return:
    an older driver answers the call but not the recovery action, a GPU without HBM not the memory
    temperature)."""
    if int(value.nvmlReturn) != 0:
        return None
    member = _VALUE_MEMBERS.get(int(value.valueType))
    return None if member is None else float(getattr(value.value, member))


def _field_values(values: Any) -> FieldValues:
    recovery, memory_temperature = (_field(value) for value in values)
    return FieldValues(None if recovery is None else int(recovery), memory_temperature)


def _reserved(memory: Any) -> int | None:
    reserved = getattr(memory, "reserved", None)
    return None if reserved is None else int(reserved)


def _utilisation_percent(answer: Any) -> int:
    """The encoder's or decoder's answer: (utilisation percent, sampling period in microseconds)."""
    percent, _period_us = answer
    return int(percent)


SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source(
            "utilisation",
            (Call("nvmlDeviceGetUtilizationRates"),),
            lambda u: Utilisation(float(u.gpu), float(u.memory)),
        ),
        Source(
            "memory",
            # v2 where the driver has it: v1 counts the driver's reserved memory as used.
            (Call("nvmlDeviceGetMemoryInfo", version="nvmlMemory_v2"), Call("nvmlDeviceGetMemoryInfo")),
            lambda m: Memory(int(m.used), int(m.total), int(m.free), _reserved(m)),
            mig=True,
            what="memory info",
        ),
        Source(
            "temperature",
            (
                Call("nvmlDeviceGetTemperatureV", (NVML_TEMPERATURE_GPU,)),
                Call("nvmlDeviceGetTemperature", (NVML_TEMPERATURE_GPU,)),
            ),
            float,
        ),
        Source("power", (Call("nvmlDeviceGetPowerUsage"),), float, what="power usage"),
        Source("sm_clock", (Call("nvmlDeviceGetClockInfo", (NVML_CLOCK_SM,)),), int, every=SAMPLED_EVERY),
        Source("memory_clock", (Call("nvmlDeviceGetClockInfo", (NVML_CLOCK_MEM,)),), int, every=SAMPLED_EVERY),
        Source("energy", (Call("nvmlDeviceGetTotalEnergyConsumption"),), int, every=SAMPLED_EVERY),
        Source("power_limit", (Call("nvmlDeviceGetEnforcedPowerLimit"),), int, every=SLOW_EVERY),
        Source("encoder", (Call("nvmlDeviceGetEncoderUtilization"),), _utilisation_percent, every=SAMPLED_EVERY),
        Source("decoder", (Call("nvmlDeviceGetDecoderUtilization"),), _utilisation_percent, every=SAMPLED_EVERY),
        Source("pcie_tx", (Call("nvmlDeviceGetPcieThroughput", (NVML_PCIE_UTIL_TX_BYTES,)),), int, every=SAMPLED_EVERY),
        Source("pcie_rx", (Call("nvmlDeviceGetPcieThroughput", (NVML_PCIE_UTIL_RX_BYTES,)),), int, every=SAMPLED_EVERY),
        Source("pcie_replays", (Call("nvmlDeviceGetPcieReplayCounter"),), int, every=SLOW_EVERY),
        # Volatile counts: since the driver loaded.
        Source(
            "ecc_corrected",
            (Call("nvmlDeviceGetTotalEccErrors", (NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_VOLATILE_ECC)),),
            int,
            every=SLOW_EVERY,
        ),
        Source(
            "ecc_uncorrected",
            (Call("nvmlDeviceGetTotalEccErrors", (NVML_MEMORY_ERROR_TYPE_UNCORRECTED, NVML_VOLATILE_ECC)),),
            int,
            every=SLOW_EVERY,
        ),
        Source(
            "remapped_rows",
            (Call("nvmlDeviceGetRemappedRows"),),
            lambda rows: RemappedRows(int(rows[0]), int(rows[1]), bool(rows[2]), bool(rows[3])),
            every=SLOW_EVERY,
        ),
        Source(
            "clock_events",
            (Call("nvmlDeviceGetCurrentClocksEventReasons"), Call("nvmlDeviceGetCurrentClocksThrottleReasons")),
            int,
            every=SAMPLED_EVERY,
        ),
        Source(
            "field_values",
            # One call for every field read, in FieldValues' order.
            (Call("nvmlDeviceGetFieldValues", ((NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, NVML_FI_DEV_MEMORY_TEMP),)),),
            _field_values,
            every=SAMPLED_EVERY,
            what="field values (GPU recovery action, memory temperature)",
        ),
        Source("gpm", (), mig=True, via=Via.GPM_SAMPLES),  # {GPM metric id: percent}
        Source(XID_COUNTS, (), mig=True, via=Via.XID_EVENTS),  # {Xid: events counted}
        # {Xid: time.monotonic() of its latest event} on a GPU the watcher watches or saw an event on.
        Source(XID_SEEN, (), via=Via.XID_EVENTS),
    )
}

# GPM metric ids (nvmlGpmMetricId_t), all percentages.
GPM_SM_ACTIVE, GPM_SM_OCCUPANCY, GPM_TENSOR_ACTIVE, GPM_DRAM_BANDWIDTH = 2, 3, 5, 10
GPM_METRICS = (GPM_SM_ACTIVE, GPM_SM_OCCUPANCY, GPM_TENSOR_ACTIVE, GPM_DRAM_BANDWIDTH)

# nvmlClocksEventReason bits, named as the gpu_clock_event_active{reason} label.
CLOCK_EVENT_REASONS = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
}


# nvmlDeviceGpuRecoveryAction_t, named as the gpu_recovery_action{action} label.
RECOVERY_ACTIONS = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
    5: "recover_imex_domain",
    6: "bus_reset",
    7: "system_reboot",
}


def recovery_action_name(value: int) -> str:
    """The action's label value; a value newer than this table is named by its number, never dropped."""
    return RECOVERY_ACTIONS.get(value, f"action_{value}")


@dataclass(frozen=True)
class Family:
    """One exported family. Device families take ``samples`` from the device's plain reads
    (keyed by Source.key); the seed's pod families take ``pod_value`` from an attributed series
    (their ``reads`` say where it comes from, and so on which devices it exists)."""

    name: str  # as exposed: counters end in _total
    help: str
    unit: str
    type: Literal["gauge", "counter"]
    group: str
    nvml: str  # where the value comes from, for the docs
    labels: tuple[str, ...] = DEVICE_LABELS
    reads: tuple[str, ...] = ()
    samples: Callable[[Mapping[str, Any]], Samples] | None = None
    pod_value: Callable[[GpuSeries], float | None] | None = None

    @property
    def devices(self) -> str:
        """GPU, or GPU and MIG: where the family can have series (where all its reads are made)."""
        return "GPU, MIG" if all(SOURCES[key].mig for key in self.reads) else "GPU"


def _one(key: str, convert: Callable[[Any], float]) -> Callable[[Mapping[str, Any]], Samples]:
    """One sample, no extra labels, from one source."""

    def samples(reads: Mapping[str, Any]) -> Samples:
        value = reads.get(key)
        return () if value is None else (Sample((), convert(value)),)

    return samples


def _by_label(**by: tuple[str, Callable[[Any], float]]) -> Callable[[Mapping[str, Any]], Samples]:
    """One sample per value of the family's extra label, each from its own source."""
    pairs = tuple((label, key, convert) for label, (key, convert) in by.items())

    def samples(reads: Mapping[str, Any]) -> Samples:
        return tuple(
            Sample((label,), convert(reads[key])) for label, key, convert in pairs if reads.get(key) is not None
        )

    return samples


def _percent_as_ratio(value: float) -> float:
    return value / 100.0


def _gpm(metric: int) -> Callable[[Mapping[str, Any]], Samples]:
    def samples(reads: Mapping[str, Any]) -> Samples:
        metrics = reads.get("gpm")
        return (Sample((), metrics[metric] / 100.0),) if metrics and metric in metrics else ()

    return samples


def _clock_events(reads: Mapping[str, Any]) -> Samples:
    mask = reads.get("clock_events")
    if mask is None:
        return ()
    return tuple(Sample((reason,), 1.0 if mask & bit else 0.0) for reason, bit in CLOCK_EVENT_REASONS.items())


def _recovery_actions(reads: Mapping[str, Any]) -> Samples:
    """One series per action, 1 for the one in force (a state set, as gpu_clock_event_active)."""
    fields = reads.get("field_values")
    value = None if fields is None else fields.recovery_action
    if value is None:
        return ()
    current = recovery_action_name(value)
    names = dict.fromkeys((*RECOVERY_ACTIONS.values(), current))  # a newer driver's action too
    return tuple(Sample((name,), 1.0 if name == current else 0.0) for name in names)


def _xid(reads: Mapping[str, Any]) -> Samples:
    return tuple(Sample((str(xid),), float(count)) for xid, count in sorted((reads.get(XID_COUNTS) or {}).items()))


def _last_xid(reads: Mapping[str, Any]) -> Samples:
    """dcgm-exporter's last Xid: the latest event's code as value and as its err_code label; 0 on a
    GPU watched that had none (dcgm-exporter's "No Error")."""
    seen = reads.get(XID_SEEN)
    if seen is None:
        return ()
    code = max(seen, key=seen.__getitem__) if seen else 0
    return (Sample((str(code),), float(code)),)


_WHOLE_DEVICE = "Absent on MIG devices."
MIB = 1024**2


def _dcgm(
    name: str,
    meaning: str,
    unit: str,
    key: str,
    convert: Callable[[Any], float | None],
    kind: Literal["gauge", "counter"] = "gauge",
    nvml: str = "",
) -> Family:
    """A dcgm-exporter field with the device's value, from one source: the same in every pod's series."""

    def samples(reads: Mapping[str, Any]) -> Samples:
        plain = reads.get(key)
        value = None if plain is None else convert(plain)
        return () if value is None else (Sample((), value),)

    nvml = nvml or f"`{SOURCES[key].calls[0].function}`"
    return Family(name, meaning, unit, kind, DCGM, nvml, DCGM_LABELS, reads=(key,), samples=samples)


def _dcgm_share(
    name: str, meaning: str, unit: str, nvml: str, key: str, share: Callable[[GpuSeries], float | None]
) -> Family:
    """A dcgm-exporter field carrying, on a device several pods share, each pod's own share."""
    meaning += ": on a GPU shared by several pods, each pod's own share."
    return Family(name, meaning, unit, "gauge", DCGM, nvml, DCGM_LABELS, reads=(key,), pod_value=share)


def _dcgm_gpm(name: str, meaning: str, metric: int, gpm_name: str) -> Family:
    """A DCGM profiling field from GPM: absent without GPM, never estimated from another read."""
    nvml = f"GPM `{gpm_name}` ÷ 100"
    return Family(name, meaning, "ratio", "gauge", DCGM, nvml, DCGM_LABELS, reads=("gpm",), samples=_gpm(metric))


POD_INFO = Family(
    "gpu_pod_info",
    "1 for each pod using a device (GPU or MIG device): join per-device families to pods on node, gpu and uuid.",
    "info",
    "gauge",
    SEED,
    "pod-resources allocations and the GPU processes' cgroups",
    POD_INFO_LABELS,
    pod_value=lambda s: 1.0 if s.pod else None,
)
# Rendered from the attribution's DRA allocations (neither samples nor a pod value).
DRA_ALLOCATION_INFO = Family(
    "gpu_dra_allocation_info",
    "1 for each device a container holds through a Dynamic Resource Allocation claim, resolved to its GPU "
    "or MIG device (uuid) through the node's ResourceSlices: join claims to per-device families on uuid.",
    "info",
    "gauge",
    SEED,
    "pod-resources `dynamic_resources`, resolved through the node's ResourceSlices",
    DRA_LABELS,
)

# Rendered from the health verdicts (exporter.attribution.health), read or not: a GPU that is lost
# or whose reads stall is unhealthy, not absent.
_HEALTH_READS = (
    "remapped_rows",
    "ecc_uncorrected",
    "ecc_corrected",
    "clock_events",
    "field_values",
    XID_COUNTS,
    XID_SEEN,
)
GPU_HEALTH_STATUS = Family(
    "gpu_health_status",
    "One answer per GPU: 0 healthy, 1 degraded (serviceable), 2 unhealthy (needs action: drain, reset or "
    "reboot). gpu_health_reason says why.",
    "state",
    "gauge",
    "health",
    "the health rules (README, GPU health) over the health group's reads, and whether the GPU answers",
    reads=_HEALTH_READS,
)
GPU_HEALTH_REASON = Family(
    "gpu_health_reason",
    "1 for each health rule in force on a GPU, with its severity (degraded, unhealthy); none when healthy.",
    "info",
    "gauge",
    "health",
    "the health rules (README, GPU health)",
    labels=(*DEVICE_LABELS, "reason", "severity"),
    reads=_HEALTH_READS,
)


# Cost: rendered from the agent's accounting ledger (exporter.attribution.accounting), which divides
# each GPU's energy and time among the pods holding it; neither samples nor a pod value.
_COST_SPLIT = (
    "on a device several pods share, in proportion to their measured SM shares (those of duty_cycle_current), "
    "equally where those cannot be measured or all are idle; on a GPU in MIG mode, among its MIG devices in "
    "proportion to their GPM SM activity (with the profiling group on) or else their compute slices. "
    "A device no pod holds counts with empty pod labels."
)
ENERGY = Family(
    "gpu_pod_energy_joules_total",
    "Energy of the GPU charged to each pod holding the device, in joules, since the agent started: each "
    "increase of the GPU's energy counter is divided, in whole millijoules that sum to it exactly, "
    + _COST_SPLIT
    + " Where the GPU has no energy counter, its power draw × time stands in for it.",
    "joules",
    "counter",
    COST,
    "`nvmlDeviceGetTotalEnergyConsumption` deltas (the power group's read); where unsupported, "
    "`nvmlDeviceGetPowerUsage` × time",
    POD_LABELS,
)
ALLOCATED_GPU_SECONDS = Family(
    "gpu_pod_allocated_gpu_seconds_total",
    "Wall time each pod held the device × the fraction of a physical GPU it is (1 for a whole GPU, a MIG "
    "device's compute slices ÷ the GPU's, ÷ the number of pods sharing a device), in GPU-seconds, since the "
    "agent started.",
    "seconds",
    "counter",
    COST,
    "the attribution's pods on each device, between polls",
    POD_LABELS,
)
BUSY_GPU_SECONDS = Family(
    "gpu_pod_busy_gpu_seconds_total",
    "Time each pod's work kept the device busy, in GPU-seconds (the pod's duty cycle × the interval, × the "
    "MIG device's fraction of its GPU, measured by GPM there), since the agent started; busy ÷ allocated is "
    "the pod's efficiency. Absent where the device's activity is not measured.",
    "seconds",
    "counter",
    COST,
    "`nvmlDeviceGetUtilizationRates().gpu` or the pod's processes' SM utilisation; GPM SM activity on MIG",
    POD_LABELS,
)
COST_FAMILIES = (ENERGY, ALLOCATED_GPU_SECONDS, BUSY_GPU_SECONDS)
# The device families accounting reads from a reading's metrics.
DEVICE_ENERGY = "gpu_energy_joules_total"
DEVICE_SM_ACTIVE = "gpu_sm_active_ratio"

FAMILIES: tuple[Family, ...] = (
    # --- seed: the five *_current families with their pod labels, and the pod join
    Family(
        "duty_cycle_current",
        "GPU utilisation in percent (0-100): the device's, or on a GPU shared by several pods the pod's "
        "own processes' SM utilisation summed. Absent on MIG devices, where NVML does not measure it.",
        "percent",
        "gauge",
        SEED,
        "`nvmlDeviceGetUtilizationRates().gpu`; on a GPU shared by several pods, the pod's own processes' "
        "SM utilisation (`nvmlDeviceGetProcessUtilization`) summed",
        POD_LABELS,
        reads=("utilisation",),
        pod_value=lambda s: s.duty_cycle_percent,
    ),
    Family(
        "memory_used_bytes_current",
        "GPU memory used, in bytes: the device's, or on a shared GPU the pod's own processes' memory summed.",
        "bytes",
        "gauge",
        SEED,
        "`nvmlDeviceGetMemoryInfo` v2 (v1 on older drivers); on a shared GPU, the pod's processes' "
        "`usedGpuMemory` summed (the device's value when any of them is unknown: never a partial sum)",
        POD_LABELS,
        reads=("memory",),
        pod_value=lambda s: s.memory_used_bytes,
    ),
    Family(
        "memory_total_bytes_current",
        "GPU memory total, in bytes, of the device (GPU or MIG device).",
        "bytes",
        "gauge",
        SEED,
        "`nvmlDeviceGetMemoryInfo`: the device's total",
        POD_LABELS,
        reads=("memory",),
        pod_value=lambda s: s.device.memory_total_bytes,
    ),
    Family(
        "temperature_celsius_current",
        "GPU core temperature in degrees Celsius.",
        "celsius",
        "gauge",
        SEED,
        "`nvmlDeviceGetTemperatureV` (falls back to `nvmlDeviceGetTemperature`)",
        POD_LABELS,
        reads=("temperature",),
        pod_value=lambda s: s.device.temperature_celsius,
    ),
    Family(
        "power_usage_milliwatts_current",
        "GPU board power draw in milliwatts.",
        "milliwatts",
        "gauge",
        SEED,
        "`nvmlDeviceGetPowerUsage`",
        POD_LABELS,
        reads=("power",),
        pod_value=lambda s: s.device.power_milliwatts,
    ),
    POD_INFO,
    DRA_ALLOCATION_INFO,
    Family(
        "gpu_memory_utilization_ratio",
        "Fraction of the last sample period (0-1) during which GPU memory was being read or written. " + _WHOLE_DEVICE,
        "ratio",
        "gauge",
        SEED,
        "`nvmlDeviceGetUtilizationRates().memory` ÷ 100",
        reads=("utilisation",),
        samples=_one("utilisation", lambda u: u.memory / 100.0),
    ),
    # --- clocks
    Family(
        "gpu_sm_clock_hertz",
        "Current SM clock, in hertz. " + _WHOLE_DEVICE,
        "hertz",
        "gauge",
        "clocks",
        "`nvmlDeviceGetClockInfo(NVML_CLOCK_SM)` (MHz × 10⁶)",
        reads=("sm_clock",),
        samples=_one("sm_clock", lambda mhz: mhz * 1e6),
    ),
    Family(
        "gpu_memory_clock_hertz",
        "Current memory clock, in hertz. " + _WHOLE_DEVICE,
        "hertz",
        "gauge",
        "clocks",
        "`nvmlDeviceGetClockInfo(NVML_CLOCK_MEM)` (MHz × 10⁶)",
        reads=("memory_clock",),
        samples=_one("memory_clock", lambda mhz: mhz * 1e6),
    ),
    # --- power
    Family(
        "gpu_energy_joules_total",
        "Energy the GPU consumed since the driver loaded, in joules (Volta and newer). " + _WHOLE_DEVICE,
        "joules",
        "counter",
        "power",
        "`nvmlDeviceGetTotalEnergyConsumption` (mJ ÷ 1000)",
        reads=("energy",),
        samples=_one("energy", lambda mj: mj / 1000.0),
    ),
    Family(
        "gpu_power_limit_watts",
        "Power limit the driver enforces, in watts. " + _WHOLE_DEVICE,
        "watts",
        "gauge",
        "power",
        "`nvmlDeviceGetEnforcedPowerLimit` (mW ÷ 1000)",
        reads=("power_limit",),
        samples=_one("power_limit", lambda mw: mw / 1000.0),
    ),
    # --- media
    Family(
        "gpu_encoder_utilization_ratio",
        "Fraction of the sampling period (0-1) the video encoder was busy. " + _WHOLE_DEVICE,
        "ratio",
        "gauge",
        "media",
        "`nvmlDeviceGetEncoderUtilization` ÷ 100",
        reads=("encoder",),
        samples=_one("encoder", _percent_as_ratio),
    ),
    Family(
        "gpu_decoder_utilization_ratio",
        "Fraction of the sampling period (0-1) the video decoder was busy. " + _WHOLE_DEVICE,
        "ratio",
        "gauge",
        "media",
        "`nvmlDeviceGetDecoderUtilization` ÷ 100",
        reads=("decoder",),
        samples=_one("decoder", _percent_as_ratio),
    ),
    # --- pcie
    Family(
        "gpu_pcie_throughput_bytes_per_second",
        "PCIe throughput over a 20 ms sample, in bytes per second, by direction (tx: from the GPU, rx: to it). "
        + _WHOLE_DEVICE,
        "bytes per second",
        "gauge",
        "pcie",
        "`nvmlDeviceGetPcieThroughput` (TX_BYTES, RX_BYTES; KB/s × 1024)",
        labels=(*DEVICE_LABELS, "direction"),
        reads=("pcie_tx", "pcie_rx"),
        samples=_by_label(tx=("pcie_tx", lambda kb: kb * 1024.0), rx=("pcie_rx", lambda kb: kb * 1024.0)),
    ),
    # --- health
    Family(
        "gpu_pcie_replay_errors_total",
        "PCIe replays (retransmitted packets) since the driver loaded; a rising count is a failing link. "
        + _WHOLE_DEVICE,
        "errors",
        "counter",
        "health",
        "`nvmlDeviceGetPcieReplayCounter`",
        reads=("pcie_replays",),
        samples=_one("pcie_replays", float),
    ),
    Family(
        "gpu_xid_errors_total",
        "Xid critical errors reported by the driver since the agent started, by Xid code; a code's series "
        "appears at 1 on its first event. Counted on the MIG device when the event names its GPU instance.",
        "errors",
        "counter",
        "health",
        "NVML events: `nvmlDeviceRegisterEvents(nvmlEventTypeXidCriticalError)`, `nvmlEventSetWait_v2` "
        "on a thread of its own",
        labels=(*DEVICE_LABELS, "xid"),
        reads=("xid",),
        samples=_xid,
    ),
    Family(
        "gpu_ecc_errors_total",
        "ECC memory errors since the driver loaded (volatile counts), by type: corrected, uncorrected. "
        + _WHOLE_DEVICE,
        "errors",
        "counter",
        "health",
        "`nvmlDeviceGetTotalEccErrors(type, NVML_VOLATILE_ECC)`",
        labels=(*DEVICE_LABELS, "type"),
        reads=("ecc_corrected", "ecc_uncorrected"),
        samples=_by_label(corrected=("ecc_corrected", float), uncorrected=("ecc_uncorrected", float)),
    ),
    Family(
        "gpu_remapped_rows",
        "Memory rows remapped, by the kind of error that caused it: correctable, uncorrectable (Ampere and "
        "newer). " + _WHOLE_DEVICE,
        "rows",
        "gauge",
        "health",
        "`nvmlDeviceGetRemappedRows` (corrRows, uncRows)",
        labels=(*DEVICE_LABELS, "kind"),
        reads=("remapped_rows",),
        samples=_by_label(
            correctable=("remapped_rows", lambda rows: float(rows.correctable)),
            uncorrectable=("remapped_rows", lambda rows: float(rows.uncorrectable)),
        ),
    ),
    Family(
        "gpu_row_remap_pending",
        "1 when a row remap is pending: the GPU needs a reset to apply it. " + _WHOLE_DEVICE,
        "boolean",
        "gauge",
        "health",
        "`nvmlDeviceGetRemappedRows` (isPending)",
        reads=("remapped_rows",),
        samples=_one("remapped_rows", lambda rows: float(rows.pending)),
    ),
    Family(
        "gpu_row_remap_failed",
        "1 when a row remap failed: the GPU should be taken out of service. " + _WHOLE_DEVICE,
        "boolean",
        "gauge",
        "health",
        "`nvmlDeviceGetRemappedRows` (failureOccurred)",
        reads=("remapped_rows",),
        samples=_one("remapped_rows", lambda rows: float(rows.failed)),
    ),
    Family(
        "gpu_clock_event_active",
        "1 while a reason is holding the clocks down (throttling), by reason. " + _WHOLE_DEVICE,
        "boolean",
        "gauge",
        "health",
        "`nvmlDeviceGetCurrentClocksEventReasons` (older drivers: `nvmlDeviceGetCurrentClocksThrottleReasons`)",
        labels=(*DEVICE_LABELS, "reason"),
        reads=("clock_events",),
        samples=_clock_events,
    ),
    Family(
        "gpu_recovery_action",
        "The recovery the driver asks for, by action (none, gpu_reset, node_reboot, drain_p2p, drain_and_reset, "
        "...): 1 for the action in force, 0 for the others. Absent on drivers without the field. " + _WHOLE_DEVICE,
        "boolean",
        "gauge",
        "health",
        "`nvmlDeviceGetFieldValues(NVML_FI_DEV_GET_GPU_RECOVERY_ACTION)` (newer drivers)",
        labels=(*DEVICE_LABELS, "action"),
        reads=("field_values",),
        samples=_recovery_actions,
    ),
    GPU_HEALTH_STATUS,
    GPU_HEALTH_REASON,
    # --- profiling (GPM: Hopper and newer)
    Family(
        "gpu_sm_active_ratio",
        "Fraction of SMs busy (0-1) over the last poll interval; absent where GPM is not supported.",
        "ratio",
        "gauge",
        "profiling",
        "GPM `NVML_GPM_METRIC_SM_UTIL` ÷ 100 (`nvmlGpmMigSampleGet` on MIG)",
        reads=("gpm",),
        samples=_gpm(GPM_SM_ACTIVE),
    ),
    Family(
        "gpu_sm_occupancy_ratio",
        "Resident warps over the theoretical maximum (0-1) over the last poll interval; absent where GPM "
        "is not supported.",
        "ratio",
        "gauge",
        "profiling",
        "GPM `NVML_GPM_METRIC_SM_OCCUPANCY` ÷ 100",
        reads=("gpm",),
        samples=_gpm(GPM_SM_OCCUPANCY),
    ),
    Family(
        "gpu_tensor_active_ratio",
        "Fraction of time (0-1) the SMs ran any tensor operation over the last poll interval; absent where "
        "GPM is not supported.",
        "ratio",
        "gauge",
        "profiling",
        "GPM `NVML_GPM_METRIC_ANY_TENSOR_UTIL` ÷ 100",
        reads=("gpm",),
        samples=_gpm(GPM_TENSOR_ACTIVE),
    ),
    Family(
        "gpu_dram_bandwidth_ratio",
        "DRAM bandwidth used over the theoretical maximum (0-1) over the last poll interval; absent where "
        "GPM is not supported.",
        "ratio",
        "gauge",
        "profiling",
        "GPM `NVML_GPM_METRIC_DRAM_BW_UTIL` ÷ 100",
        reads=("gpm",),
        samples=_gpm(GPM_DRAM_BANDWIDTH),
    ),
    # --- dcgm: dcgm-exporter's default counters (etc/default-counters.csv) under its names, types,
    # units and labels, from the reads of the groups they mirror. Not every name ends in _total or is
    # a ratio where it says "ratio": they are dcgm-exporter's, which its consumers query.
    _dcgm("DCGM_FI_DEV_SM_CLOCK", "SM clock frequency (in MHz).", "MHz", "sm_clock", float),
    _dcgm("DCGM_FI_DEV_MEM_CLOCK", "Memory clock frequency (in MHz).", "MHz", "memory_clock", float),
    _dcgm("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", "celsius", "temperature", float),
    _dcgm("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "watts", "power", lambda mw: mw / 1000.0),
    _dcgm(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        "millijoules",
        "energy",
        float,
        "counter",
    ),
    _dcgm(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "Total number of PCIe retries.", "retries", "pcie_replays", float, "counter"
    ),
    _dcgm_share(
        "DCGM_FI_DEV_GPU_UTIL",
        "GPU utilization (in %)",
        "percent",
        "as `duty_cycle_current`",
        "utilisation",
        lambda s: s.duty_cycle_percent,
    ),
    _dcgm(
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        "percent",
        "utilisation",
        lambda u: u.memory,
        nvml="`nvmlDeviceGetUtilizationRates().memory`",
    ),
    _dcgm("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", "percent", "encoder", float),
    _dcgm("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", "percent", "decoder", float),
    _dcgm(
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        "MiB",
        "memory",
        lambda m: m.free / MIB,
        nvml="`nvmlDeviceGetMemoryInfo` v2 (v1 on older drivers): free ÷ 2²⁰",
    ),
    _dcgm_share(
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB)",
        "MiB",
        "as `memory_used_bytes_current` ÷ 2²⁰",
        "memory",
        lambda s: None if s.memory_used_bytes is None else s.memory_used_bytes / MIB,
    ),
    _dcgm(
        "DCGM_FI_DEV_FB_RESERVED",
        "Framebuffer memory reserved (in MiB).",
        "MiB",
        "memory",
        lambda m: None if m.reserved is None else m.reserved / MIB,
        nvml="`nvmlDeviceGetMemoryInfo` v2: reserved ÷ 2²⁰ (absent with v1)",
    ),
    _dcgm(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for correctable errors.",
        "rows",
        "remapped_rows",
        lambda rows: float(rows.correctable),
        "counter",
    ),
    _dcgm(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for uncorrectable errors.",
        "rows",
        "remapped_rows",
        lambda rows: float(rows.uncorrectable),
        "counter",
    ),
    _dcgm(
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "Whether remapping of rows has failed.",
        "boolean",
        "remapped_rows",
        lambda rows: float(rows.failed),
    ),
    _dcgm_gpm(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "Ratio of time the graphics engine is active.",
        GPM_SM_ACTIVE,
        "NVML_GPM_METRIC_SM_UTIL",
    ),
    _dcgm_gpm(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        GPM_TENSOR_ACTIVE,
        "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    ),
    _dcgm_gpm(
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        GPM_DRAM_BANDWIDTH,
        "NVML_GPM_METRIC_DRAM_BW_UTIL",
    ),
    _dcgm(
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.",
        "bytes per second",
        "pcie_tx",
        lambda kb: kb * 1024.0,
    ),
    _dcgm(
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.",
        "bytes per second",
        "pcie_rx",
        lambda kb: kb * 1024.0,
    ),
    _dcgm(
        "DCGM_FI_DEV_MEMORY_TEMP",
        "Memory temperature (in C).",
        "celsius",
        "field_values",
        lambda fields: fields.memory_temperature,
        nvml="`nvmlDeviceGetFieldValues(NVML_FI_DEV_MEMORY_TEMP)`, in the health group's call for the recovery "
        "action (absent without HBM)",
    ),
    Family(
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        "Xid",
        "gauge",
        DCGM,
        "the code of the GPU's latest Xid event (NVML events, as `gpu_xid_errors_total`), 0 before its first; "
        "absent where the GPU cannot register for Xid events",
        (*DCGM_LABELS, "err_code"),
        reads=(XID_SEEN,),
        samples=_last_xid,
    ),
    # --- cost
    *COST_FAMILIES,
)

# The seed's own reads: the *_current families and attribution use them whatever the groups.
SEED_READS = ("utilisation", "memory", "temperature", "power")
POD_FAMILIES = tuple(f for f in FAMILIES if f.pod_value is not None)
# The seed's *_current families: one series per (device, pod), with the pod's labels.
CURRENT_FAMILIES = tuple(f for f in POD_FAMILIES if f.labels == POD_LABELS)
DEVICE_FAMILIES = tuple(f for f in FAMILIES if f.samples is not None and f.group != DCGM)
# dcgm-exporter's families: one series per (device, pod holding it), with its labels.
DCGM_FAMILIES = tuple(f for f in FAMILIES if f.group == DCGM)
# The groups whose reads the dcgm group's families take their values from: enabled with it, so that
# it adds no NVML call of its own.
DCGM_MIRRORS = tuple(
    group
    for group in GROUPS
    if group not in (SEED, DCGM)
    and any(f.group == group and set(f.reads) & set(d.reads) for f in FAMILIES for d in DCGM_FAMILIES)
)


def parse_groups(text: str) -> frozenset[str]:
    """``--metrics``: comma-separated groups, or ``all``; seed is always on. ValueError names an unknown one."""
    wanted = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in wanted:
        wanted = (wanted - {"all"}) | set(DEFAULT_GROUPS)
    unknown = sorted(wanted - set(GROUPS))
    if unknown:
        known = ", ".join(GROUPS)
        raise ValueError(
            f"unknown group {', '.join(map(repr, unknown))}; want a comma-separated list of {known} or all"
        )
    if DCGM in wanted:
        wanted |= set(DCGM_MIRRORS)
    wanted |= {IMPLIED_GROUPS[group] for group in wanted if group in IMPLIED_GROUPS}
    return frozenset(wanted | {SEED})


def enabled_families(groups: Iterable[str]) -> tuple[Family, ...]:
    """The families whose samples are taken from each device's reads (the dcgm group's among them)."""
    chosen = set(groups) | {SEED}
    return tuple(f for f in FAMILIES if f.samples is not None and f.group in chosen)


def reads_for(families: Iterable[Family], mig: bool) -> tuple[Source, ...]:
    """The sources a device needs for these families (a MIG device only those read on MIG)."""
    keys = dict.fromkeys(key for family in families for key in family.reads)
    keys.update(dict.fromkeys(SEED_READS))
    return tuple(SOURCES[key] for key in keys if not mig or SOURCES[key].mig)


def device_samples(families: Iterable[Family], reads: Mapping[str, Any]) -> dict[str, Samples]:
    """Each family's samples from one device's plain reads; a family with no value is left out."""
    out: dict[str, Samples] = {}
    for family in families:
        if family.samples is not None and (samples := family.samples(reads)):
            out[family.name] = samples
    return out


@dataclass(frozen=True)
class SelfMetric:
    """A family the agent exports about itself: whether what it reads answers, how fresh its data is."""

    name: str  # as exposed: counters end in _total
    help: str
    unit: str
    type: Literal["gauge", "counter"]
    labels: tuple[str, ...] = ()


NVML_UP = SelfMetric("gpu_exporter_nvml_up", "1 when NVML is initialised and answering, else 0.", "boolean", "gauge")
POD_RESOURCES_UP = SelfMetric(
    "gpu_exporter_pod_resources_up",
    "1 when the last kubelet pod-resources List succeeded, else 0 (series then carry no pod labels).",
    "boolean",
    "gauge",
)
KUBERNETES_UP = SelfMetric(
    "gpu_exporter_kubernetes_up",
    "1 when the pod watch on the Kubernetes API is connected, else 0; absent with the watch turned off.",
    "boolean",
    "gauge",
)
POLL_DURATION = SelfMetric(
    "gpu_exporter_poll_duration_seconds", "Duration of the last poll, in seconds.", "seconds", "gauge"
)
LAST_SUCCESSFUL_POLL = SelfMetric(
    "gpu_exporter_last_successful_poll_timestamp_seconds",
    "Unix time, in seconds, at which the last poll with NVML up finished.",
    "seconds",
    "gauge",
)
DATA_AGE = SelfMetric(
    "gpu_exporter_data_age_seconds",
    "Seconds since the poll whose data is served finished, measured at scrape time.",
    "seconds",
    "gauge",
)
DEVICE_DATA_AGE = SelfMetric(
    "gpu_exporter_device_data_age_seconds",
    "Seconds since each device was last read, measured at scrape time; its series are dropped past "
    "the staleness bound (a GPU whose NVML calls hang shows here).",
    "seconds",
    "gauge",
    ("gpu", "uuid"),
)
STALE_SERIES = SelfMetric(
    "gpu_exporter_stale_series",
    "GPU series left out because their device reading is older than the staleness bound.",
    "series",
    "gauge",
)
DEVICE_ERRORS = SelfMetric(
    "gpu_exporter_device_errors_total",
    "NVML errors per device, by NVML error kind.",
    "errors",
    "counter",
    ("gpu", "uuid", "kind"),
)
UNKNOWN_DEVICE_IDS = SelfMetric(
    "gpu_exporter_unknown_device_ids",
    "Device ids in the kubelet's last answer, for GPU resources, that name no device on this node "
    "(unknown format, another node's GPU, or no pod name); they are not guessed.",
    "ids",
    "gauge",
    ("resource",),
)
POD_RESOURCES_ERRORS = SelfMetric(
    "gpu_exporter_pod_resources_errors_total",
    "Failed kubelet pod-resources calls, by gRPC status code.",
    "errors",
    "counter",
    ("code",),
)
GPU_SHARING_PODS = SelfMetric(
    "gpu_exporter_gpu_sharing_pods",
    "Pods using each device; above 1 the device is shared (time-slicing, MPS).",
    "pods",
    "gauge",
    ("uuid",),
)
GPU_PROCESSES = SelfMetric(
    "gpu_exporter_gpu_processes",
    "GPU processes in the last poll by what their cgroup says: pod, host, unknown_pod (not in the pod "
    "watch), exited (gone before its cgroup was read), pending (cgroup not read yet).",
    "processes",
    "gauge",
    ("owner",),
)
ACCOUNTING_GAPS = SelfMetric(
    "gpu_exporter_accounting_gaps_total",
    "Poll intervals of a GPU left out of the cost families, by reason: agent_start (no earlier reading), "
    "counter_reset (the energy counter went back), missing_reading (no energy or power reading, or the GPU "
    "went missing).",
    "intervals",
    "counter",
    ("reason",),
)

SELF_METRICS: tuple[SelfMetric, ...] = (
    NVML_UP,
    POD_RESOURCES_UP,
    KUBERNETES_UP,
    POLL_DURATION,
    LAST_SUCCESSFUL_POLL,
    DATA_AGE,
    DEVICE_DATA_AGE,
    STALE_SERIES,
    DEVICE_ERRORS,
    UNKNOWN_DEVICE_IDS,
    POD_RESOURCES_ERRORS,
    GPU_SHARING_PODS,
    GPU_PROCESSES,
    ACCOUNTING_GAPS,
)

# Every family the agent exposes, GPU families and self-metrics.
EXPOSED: tuple[Family | SelfMetric, ...] = (*FAMILIES, *SELF_METRICS)
