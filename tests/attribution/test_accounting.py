"""Accounting rules, on plain data: energy conserved per GPU to the millijoule, shares, GPU-time, gaps."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from exporter.attribution.accounting import LINGER_POLLS, Ledger, step
from exporter.attribution.attribute import attribute
from exporter.catalogue import DEVICE_ENERGY, DEVICE_SM_ACTIVE
from exporter.model import Allocation, DeviceReading, GpuProcess, GpuSeries, PodInfo, ProcessOwner, Sample

GPU0 = "GPU-00000000-1111-2222-3333-444455556666"
MIG_A = "MIG-00000000-aaaa-bbbb-cccc-ddddeeeeffff"
MIG_B = "MIG-00000001-aaaa-bbbb-cccc-ddddeeeeffff"


def gpu(at: float, energy_j: float | None, **kwargs: Any) -> DeviceReading:
    metrics = {DEVICE_ENERGY: (Sample((), energy_j),)} if energy_j is not None else {}
    values: dict[str, Any] = dict(duty_cycle_percent=50.0, power_milliwatts=300_000.0, memory_total_bytes=80)
    values.update(kwargs)
    return DeviceReading(index=0, uuid=GPU0, model="NVIDIA H100", sampled_at=at, metrics=metrics, **values)


def mig(uuid: str, gi: int, profile: str, at: float, sm_active: float | None = None) -> DeviceReading:
    metrics = {DEVICE_SM_ACTIVE: (Sample((), sm_active),)} if sm_active is not None else {}
    return DeviceReading(
        index=0,
        uuid=uuid,
        model=f"NVIDIA H100 MIG {profile}",
        sampled_at=at,
        parent_uuid=GPU0,
        gpu_instance_id=gi,
        metrics=metrics,
    )


def held(device: DeviceReading, *pods: str, duty: float | None = None, measured: bool = False) -> list[GpuSeries]:
    if not pods:
        return [GpuSeries(device=device, duty_cycle_percent=device.duty_cycle_percent)]
    return [
        GpuSeries(device, "team", pod, "main", duty if duty is not None else device.duty_cycle_percent, None, measured)
        for pod in pods
    ]


def run(polls: Sequence[Sequence[GpuSeries]]) -> tuple[Ledger, Counter[str]]:
    ledger, gaps = Ledger(), Counter[str]()
    for series in polls:
        ledger, new = step(ledger, series)
        gaps.update(new)
    return ledger, gaps


def energy(ledger: Ledger) -> dict[tuple[str, str], float]:
    return {(c.labels.uuid, c.labels.pod): c.energy_joules for c in ledger.costs()}


def test_a_gpu_one_pod_holds_charges_it_all_its_energy_and_time() -> None:
    ledger, gaps = run([held(gpu(0.0, 1000.0), "a"), held(gpu(1.0, 1300.5), "a"), held(gpu(3.0, 1600.25), "a")])
    (cost,) = ledger.costs()
    assert (*cost.labels[3:], cost.energy_joules) == ("team", "a", "main", 600.25)
    assert cost.allocated_gpu_seconds == 3.0
    assert cost.busy_gpu_seconds == 1.5  # 50 % duty cycle
    assert gaps == {"agent_start": 1}  # the interval before the first reading is not known


def test_a_pod_that_arrives_starts_at_zero() -> None:
    ledger, _ = run([held(gpu(0.0, 1000.0)), held(gpu(1.0, 1100.0), "a")])
    assert energy(ledger) == {(GPU0, ""): 0.0, (GPU0, "a"): 100.0}
    ledger, _ = step(ledger, held(gpu(2.0, 1100.0), "a", "b"))
    assert energy(ledger)[(GPU0, "b")] == 0.0


def test_shares_measured_at_30_and_10_percent_split_energy_3_to_1() -> None:
    """The shares come from attribution itself: the same ones duty_cycle_current shows."""
    device = gpu(0.0, 0.0, processes=(GpuProcess(1, 0), GpuProcess(2, 0)), process_sm_percent={1: 30.0, 2: 10.0})
    allocations = [Allocation("team", pod, "main", "nvidia.com/gpu", GPU0) for pod in ("a", "b")]
    owners = {1: ProcessOwner(1, "uid-a", None), 2: ProcessOwner(2, "uid-b", None)}
    pods = {uid: PodInfo(uid, "team", uid[-1], "Running") for uid in ("uid-a", "uid-b")}
    polls = [
        attribute([replace(device, sampled_at=t, metrics=gpu(t, 400.0 * t).metrics)], allocations, owners, pods)
        for t in (0.0, 1.0, 2.0)
    ]
    ledger, _ = run([p.series for p in polls])
    costs = {c.labels.pod: c for c in ledger.costs()}
    assert costs["a"].energy_joules == 600.0 and costs["b"].energy_joules == 200.0
    assert costs["a"].busy_gpu_seconds == 0.6 and costs["b"].busy_gpu_seconds == 0.2
    assert costs["a"].allocated_gpu_seconds == costs["b"].allocated_gpu_seconds == 1.0  # half a GPU each


def test_idle_pods_and_pods_whose_shares_are_not_measured_share_equally() -> None:
    idle = [held(gpu(t, 100.0 * t, duty_cycle_percent=0.0), "a", "b", duty=0.0, measured=True) for t in (0.0, 2.0)]
    assert energy(run(idle)[0]) == {(GPU0, "a"): 100.0, (GPU0, "b"): 100.0}
    unmeasured = [held(gpu(t, 100.0 * t, duty_cycle_percent=80.0), "a", "b") for t in (0.0, 2.0)]
    ledger, _ = run(unmeasured)
    assert energy(ledger) == {(GPU0, "a"): 100.0, (GPU0, "b"): 100.0}
    assert [c.busy_gpu_seconds for c in ledger.costs()] == [0.8, 0.8]  # the device's 1.6 busy seconds, split


def test_energy_is_conserved_to_the_millijoule_while_pods_come_go_and_share() -> None:
    rng = random.Random(7)
    counter_mj, polls = 5_000_000, []
    for n in range(300):
        if n % 5 == 0:  # the agent reads the counter every few polls and serves the last value between
            counter_mj += rng.randrange(0, 400_000)
        pods = rng.sample(["a", "b", "c", "d"], rng.randrange(0, 4))
        duties = {p: float(rng.randrange(0, 60)) for p in pods}
        device = gpu(n * 1.0 + rng.random() * 0.1, counter_mj / 1000.0)
        polls.append([s for p in pods for s in held(device, p, duty=duties[p], measured=True)] or held(device))
    seen: dict[tuple[str, str], float] = {}
    ledger, paid_mj = Ledger(), 0  # paid: the series' increases, as Prometheus sees them
    for n, series in enumerate(polls):
        ledger, _ = step(ledger, series)
        now = energy(ledger)
        for key, joules in now.items():
            assert joules >= seen.get(key, 0.0)  # a series never decreases; a new one starts at 0
            paid_mj += round((joules - seen.get(key, 0.0)) * 1000)
        seen = now
        if n % 5 == 0:
            assert paid_mj == counter(series) - counter(polls[0])


def counter(series: Sequence[GpuSeries]) -> int:
    return round(series[0].device.metrics[DEVICE_ENERGY][0].value * 1000)


def test_a_pod_that_leaves_is_paid_its_last_share_then_its_series_goes() -> None:
    ledger, _ = run([held(gpu(0.0, 0.0), "a", "b"), held(gpu(1.0, 0.0), "a", "b")])
    ledger, _ = step(ledger, held(gpu(2.0, 0.0), "b"))  # a left; the counter has not moved since
    assert (GPU0, "a") in energy(ledger)
    ledger, _ = step(ledger, held(gpu(3.0, 300.0), "b"))  # the counter moves: a is paid its second
    assert energy(ledger) == {(GPU0, "a"): 50.0, (GPU0, "b"): 250.0}
    ledger, _ = step(ledger, held(gpu(4.0, 300.0), "b"))
    assert set(energy(ledger)) == {(GPU0, "b")}


def test_a_series_waits_for_a_stuck_counter_a_bounded_time() -> None:
    polls = [held(gpu(0.0, 0.0), "a"), held(gpu(1.0, 0.0), "a")]
    polls += [held(gpu(2.0 + n, 0.0), "b") for n in range(LINGER_POLLS + 1)]
    ledger, _ = run(polls)
    assert set(energy(ledger)) == {(GPU0, "b")}
    ledger, _ = step(ledger, held(gpu(20.0, 10.0), "b"))
    assert energy(ledger) == {(GPU0, "b"): 10.0}  # a's share went with it: the increase is still all paid


def test_a_counter_reset_skips_the_interval_and_never_decreases_a_series() -> None:
    ledger, gaps = run([held(gpu(t, e), "a") for t, e in ((0.0, 500.0), (1.0, 600.0), (2.0, 5.0), (3.0, 25.0))])
    assert energy(ledger) == {(GPU0, "a"): 120.0}
    assert gaps == {"agent_start": 1, "counter_reset": 1}


def test_a_missing_reading_skips_the_interval() -> None:
    polls = [held(gpu(0.0, 0.0), "a"), held(gpu(1.0, 10.0), "a"), held(gpu(2.0, None), "a")]
    polls += [held(gpu(3.0, None), "a"), held(gpu(4.0, 70.0), "a"), held(gpu(5.0, 75.0), "a")]
    ledger, gaps = run(polls)
    # 10 J before, 5 J after; the 60 J across the gap are not guessed, nor estimated from the power draw.
    assert energy(ledger) == {(GPU0, "a"): 15.0}
    assert gaps == {"agent_start": 1, "missing_reading": 1}
    ledger, gaps = step(ledger, [])  # the GPU is gone: its series go
    assert ledger.costs() == () and gaps == {"missing_reading": 1}


def test_without_an_energy_counter_power_times_time_stands_in() -> None:
    polls = [held(gpu(t, None, power_milliwatts=250_000.0), "a", "b") for t in (0.0, 1.0, 2.5)]
    assert energy(run(polls)[0]) == {(GPU0, "a"): 312.5, (GPU0, "b"): 312.5}


def test_mig_devices_split_the_gpu_by_gpm_activity_else_by_compute_slices() -> None:
    def poll(t: float, a_active: float | None, b_active: float | None) -> list[GpuSeries]:
        parent = gpu(t, 700.0 * t, duty_cycle_percent=None)
        a, b = mig(MIG_A, 1, "3g.40gb", t, a_active), mig(MIG_B, 2, "1g.10gb", t, b_active)
        return [*held(parent), *held(a, "a"), *held(b)]  # the 1g device is held by no pod

    ledger, _ = run([poll(0.0, 0.6, 0.2), poll(1.0, 0.6, 0.2)])
    assert energy(ledger) == {(MIG_A, "a"): 525.0, (MIG_B, ""): 175.0}  # 3:1 by SM activity; none to the parent
    costs = {c.labels.uuid: c for c in ledger.costs()}
    assert costs[MIG_A].allocated_gpu_seconds == 3 / 7 and costs[MIG_B].allocated_gpu_seconds == 1 / 7
    assert costs[MIG_A].busy_gpu_seconds == 0.6 * 3 / 7
    ledger, _ = run([poll(0.0, None, None), poll(1.0, None, None)])  # no GPM (the profiling group off)
    assert energy(ledger) == {(MIG_A, "a"): 525.0, (MIG_B, ""): 175.0}  # 3:1 by compute slices
    assert all(c.busy_gpu_seconds is None for c in ledger.costs())  # not measured is not 0


def test_a_mig_devices_fraction_is_its_slices_of_its_gpu_models_and_absent_for_an_unknown_model() -> None:
    def allocated(model: str, profile: str) -> float | None:
        polls = [
            [*held(replace(gpu(t, 700.0 * t), model=model)), *held(mig(MIG_A, 1, profile, t), "a")] for t in (0.0, 1.0)
        ]
        return {c.labels.uuid: c for c in run(polls)[0].costs()}[MIG_A].allocated_gpu_seconds

    sevens = ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA H20", "NVIDIA GH200 480GB")
    for model in (*sevens, "NVIDIA B200", "NVIDIA GB200"):
        assert allocated(model, "1g.10gb") == 1 / 7, model
    assert allocated("NVIDIA A30", "1g.6gb") == 1 / 4
    assert allocated("NVIDIA RTX PRO 6000 Blackwell Server Edition", "2g.48gb") == 2 / 4
    # A model whose slice count is not known: no fraction guessed, the series still earns energy.
    assert allocated("NVIDIA Future GPU", "1g.10gb") is None


def test_on_mig_without_gpm_busy_gpu_seconds_are_absent_never_0() -> None:
    polls = [[*held(gpu(t, 700.0 * t)), *held(mig(MIG_A, 1, "3g.40gb", t), "a")] for t in (0.0, 1.0, 2.0)]
    (cost,) = [c for c in run(polls)[0].costs() if c.labels.uuid == MIG_A]
    assert cost.allocated_gpu_seconds == 2 * 3 / 7 and cost.busy_gpu_seconds is None
    assert cost.energy_joules == 1400.0  # the MIG device's energy is still counted
