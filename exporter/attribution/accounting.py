"""Accounting: each pod's energy and GPU-time, summed across polls, with energy conserved per GPU.

One pure step, ``(ledger, this poll's attributed series) -> (ledger, gaps)``, over frozen data;
the agent holds the ledger between polls. Each physical GPU's energy counter is divided among the
series that held the GPU (or its MIG devices) since the counter last moved, by the share-seconds
each earned, in whole millijoules rounded cumulatively, so the parts add up to the increase
exactly. The counter is read every few polls (its last value is served in between): shares accrue
until it moves, and a pod that left meanwhile keeps its series until that settlement pays it.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from exporter.catalogue import DEVICE_ENERGY, DEVICE_SM_ACTIVE
from exporter.model import CostLabels, CostSeries, DeviceReading, GpuSeries

SeriesKey = tuple[str, str, str, str]  # device uuid, namespace, pod, container

AGENT_START, COUNTER_RESET, MISSING_READING = "agent_start", "counter_reset", "missing_reading"
# A series whose pod left waits this many polls at most for its GPU's counter to move; then what
# it earned goes to the others (the counter is read every few polls, so this is a stuck counter).
LINGER_POLLS = 12
# The profile in a MIG device's name: <compute slices>g.<memory>gb.
_MIG_PROFILE = re.compile(r"\b(\d+)g\.\d+gb\b")
# A GPU's compute slices in MIG mode, by the model in its NVML name (NVIDIA's MIG user guide,
# "Supported GPUs": max instances). A model not listed has no slice count: no fraction is guessed.
MIG_COMPUTE_SLICES = (
    (re.compile(r"\b(A100|H100|H200|H20|GH200|B200|GB200)\b"), 7),
    (re.compile(r"\bA30\b"), 4),
    (re.compile(r"\bRTX PRO 6000 Blackwell\b"), 4),
)


class Account(NamedTuple):
    """A series' totals (a CostSeries), and the share-seconds it earned that its GPU's counter has not
    paid yet. A tuple: one is made for every series every poll."""

    labels: CostLabels
    energy_millijoules: int = 0
    allocated_gpu_seconds: float | None = None
    busy_gpu_seconds: float | None = None
    unpaid_share_seconds: float = 0.0
    absent_polls: int = 0  # polls since attribution last listed it

    @property
    def energy_joules(self) -> float:
        return self.energy_millijoules / 1000.0


@dataclass(frozen=True)
class Meter:
    """A physical GPU's energy as last seen: its counter, or a running power × time estimate where it
    has none. ``millijoules`` None: the counter went missing, the next reading starts afresh."""

    sampled_at: float
    millijoules: float | None
    estimated: bool


@dataclass(frozen=True)
class Ledger:
    # By the physical GPU whose counter pays them (a MIG device's parent): each poll settles one
    # GPU's accounts at a time, so they are kept apart rather than regrouped every poll.
    accounts: Mapping[str, Mapping[SeriesKey, Account]] = field(default_factory=dict)
    meters: Mapping[str, Meter] = field(default_factory=dict)  # physical GPU uuid -> its meter
    started: bool = False  # a GPU has been read: one met later is new, not a restart

    def costs(self) -> tuple[CostSeries, ...]:
        return tuple(account for on_gpu in self.accounts.values() for account in on_gpu.values())


# What one listed series earned over the poll's interval: the series (its labels are made from it
# only when its account opens), the share-seconds to be paid in energy when the GPU's counter moves,
# and its allocated and busy GPU-seconds. A plain tuple: one is made for every series every poll.
_Charge = tuple[GpuSeries, float, float | None, float | None]


def step(ledger: Ledger, series: Sequence[GpuSeries]) -> tuple[Ledger, Counter[str]]:
    """Charges one poll's interval to the series attribution listed, and pays each GPU's energy
    increase to the series that earned it; returns the new ledger and the intervals skipped by reason."""
    gaps: Counter[str] = Counter()
    on_device: dict[str, list[GpuSeries]] = {}
    for one in series:
        listed = on_device.get(one.device.uuid)
        if listed is None:
            on_device[one.device.uuid] = [one]
        else:
            listed.append(one)
    migs: dict[str, list[DeviceReading]] = defaultdict(list)
    gpus = []
    for listed in on_device.values():
        device = listed[0].device
        if device.parent_uuid is None:
            gpus.append(device)
        else:
            migs[device.parent_uuid].append(device)
    present = {gpu.uuid for gpu in gpus}
    gaps[MISSING_READING] += sum(
        1 for uuid, meter in ledger.meters.items() if uuid not in present and meter.millijoules is not None
    )
    accounts: dict[str, dict[SeriesKey, Account]] = {}
    meters: dict[str, Meter] = {}
    for gpu in gpus:
        meter = ledger.meters.get(gpu.uuid)
        interval_s = gpu.sampled_at - meter.sampled_at if meter is not None else 0.0
        charges = _charges(gpu, migs.get(gpu.uuid, []), on_device, interval_s)
        earlier = ledger.accounts.get(gpu.uuid, {})
        owed: dict[SeriesKey, float] = {}
        for key, account in earlier.items():
            charge = charges.get(key)
            if charge is not None:
                owed[key] = account.unpaid_share_seconds + charge[1]
            elif _still_owed(account):
                owed[key] = account.unpaid_share_seconds
        for key, charge in charges.items():
            if key not in owed:
                owed[key] = charge[1]
        meters[gpu.uuid], paid, gap = _settle(gpu, meter, interval_s, owed)
        if gap is None and meter is None and not ledger.started:
            gap = AGENT_START
        if gap is not None:
            gaps[gap] += 1
        accounts[gpu.uuid] = {
            key: _account(gpu, earlier.get(key), charges.get(key), None if paid is None else paid.get(key, 0), due)
            for key, due in owed.items()
        }
    return Ledger(accounts, meters, started=ledger.started or bool(gpus)), +gaps


def counter_readings(series: Sequence[GpuSeries]) -> dict[str, float]:
    """Each GPU's energy counter as this poll read it (GPUs without one are left out): what step pays
    from, so its energy totals can only change when this does."""
    return {one.device.uuid: samples[0].value for one in series if (samples := one.device.metrics.get(DEVICE_ENERGY))}


def _still_owed(account: Account) -> bool:
    """A series listed last poll stays; one whose pod left stays until paid (shown once paid), or
    until its GPU's counter has been stuck too long."""
    if account.absent_polls == 0:
        return True
    return account.unpaid_share_seconds > 0 and account.absent_polls < LINGER_POLLS


def _charges(
    gpu: DeviceReading, migs: list[DeviceReading], on_device: Mapping[str, list[GpuSeries]], interval_s: float
) -> dict[SeriesKey, _Charge]:
    """What each series on the GPU (on its MIG devices, in MIG mode) earned over the interval."""
    charges: dict[SeriesKey, _Charge] = {}
    shares = _energy_shares(gpu, migs)
    for device in migs or [gpu]:
        listed = on_device[device.uuid]
        fraction = _gpu_fraction(gpu, device) if migs else 1.0
        pods = len(listed)
        device_seconds = shares[device.uuid]
        allocated = None if fraction is None else interval_s * fraction / pods
        for one, share in zip(listed, _pod_shares(listed), strict=True):
            busy = None
            if fraction is not None:
                busy_ratio = _busy_ratio(one, pods)
                busy = None if busy_ratio is None else interval_s * busy_ratio * fraction
            charges[(device.uuid, one.namespace, one.pod, one.container)] = (
                one,
                device_seconds * share * interval_s,
                allocated,
                busy,
            )
    return charges


def _settle(
    gpu: DeviceReading, meter: Meter | None, interval_s: float, owed: Mapping[SeriesKey, float]
) -> tuple[Meter, Mapping[SeriesKey, int] | None, str | None]:
    """The GPU's new meter; what its energy increase pays each series, None while the counter has
    not moved (what is owed stays owed), empty when what was owed is dropped (the interval is
    skipped); and the reason an interval was skipped."""
    counter, estimated = _counter(gpu, meter, interval_s)
    if counter is None:  # what was earned cannot be paid: the interval is skipped
        lost = meter is not None and meter.millijoules is not None
        return Meter(gpu.sampled_at, None, estimated=False), {}, MISSING_READING if lost else None
    fresh = Meter(gpu.sampled_at, counter, estimated)
    if meter is None or meter.millijoules is None or meter.estimated != estimated:
        return fresh, {}, None  # a fresh start: what was earned before it is not paid
    increase = math.floor(counter) - math.floor(meter.millijoules)
    if increase < 0:
        return fresh, {}, COUNTER_RESET
    if increase == 0:
        return fresh, None, None
    paid = _split(increase, owed)
    return fresh, paid, None if paid else MISSING_READING


def _account(
    gpu: DeviceReading, earlier: Account | None, charge: _Charge | None, paid_millijoules: int | None, owed: float
) -> Account:
    """A series' account after this poll (it is listed now, or was earlier): what it earned added,
    what it was paid (None: nothing yet, it is still owed)."""
    if earlier is None:
        assert charge is not None
        one = charge[0]
        device = one.device
        earlier = Account(CostLabels(str(gpu.index), device.uuid, device.model, one.namespace, one.pod, one.container))
    allocated, busy, absent = earlier.allocated_gpu_seconds, earlier.busy_gpu_seconds, earlier.absent_polls + 1
    if charge is not None:
        allocated = _add(allocated, charge[2])
        busy = _add(busy, charge[3])
        absent = 0
    energy = earlier.energy_millijoules
    if paid_millijoules is not None:
        energy, owed = energy + paid_millijoules, 0.0
    return Account(earlier.labels, energy, allocated, busy, owed, absent)


def _add(total: float | None, part: float | None) -> float | None:
    """A total that stays unknown (None) until a part of it is known."""
    if part is None:
        return total
    return (total or 0.0) + part


def _counter(gpu: DeviceReading, meter: Meter | None, interval_s: float) -> tuple[float | None, bool]:
    """The GPU's energy counter in millijoules; where it has none, the meter's running estimate moved
    on by power × interval (estimated: True). None: neither can be read this poll, or the GPU has a
    counter that did not answer (its interval is skipped, not estimated)."""
    samples = gpu.metrics.get(DEVICE_ENERGY)
    if samples:
        return float(round(samples[0].value * 1000.0)), False
    if gpu.power_milliwatts is None or (meter is not None and not meter.estimated):
        return None, True
    if meter is None or not meter.estimated or meter.millijoules is None:
        return 0.0, True
    return meter.millijoules + gpu.power_milliwatts * interval_s, True


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


_WHOLE = (1.0,)  # a device's only series has all of it


def _pod_shares(listed: Sequence[GpuSeries]) -> Sequence[float]:
    """Each series' share of its device: the measured shares duty_cycle_current shows, in proportion;
    equally when they cannot be measured or all are idle."""
    if len(listed) == 1:
        return _WHOLE
    if all(one.share_measured for one in listed):
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
    """The fraction of its GPU a MIG device is: its compute slices ÷ the GPU's, else (a name without
    a profile) its memory ÷ the GPU's; None when neither is known, or the GPU's model is not in
    MIG_COMPUTE_SLICES."""
    slices = _slices(mig)
    if slices is not None:
        gpu_slices = _gpu_slices(gpu.model)
        return None if gpu_slices is None else slices / gpu_slices
    if mig.memory_total_bytes and gpu.memory_total_bytes:
        return mig.memory_total_bytes / gpu.memory_total_bytes
    return None


def _slices(mig: DeviceReading) -> float | None:
    """A MIG device's compute slices, from its profile in the name NVML gives it (``… MIG 3g.40gb``)."""
    return _profile_slices(mig.model)


# Names are few and fixed: each is matched once, not on every poll (the cache bounds the odd one out).
@functools.lru_cache(maxsize=256)
def _profile_slices(model: str) -> float | None:
    match = _MIG_PROFILE.search(model)
    return float(match.group(1)) if match else None


@functools.lru_cache(maxsize=256)
def _gpu_slices(model: str) -> int | None:
    return next((n for pattern, n in MIG_COMPUTE_SLICES if pattern.search(model)), None)


def _sm_active(device: DeviceReading) -> float | None:
    samples = device.metrics.get(DEVICE_SM_ACTIVE)
    return samples[0].value if samples else None


def _split(millijoules: int, owed: Mapping[SeriesKey, float]) -> dict[SeriesKey, int]:
    """Divides ``millijoules`` by the share-seconds owed, rounding the running total (the last one
    gets what is left), so the parts sum to it exactly. Empty: nothing is owed to pay it to."""
    keys = sorted(owed)
    total = sum(owed[key] for key in keys)
    if total <= 0:
        return {}
    parts: dict[SeriesKey, int] = {}
    running, paid = 0.0, 0
    for key in keys[:-1]:
        running += owed[key]
        due = min(millijoules, round(millijoules * running / total))
        parts[key], paid = due - paid, due
    parts[keys[-1]] = millijoules - paid
    return parts
