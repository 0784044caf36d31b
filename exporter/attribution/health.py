"""GPU health: one verdict per GPU, derived from the health group's reads by the rules of one table.

Pure functions over the reader's plain data, with no I/O. Each rule (``RULES``) names a reason, its
severity and where it comes from (the README's table of rules is checked against it); a GPU's status
is the highest severity among the reasons in force: 0 healthy, 1 degraded (serviceable), 2 unhealthy
(needs action). A GPU whose health reads are all unsupported is ``unknown``, never healthy; a GPU
that is lost, or whose reads have stalled past the staleness bound, is unhealthy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from exporter.catalogue import CLOCK_EVENT_REASONS, RECOVERY_ACTIONS
from exporter.model import DeviceReading, GpuHealth, LostGpu

HEALTHY, DEGRADED, UNHEALTHY = 0, 1, 2
SEVERITIES = {DEGRADED: "degraded", UNHEALTHY: "unhealthy"}

# Xids whose immediate action in NVIDIA's Xid catalogue is a GPU reset (RESET_GPU, or the double-bit
# ECC and NVLink workflows that end in one) or a node reboot (RESTART_BM); the same codes as the
# GpuXidCritical alert.
RESET_XIDS = (48, 62, 64, 74, 95, 119, 120)
REBOOT_XIDS = (79,)
# DCGM's memory health watch warned at this many volatile corrected (single-bit) ECC errors within a
# minute (DCGM_LIMIT_MAX_SBE_RATE, DcgmHealthWatch::MonitorMem).
CORRECTED_ECC_STORM_PER_MINUTE = 10
# The reads that say whether a GPU is failing; with none of them answering its health is unknown.
CONDITION_READS = ("remapped_rows", "ecc_uncorrected", "clock_events")


@dataclass(frozen=True)
class Evidence:
    """What the rules see of one GPU."""

    reads: Mapping[str, Any] | None  # its plain reads; None: the GPU is lost
    xid_ages_s: Mapping[int, float]  # Xid -> seconds since its latest event
    xid_window_s: float
    stale: bool  # its last reading is older than the staleness bound
    corrected_ecc_per_minute: float | None = None  # over the last minute or more of reads

    def read(self, key: str) -> Any | None:
        return None if self.reads is None else self.reads.get(key)

    def clock_event(self, *reasons: str) -> bool:
        mask = self.read("clock_events")
        return mask is not None and any(mask & CLOCK_EVENT_REASONS[reason] for reason in reasons)

    def xid_within_window(self, codes: Iterable[int]) -> bool:
        ages = self.xid_ages_s
        return any(code in ages and ages[code] <= self.xid_window_s for code in codes)


class Rule(NamedTuple):
    reason: str
    severity: int
    source: str  # where it comes from, for the README
    holds: Callable[[Evidence], bool]


def _recovery_rule(value: int, name: str) -> Rule:
    # Draining peer-to-peer traffic leaves the GPU serving other work; every other action takes it out.
    severity = DEGRADED if name == "drain_p2p" else UNHEALTHY
    return Rule(
        f"recovery_{name}",
        severity,
        f"the driver's recovery action field (`NVML_FI_DEV_GET_GPU_RECOVERY_ACTION`) says {name}",
        lambda e: (fields := e.read("field_values")) is not None and fields.recovery_action == value,
    )


def _codes(codes: tuple[int, ...]) -> str:
    return ", ".join(map(str, codes))


RULES: tuple[Rule, ...] = (
    Rule(
        "gpu_lost",
        UNHEALTHY,
        "NVML says the GPU is lost (`GPU_IS_LOST`) or it cannot say its UUID",
        lambda e: e.reads is None,
    ),
    Rule(
        "unreadable",
        UNHEALTHY,
        "its NVML reads have not returned for longer than `--max-staleness`",
        lambda e: e.stale,
    ),
    Rule(
        "unknown",
        DEGRADED,
        "none of its health reads (ECC, remapped rows, clock event reasons) is supported",
        lambda e: e.reads is not None and all(e.read(key) is None for key in CONDITION_READS),
    ),
    Rule(
        "row_remap_failure",
        UNHEALTHY,
        "`nvmlDeviceGetRemappedRows` failureOccurred",
        lambda e: (rows := e.read("remapped_rows")) is not None and rows.failed,
    ),
    Rule(
        "uncorrectable_ecc",
        UNHEALTHY,
        "`nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE)` above 0: since the driver loaded",
        lambda e: (count := e.read("ecc_uncorrected")) is not None and count > 0,
    ),
    Rule(
        "xid_gpu_reset",
        UNHEALTHY,
        f"an Xid event needing a GPU reset ({_codes(RESET_XIDS)}) within `--health-xid-window`",
        lambda e: e.xid_within_window(RESET_XIDS),
    ),
    Rule(
        "xid_node_reboot",
        UNHEALTHY,
        f"an Xid event needing a node reboot ({_codes(REBOOT_XIDS)}) within `--health-xid-window`",
        lambda e: e.xid_within_window(REBOOT_XIDS),
    ),
    *(_recovery_rule(value, name) for value, name in RECOVERY_ACTIONS.items() if value != 0),
    Rule(
        "row_remap_pending",
        DEGRADED,
        "`nvmlDeviceGetRemappedRows` isPending: a reset applies it",
        lambda e: (rows := e.read("remapped_rows")) is not None and rows.pending,
    ),
    Rule(
        "thermal_slowdown",
        DEGRADED,
        "clock event reasons hw_thermal_slowdown or sw_thermal_slowdown",
        lambda e: e.clock_event("hw_thermal_slowdown", "sw_thermal_slowdown"),
    ),
    Rule(
        "power_brake_slowdown",
        DEGRADED,
        "clock event reason hw_power_brake_slowdown",
        lambda e: e.clock_event("hw_power_brake_slowdown"),
    ),
    Rule(
        "corrected_ecc_storm",
        DEGRADED,
        "`nvmlDeviceGetTotalEccErrors(CORRECTED, VOLATILE)` rising by "
        f"{CORRECTED_ECC_STORM_PER_MINUTE} or more a minute, over the last minute or more of reads",
        lambda e: (
            e.corrected_ecc_per_minute is not None and e.corrected_ecc_per_minute >= CORRECTED_ECC_STORM_PER_MINUTE
        ),
    ),
)


def judge(evidence: Evidence) -> tuple[int, tuple[tuple[str, str], ...]]:
    """The status and the (reason, severity) of every rule in force, in the table's order."""
    held = [rule for rule in RULES if rule.holds(evidence)]
    status = max((rule.severity for rule in held), default=HEALTHY)
    return status, tuple((rule.reason, SEVERITIES[rule.severity]) for rule in held)


def gpu_health(
    devices: Iterable[DeviceReading],
    lost: Iterable[LostGpu],
    now: float,
    xid_window_s: float,
    max_staleness_s: float,
) -> tuple[GpuHealth, ...]:
    """A verdict per GPU (MIG devices are judged with their GPU), read at ``now`` (time.monotonic())."""
    verdicts: list[GpuHealth] = []
    for device in devices:
        if device.parent_uuid is not None:
            continue
        evidence = Evidence(
            device.reads,
            {xid: now - seen for xid, seen in device.xid_seen.items()},
            xid_window_s,
            stale=now - device.sampled_at > max_staleness_s,
            corrected_ecc_per_minute=device.corrected_ecc_per_minute,
        )
        verdicts.append(GpuHealth(device.index, device.uuid, device.model, *judge(evidence)))
    for gpu in lost:
        status, reasons = judge(Evidence(None, {}, xid_window_s, stale=False))
        verdicts.append(GpuHealth(gpu.index, gpu.uuid, gpu.model, status, reasons))
    return tuple(sorted(verdicts, key=lambda v: v.index))
