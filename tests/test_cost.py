"""The cost families end to end: the agent as a process over the fake NVML library with moving energy
counters, the real kubelet gRPC server and the pods API, scraped twice: for every GPU, what its series
of gpu_pod_energy_joules_total gained is what its energy counter gained."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

from exporter.agent import Agent
from exporter.attribution import accounting
from exporter.catalogue import SAMPLED_EVERY, enabled_families, reads_for
from exporter.config import parse_config
from sim.apiserver import pod_json
from sim.kubelet import PodDevices
from sim.procfs import systemd_v2
from sim.scenario import Gpu, Mig, Proc, Scenario, gpu_uuid, mig_uuid
from tests.conftest import BERT, NODE, Node, Samples, find
from tests.test_dra import DraNode

ENERGY, ALLOCATED, BUSY = (
    "gpu_pod_energy_joules_total",
    "gpu_pod_allocated_gpu_seconds_total",
    "gpu_pod_busy_gpu_seconds_total",
)


def draw(scenario: Scenario, milliwatts: int = 300_000) -> None:
    for gpu in scenario.gpus:
        gpu.draw(milliwatts)


def device_counter(samples: Samples, uuid: str) -> float:
    [(_, joules)] = find(samples, "gpu_energy_joules_total", uuid=uuid)
    return joules


def by_pod(samples: Samples, name: str, uuids: Iterable[str]) -> dict[tuple[str, str], float]:
    """(uuid, pod) -> value of ``name`` on these devices."""
    return {(lbl["uuid"], lbl["pod"]): v for uuid in uuids for lbl, v in find(samples, name, uuid=uuid)}


def gained(before: Mapping[tuple[str, str], float], after: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """What each pod's series gained between two scrapes, by pod (one series each here)."""
    assert before.keys() == after.keys(), "a series came or went between the scrapes"
    pods = [pod for _, pod in after]
    assert len(pods) == len(set(pods)), pods
    return {pod: value - before[(uuid, pod)] for (uuid, pod), value in after.items()}


def assert_conserved(first: Samples, second: Samples, gpu: str, devices: Iterable[str]) -> dict[str, float]:
    """The GPU's counter gained what its devices' series gained, and it moved; returns each pod's gain."""
    devices = list(devices)
    increase = device_counter(second, gpu) - device_counter(first, gpu)
    parts = gained(by_pod(first, ENERGY, devices), by_pod(second, ENERGY, devices))
    assert increase > 0
    assert sum(parts.values()) == pytest.approx(increase, abs=1e-6), (gpu, parts)
    return parts


def counters_moved(first: Samples, uuids: Iterable[str]):  # type: ignore[no-untyped-def]
    return lambda s: all(device_counter(s, u) > device_counter(first, u) for u in uuids)


def test_energy_and_time_per_pod_on_whole_and_time_sliced_gpus(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    """GPU 0 held by one pod, GPU 1 time-sliced by two pods at 30 % and 10 % SM, GPU 2 held by none."""
    uid_a, uid_b = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
    for uid, name, pid in ((uid_a, "shared-a", 5001), (uid_b, "shared-b", 5002)):
        node.api.apply(pod_json(uid, "ml", name, NODE, containers={"main": f"{pid:064x}"}))
        node.proc.add(pid, systemd_v2(uid, f"{pid:064x}"))
    node.scenario.gpus[1].util = 40
    node.scenario.gpus.append(type(node.scenario.gpus[0])(gpu_uuid(2), util=0))
    node.scenario.procs += [Proc(gpu=1, pid=5001, sm=30), Proc(gpu=1, pid=5002, sm=10)]
    draw(node.scenario)
    node.scenario.write(node.scenario_path)
    replicas = [("shared-a", "::0"), ("shared-b", "::1")]
    node.kubelet.set_pods(
        [
            PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            *(PodDevices("ml", pod, {"main": [("nvidia.com/gpu.shared", [gpu_uuid(1) + r])]}) for pod, r in replicas),
        ]
    )
    agent = start_agent(node.args(), node.scenario_path)
    shares = {"shared-a": 30.0, "shared-b": 10.0}
    uuids = [gpu_uuid(n) for n in range(3)]
    expected = {(uuids[0], BERT), (uuids[1], "shared-a"), (uuids[1], "shared-b"), (uuids[2], "")}
    first = agent.wait_for(
        lambda s: (
            {lbl["pod"]: v for lbl, v in find(s, "duty_cycle_current", uuid=gpu_uuid(1))} == shares
            and set(by_pod(s, ENERGY, uuids)) == expected
        ),
        what="measured shares and the cost series",
    )
    second = agent.wait_for(counters_moved(first, uuids), what="the energy counters to move")
    assert assert_conserved(first, second, gpu_uuid(0), [gpu_uuid(0)]).keys() == {BERT}
    assert assert_conserved(first, second, gpu_uuid(2), [gpu_uuid(2)]).keys() == {""}  # held by none
    parts = assert_conserved(first, second, gpu_uuid(1), [gpu_uuid(1)])
    assert parts["shared-a"] / parts["shared-b"] == pytest.approx(3.0, rel=0.01)
    [(labels, _)] = find(second, ENERGY, pod="shared-a")
    assert labels == {
        "node": NODE,
        "gpu": "1",
        "uuid": gpu_uuid(1),
        "model": "NVIDIA H100 80GB HBM3",
        "namespace": "ml",
        "pod": "shared-a",
        "container": "main",
    }
    allocated = gained(by_pod(first, ALLOCATED, uuids), by_pod(second, ALLOCATED, uuids))
    busy = gained(by_pod(first, BUSY, uuids), by_pod(second, BUSY, uuids))
    assert allocated["shared-a"] == pytest.approx(allocated[BERT] / 2, rel=0.01)  # half a GPU each, over the same time
    assert busy["shared-a"] == pytest.approx(allocated[BERT] * 0.30, rel=0.05)
    assert busy[BERT] == pytest.approx(allocated[BERT] * 0.42, rel=0.05)  # GPU 0 at 42 %
    assert find(second, "gpu_exporter_accounting_gaps_total") == [({"reason": "agent_start"}, 3)]

    # The driver's counter starts again from 0: the interval is skipped, no series goes down.
    node.scenario.gpus[0].reset_energy()
    node.scenario.write(node.scenario_path)
    third = agent.wait_for(
        lambda s: bool(find(s, "gpu_exporter_accounting_gaps_total", reason="counter_reset")), what="the reset"
    )
    fourth = agent.wait_for(counters_moved(third, [gpu_uuid(0)]), what="the counter to move on")
    assert find(fourth, ENERGY, pod=BERT)[0][1] >= find(second, ENERGY, pod=BERT)[0][1]
    assert_conserved(third, fourth, gpu_uuid(0), [gpu_uuid(0)])


@pytest.fixture
def dra_node(tmp_path: Path) -> Iterator[DraNode]:
    node = DraNode(tmp_path)
    yield node
    node.stop()


def test_dra_claims_and_mig_devices(dra_node: DraNode, start_agent) -> None:  # type: ignore[no-untyped-def]
    """GPU 2 shared through one DRA claim at 45 % and 15 % SM; GPU 1 in MIG mode, its 1g device held
    through DRA at 30 % GPM SM activity, a 3g device held by no pod at 10 %."""
    scenario = dra_node.scenario
    scenario.migs[0].sm_active = 30.0
    scenario.migs.append(Mig(parent=1, uuid=mig_uuid(1), gi=2, name="NVIDIA H100 MIG 3g.40gb", sm_active=10.0))
    draw(scenario)
    scenario.write(dra_node.scenario_path)
    agent = start_agent(dra_node.args(), dra_node.scenario_path)
    migs = [mig_uuid(0), mig_uuid(1)]
    first = agent.wait_for(
        lambda s: (
            {lbl["pod"]: v for lbl, v in find(s, "duty_cycle_current", uuid=gpu_uuid(2))}
            == {"share-a": 45, "share-b": 15}
            and len(find(s, "gpu_sm_active_ratio", uuid=mig_uuid(1))) == 1
            and set(by_pod(s, ENERGY, migs)) == {(mig_uuid(0), "mig-user"), (mig_uuid(1), "")}
        ),
        what="measured shares, GPM on the MIG devices and the cost series",
    )
    second = agent.wait_for(counters_moved(first, [gpu_uuid(1), gpu_uuid(2)]), what="the energy counters to move")
    shared = assert_conserved(first, second, gpu_uuid(2), [gpu_uuid(2)])
    assert shared["share-a"] / shared["share-b"] == pytest.approx(3.0, rel=0.01)
    on_mig = assert_conserved(first, second, gpu_uuid(1), migs)
    assert on_mig["mig-user"] / on_mig[""] == pytest.approx(3.0, rel=0.01)  # by GPM activity, 30 % to 10 %
    assert not find(second, ENERGY, uuid=gpu_uuid(1))  # the GPU's energy is all its MIG devices'
    allocated = gained(by_pod(first, ALLOCATED, migs), by_pod(second, ALLOCATED, migs))
    assert allocated["mig-user"] / allocated[""] == pytest.approx(1 / 3)  # 1 of 7 compute slices, and 3 of 7


def test_the_cost_group_turns_power_on_and_reads_nothing_of_its_own() -> None:
    groups = parse_config(["--metrics", "cost"], environ={}).metric_groups
    assert groups == {"seed", "power", "cost"}
    for mig in (False, True):  # the NVML reader reads what the enabled families need, and no more
        assert reads_for(enabled_families(groups), mig) == reads_for(enabled_families({"seed", "power"}), mig)


@pytest.mark.parametrize("part", ["step", "counter_readings"])
def test_a_fault_in_accounting_restarts_the_cost_families_not_the_poll(
    part: str, scenario_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), energy_rate=300_000, energy_since=time.time())]).write(scenario_file)
    args = ["--no-kubernetes", "--pod-resources-socket", str(tmp_path / "none.sock"), "--proc-root", str(tmp_path)]
    agent = Agent(parse_config(args, environ={}))
    try:
        assert agent.poll_once().costs
        working = getattr(accounting, part)

        def broken(*args: object) -> None:
            raise ValueError("a bug")

        monkeypatch.setattr(accounting, part, broken)
        with caplog.at_level(logging.WARNING):  # the ledger takes polls at least every SAMPLED_EVERY
            snapshots = [agent.poll_once() for _ in range(SAMPLED_EVERY)]
        assert all(s.attribution.series for s in snapshots)  # the poll goes on
        assert snapshots[-1].costs == ()  # the totals start again
        assert [r.getMessage() for r in caplog.records if "cost accounting" in r.getMessage()] == [
            "cost accounting failing (ValueError: a bug); the cost families start again from 0"
        ]
        monkeypatch.setattr(accounting, part, working)
        assert [agent.poll_once() for _ in range(SAMPLED_EVERY)][-1].costs
    finally:
        agent.stop()
