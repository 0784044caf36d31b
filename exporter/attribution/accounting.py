"""Accounting: each pod's energy and GPU-time, summed across polls, with energy conserved per GPU.

One pure step, ``(ledger, this poll's attributed series) -> (ledger, gaps)``, over frozen data;
the agent holds the ledger between polls. Each physical GPU's energy counter is divided among the
series that held the GPU (or its MIG devices) since the counter last moved, by the share-seconds
each earned, in whole millijoules rounded cumulatively, so the parts add up to the increase
exactly. The counter is read every few polls (its last value is served in between): shares accrue
until it moves, and a pod that left meanwhile keeps its series until that settlement pays it.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from exporter.catalogue import DEVICE_ENERGY, DEVICE_SM_ACTIVE
from exporter.model import CostSeries, DeviceReading, GpuSeries

SeriesKey = tuple[str, str, str, str]  # device uuid, namespace, pod, container

AGENT_START, COUNTER_RESET, MISSING_READING = "agent_start", "counter_reset", "missing_reading"
# A series whose pod left waits this many polls at most for its GPU's counter to move; then what
# it earned goes to the others (the counter is read every few polls, so this is a stuck counter).
LINGER_POLLS = 12
# Compute slices of a GPU in MIG mode: 7 on A100, H100 and newer; 4 on A30.
_MIG_PROFILE = re.compile(r"\b(\d+)g\.\d+gb\b")


@dataclass(frozen=True)
class Account:
    """One series' totals, and the share-seconds it earned that the GPU's counter has not paid yet."""

    gpu: str
    uuid: str
    physical_uuid: str  # the GPU whose counter pays it (a MIG device's parent)
    model: str
    namespace: str
    pod: str
    container: str
    energy_millijoules: int = 0
    allocated_gpu_seconds: float | None = None
    busy_gpu_seconds: float | None = None
    unpaid_share_seconds: float = 0.0
    absent_polls: int = 0  # polls since attribution last listed it

    def exposed(self) -> CostSeries:
        holder = (self.namespace, self.pod, self.container)
        totals = (self.energy_millijoules / 1000.0, self.allocated_gpu_seconds, self.busy_gpu_seconds)
        return CostSeries(self.gpu, self.uuid, self.model, *holder, *totals)


@dataclass(frozen=True)
class Meter:
    """A physical GPU's energy as last seen: its counter, or a running power × time estimate where it
    has none. ``millijoules`` None: the counter went missing, the next reading starts afresh."""

    sampled_at: float
    millijoules: float | None
    estimated: bool


@dataclass(frozen=True)
class Ledger:
    accounts: Mapping[SeriesKey, Account] = field(default_factory=dict)
    meters: Mapping[str, Meter] = field(default_factory=dict)  # physical GPU uuid -> its meter
    started: bool = False  # a GPU has been read: one met later is new, not a restart

    def costs(self) -> tuple[CostSeries, ...]:
        return tuple(account.exposed() for _, account in sorted(self.accounts.items()))


def step(ledger: Ledger, series: Sequence[GpuSeries]) -> tuple[Ledger, Counter[str]]:
    """Charges one poll's interval to the series attribution listed, and pays each GPU's energy
    increase to the series that earned it; returns the new ledger and the intervals skipped by reason."""
    gaps: Counter[str] = Counter()
    on_device: dict[str, list[GpuSeries]] = defaultdict(list)
    for one in series:
        on_device[one.device.uuid].append(one)
    readings = {uuid: listed[0].device for uuid, listed in on_device.items()}
    migs: dict[str, list[DeviceReading]] = defaultdict(list)
    for device in readings.values():
        if device.parent_uuid is not None:
            migs[device.parent_uuid].append(device)
    gpus = [d for d in readings.values() if d.parent_uuid is None]
    present = {gpu.uuid for gpu in gpus}
    gaps[MISSING_READING] += sum(
        1 for uuid, meter in ledger.meters.items() if uuid not in present and meter.millijoules is not None
    )
    listed = {(one.device.uuid, one.namespace, one.pod, one.container) for one in series}
    accounts = {
        key: replace(account, absent_polls=account.absent_polls + 1)
        for key, account in ledger.accounts.items()
        if account.physical_uuid in present and (key in listed or _still_owed(account))
    }
    meters: dict[str, Meter] = {}
    for gpu in gpus:
        meter, gap = _meter_gpu(gpu, ledger.meters.get(gpu.uuid), on_device, migs.get(gpu.uuid, []), accounts)
        if gap is None and gpu.uuid not in ledger.meters and not ledger.started:
            gap = AGENT_START
        if gap is not None:
            gaps[gap] += 1
        meters[gpu.uuid] = meter
    return Ledger(accounts, meters, started=ledger.started or bool(gpus)), +gaps


def _still_owed(account: Account) -> bool:
    """A series listed last poll stays; one whose pod left stays until paid (shown once paid), or
    until its GPU's counter has been stuck too long."""
    if account.absent_polls == 0:
        return True
    return account.unpaid_share_seconds > 0 and account.absent_polls < LINGER_POLLS


def _meter_gpu(
    gpu: DeviceReading,
    meter: Meter | None,
    on_device: Mapping[str, list[GpuSeries]],
    migs: list[DeviceReading],
    accounts: dict[SeriesKey, Account],
) -> tuple[Meter, str | None]:
    """One GPU's poll: charges the interval's time and shares to its series (in ``accounts``), then
    pays its energy increase; returns its new meter and the reason the interval was skipped, if it was."""
    interval_s = gpu.sampled_at - meter.sampled_at if meter is not None else 0.0
    devices = migs or [gpu]
    shares = _energy_shares(gpu, migs)
    for device in devices:
        listed = on_device[device.uuid]
        fraction = _gpu_fraction(gpu, device) if migs else 1.0
        for one, share in zip(listed, _pod_shares(listed), strict=True):
            key = (device.uuid, one.namespace, one.pod, one.container)
            account = accounts.get(key) or Account(
                str(gpu.index), device.uuid, gpu.uuid, device.model, one.namespace, one.pod, one.container
            )
            accounts[key] = _charge(account, one, interval_s, shares[device.uuid] * share, fraction, len(listed))
    owed = {key: a.unpaid_share_seconds for key, a in accounts.items() if a.physical_uuid == gpu.uuid}
    counter, estimated = _counter(gpu, meter, interval_s)
    if counter is None:  # what was earned cannot be paid: the interval is skipped
        _forgive(accounts, owed)
        lost = meter is not None and meter.millijoules is not None
        return Meter(gpu.sampled_at, None, estimated=False), MISSING_READING if lost else None
    fresh = Meter(gpu.sampled_at, counter, estimated)
    if meter is None or meter.millijoules is None or meter.estimated != estimated:
        _forgive(accounts, owed)  # a fresh start: what was earned before it is not paid
        return fresh, None
    increase = math.floor(counter) - math.floor(meter.millijoules)
    if increase < 0:
        _forgive(accounts, owed)
        return fresh, COUNTER_RESET
    if increase > 0 and not _pay(accounts, owed, increase):
        return fresh, MISSING_READING
    return fresh, None


def _counter(gpu: DeviceReading, meter: Meter | None, interval_s: float) -> tuple[float | None, bool]:
    """The GPU's energy counter in millijoules; where it has none, the meter's running estimate moved
    on by power × interval (estimated: True). None: neither can be read this poll."""
    samples = gpu.metrics.get(DEVICE_ENERGY)
    if samples:
        return float(round(samples[0].value * 1000.0)), False
    if gpu.power_milliwatts is None:
        return None, True
    if meter is None or not meter.estimated or meter.millijoules is None:
        return 0.0, True
    return meter.millijoules + gpu.power_milliwatts * interval_s, True


def _charge(
    account: Account, one: GpuSeries, interval_s: float, share: float, fraction: float | None, pods: int
) -> Account:
    """The interval's share-seconds (to be paid in energy), allocated and busy GPU-seconds."""
    if interval_s <= 0:
        return replace(account, absent_polls=0)
    allocated = account.allocated_gpu_seconds
    if fraction is not None:
        allocated = (allocated or 0.0) + interval_s * fraction / pods
    busy = account.busy_gpu_seconds
    busy_ratio = _busy_ratio(one, pods)
    if busy_ratio is not None and fraction is not None:
        busy = (busy or 0.0) + interval_s * busy_ratio * fraction
    return replace(
        account,
        allocated_gpu_seconds=allocated,
        busy_gpu_seconds=busy,
        unpaid_share_seconds=account.unpaid_share_seconds + share * interval_s,
        absent_polls=0,
    )


def _busy_ratio(one: GpuSeries, pods: int) -> float | None:
    """The pod's part (0-1) of its device's time busy: its own measured share, or the device's duty
    cycle split equally; on a MIG device, the device's GPM SM activity split equally."""
    device = one.device
    if device.parent_uuid is not None:
        active = _sm_active(device)
        return None if active is None else active / pods
    if one.duty_cycle_percent is None:
        return None
    if pods > 1 and not one.share_measured:
        return one.duty_cycle_percent / 100.0 / pods
    return one.duty_cycle_percent / 100.0


def _pod_shares(listed: Sequence[GpuSeries]) -> list[float]:
    """Each series' share of its device: the measured shares duty_cycle_current shows, in proportion;
    equally when they cannot be measured or all are idle."""
    if len(listed) > 1 and all(one.share_measured for one in listed):
        duties = [one.duty_cycle_percent or 0.0 for one in listed]
        total = sum(duties)
        if total > 0:
            return [duty / total for duty in duties]
    return [1.0 / len(listed)] * len(listed)


def _energy_shares(gpu: DeviceReading, migs: Sequence[DeviceReading]) -> dict[str, float]:
    """Each device's share of the GPU's energy: the GPU's own, or in MIG mode its MIG devices' by GPM
    SM activity where every one has it and any is busy, else by compute slices, else equally."""
    if not migs:
        return {gpu.uuid: 1.0}
    for weights in ([_sm_active(m) for m in migs], [_slices(m) for m in migs]):
        known = [w for w in weights if w is not None]
        if len(known) == len(migs) and sum(known) > 0:
            return {m.uuid: w / sum(known) for m, w in zip(migs, known, strict=True)}
    return {m.uuid: 1.0 / len(migs) for m in migs}


def _gpu_fraction(gpu: DeviceReading, mig: DeviceReading) -> float | None:
    """The fraction of its GPU a MIG device is: its compute slices ÷ the GPU's, else its memory ÷
    the GPU's; None when neither is known."""
    slices = _slices(mig)
    if slices is not None:
        return slices / (4 if "A30" in gpu.model else 7)
    if mig.memory_total_bytes and gpu.memory_total_bytes:
        return mig.memory_total_bytes / gpu.memory_total_bytes
    return None


def _slices(mig: DeviceReading) -> float | None:
    """A MIG device's compute slices, from its profile in the name NVML gives it (``… MIG 3g.40gb``)."""
    match = _MIG_PROFILE.search(mig.model)
    return float(match.group(1)) if match else None


def _sm_active(device: DeviceReading) -> float | None:
    samples = device.metrics.get(DEVICE_SM_ACTIVE)
    return samples[0].value if samples else None


def _pay(accounts: dict[SeriesKey, Account], owed: Mapping[SeriesKey, float], millijoules: int) -> bool:
    """Divides ``millijoules`` by the share-seconds owed, rounding the running total (the last one
    gets what is left), so the parts sum to it exactly. False: nothing is owed to pay it to."""
    keys = sorted(owed)
    total = sum(owed[key] for key in keys)
    if total <= 0:
        return False
    running, paid = 0.0, 0
    for position, key in enumerate(keys):
        running += owed[key]
        due = millijoules if position == len(keys) - 1 else min(millijoules, round(millijoules * running / total))
        account = accounts[key]
        accounts[key] = replace(
            account, energy_millijoules=account.energy_millijoules + due - paid, unpaid_share_seconds=0.0
        )
        paid = due
    return True


def _forgive(accounts: dict[SeriesKey, Account], owed: Iterable[SeriesKey]) -> None:
    for key in owed:
        accounts[key] = replace(accounts[key], unpaid_share_seconds=0.0)
