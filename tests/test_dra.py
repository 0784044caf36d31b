"""GPUs handed to pods by Dynamic Resource Allocation: pod-resources ``dynamic_resources`` from a real
gRPC server, this node's ResourceSlices from the API stand-in (``v1`` and ``v1beta1`` shapes), the fake
NVML library, and the agent run as a process and scraped."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.attribution.attribute import attribute
from exporter.backoff import Backoff
from exporter.model import ClaimAllocation, DeviceReading, GpuProcess, PodInfo, ProcessOwner
from exporter.sources.resourceslices import SliceRecord, SliceWatcher, device_uuids, slice_record
from sim.apiserver import FakeApiServer, pod_json, resource_slice_json
from sim.kubelet import Claim, ClaimDevice, FakeKubelet, PodDevices
from sim.procfs import FakeProc, systemd_v2
from sim.scenario import Gpu, Mig, Proc, Scenario, gpu_uuid, mig_uuid
from tests.conftest import NODE, Node, Samples, find

DRIVER = "gpu.nvidia.com"
POOL = NODE  # NVIDIA's driver names the pool after the node


def claim(namespace: str, name: str, *devices: str, driver: str = DRIVER, pool: str = POOL) -> Claim:
    return Claim(namespace, name, tuple(ClaimDevice(driver, pool, d) for d in devices))


def uuid_slice(name: str, node: str, devices: dict[str, dict[str, Any]], pool: str | None = None) -> dict[str, Any]:
    return resource_slice_json(name, node, DRIVER, pool or node, devices)


# --- the pure parts: slices and attribution ---


def test_a_slice_reads_the_same_in_v1_and_v1beta1() -> None:
    v1 = resource_slice_json(
        "s", NODE, DRIVER, POOL, {"gpu-0": {"uuid": gpu_uuid(0), "type": "gpu"}, "gpu-1": {"type": "gpu"}}
    )
    v1beta1 = dict(v1, spec=dict(v1["spec"], devices=[{"name": d["name"], "basic": d} for d in v1["spec"]["devices"]]))
    assert slice_record(v1) == slice_record(v1beta1) == SliceRecord(DRIVER, POOL, 1, (("gpu-0", gpu_uuid(0)),))
    qualified = resource_slice_json("q", NODE, DRIVER, POOL, {"gpu-2": {f"{DRIVER}/uuid": gpu_uuid(2)}})
    assert slice_record(qualified).uuids == (("gpu-2", gpu_uuid(2)),)
    not_a_uuid = resource_slice_json("n", NODE, DRIVER, POOL, {"gpu-3": {"uuid": 7}})
    assert slice_record(not_a_uuid).uuids == ()


def test_the_newest_pool_generation_wins() -> None:
    old = SliceRecord(DRIVER, POOL, 1, (("gpu-0", gpu_uuid(9)),))
    new = SliceRecord(DRIVER, POOL, 2, (("gpu-0", gpu_uuid(0)),))
    other = SliceRecord("other.example.com", POOL, 1, (("gpu-0", gpu_uuid(5)),))
    assert device_uuids([old, new, other]) == {
        (DRIVER, POOL, "gpu-0"): gpu_uuid(0),
        ("other.example.com", POOL, "gpu-0"): gpu_uuid(5),
    }


def gpu(uuid: str, minor: int, **kwargs: Any) -> DeviceReading:
    return DeviceReading(index=minor, uuid=uuid, model="H100", sampled_at=0.0, minor_number=minor, **kwargs)


def dra(pod: str, device: str, driver: str = DRIVER, container: str = "main") -> ClaimAllocation:
    return ClaimAllocation("ns", pod, container, driver, device, claim_namespace="ns", claim=f"{pod}-gpu", pool=POOL)


def test_resolution_is_by_uuid_and_never_by_a_guessed_name() -> None:
    # The slice calls minor 3's GPU "gpu-0": the uuid decides, not the name.
    devices = [gpu(gpu_uuid(0), 3, duty_cycle_percent=10.0), gpu(gpu_uuid(1), 0, duty_cycle_percent=20.0)]
    slices = {(DRIVER, POOL, "gpu-0"): gpu_uuid(0), (DRIVER, POOL, "gpu-7"): gpu_uuid(7)}
    claims = [dra("a", "gpu-0"), dra("b", "gpu-7"), dra("c", "gpu-1"), dra("d", "nic-0", driver="nic.example.com")]
    result = attribute(devices, claims, {}, None, slices)
    assert {s.device.uuid: s.pod for s in result.series} == {gpu_uuid(0): "a", gpu_uuid(1): ""}
    assert result.unknown_device_ids == {DRIVER: 2}  # gpu-7 (another node's GPU) and gpu-1 (not in slices)
    assert [(r.allocation.pod, r.uuid) for r in result.dra_allocations] == [("a", gpu_uuid(0))]


def test_the_minor_number_is_read_only_while_slices_cannot_be() -> None:
    devices = [gpu(gpu_uuid(0), 0), gpu(gpu_uuid(1), 1)]
    claims = [dra("a", "gpu-1"), dra("b", "gpu-0-mig-1g.10gb-19-0"), dra("c", "nic-0", driver="nic.example.com")]
    result = attribute(devices, claims, {}, None, None)
    assert {s.device.uuid: s.pod for s in result.series} == {gpu_uuid(0): "", gpu_uuid(1): "a"}
    assert result.unknown_device_ids == {DRIVER: 1}  # a MIG name is never parsed


def test_dra_shares_follow_the_replica_rules() -> None:
    shared = gpu(
        gpu_uuid(0),
        0,
        duty_cycle_percent=60.0,
        processes=(GpuProcess(1, 100), GpuProcess(2, 300)),
        process_sm_percent={1: 45.0, 2: 15.0},
    )
    owners = {1: ProcessOwner(1, "uid-a", "c-a"), 2: ProcessOwner(2, "uid-b", "c-b")}
    pods = {
        "uid-a": PodInfo("uid-a", "ns", "a", "Running", {"c-a": "main"}),
        "uid-b": PodInfo("uid-b", "ns", "b", "Running", {"c-b": "main"}),
    }
    slices = {(DRIVER, POOL, "gpu-0"): gpu_uuid(0)}
    result = attribute([shared], [dra("a", "gpu-0"), dra("b", "gpu-0")], owners, pods, slices)
    assert {s.pod: (s.duty_cycle_percent, s.memory_used_bytes) for s in result.series} == {
        "a": (45.0, 100),
        "b": (15.0, 300),
    }
    assert result.sharing_pods == {gpu_uuid(0): 2}
    # No process listed (MPS clients): every sharing pod gets the device's values, never 0.
    hidden = gpu(gpu_uuid(0), 0, duty_cycle_percent=60.0, processes=(), process_sm_percent={})
    result = attribute([hidden], [dra("a", "gpu-0"), dra("b", "gpu-0")], {}, pods, slices)
    assert {s.pod: s.duty_cycle_percent for s in result.series} == {"a": 60.0, "b": 60.0}


# --- the ResourceSlice watch against the API stand-in ---


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    yield server
    server.stop()


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("served", [("v1", "v1beta1"), ("v1beta2", "v1beta1"), ("v1beta1",)])
def test_the_slice_watch_reads_the_newest_version_served_for_this_node_only(
    api: FakeApiServer, tmp_path: Path, served: tuple[str, ...]
) -> None:
    api.resource_versions = served
    api.apply(uuid_slice("mine", NODE, {"gpu-0": {"uuid": gpu_uuid(0)}}))
    api.apply(uuid_slice("theirs", "other-node", {"gpu-0": {"uuid": gpu_uuid(5)}}))
    watcher = SliceWatcher(NODE, str(api.write_kubeconfig(tmp_path / "kubeconfig")), backoff=Backoff(0.05, 0.2))
    try:
        assert watcher.devices([]) is None
        time.sleep(0.3)
        assert api.calls == []  # no DRA claim yet: the API is not asked
        assert watcher.devices([dra("a", "gpu-0")]) is None  # starts the watch; nothing read yet
        eventually(lambda: watcher.devices([]) is not None)
        assert watcher.devices([]) == {(DRIVER, NODE, "gpu-0"): gpu_uuid(0)}
        lists = api.list_calls("resourceslices")
        assert lists[0].path == f"/apis/resource.k8s.io/{served[0]}/resourceslices"
        assert lists[0].param("fieldSelector") == f"spec.nodeName={NODE}"
        api.apply(uuid_slice("mine-2", NODE, {"gpu-1": {"uuid": gpu_uuid(1)}}))
        eventually(lambda: (DRIVER, NODE, "gpu-1") in (watcher.devices([]) or {}))
    finally:
        watcher.stop()
        watcher.join(5)


def test_forbidden_slices_stay_unread_until_rbac_allows_them(api: FakeApiServer, tmp_path: Path) -> None:
    api.forbidden = {"resourceslices"}
    api.apply(uuid_slice("mine", NODE, {"gpu-0": {"uuid": gpu_uuid(0)}}))
    watcher = SliceWatcher(NODE, str(api.write_kubeconfig(tmp_path / "kubeconfig")), backoff=Backoff(0.05, 0.2))
    try:
        watcher.devices([dra("a", "gpu-0")])
        eventually(lambda: len(api.list_calls("resourceslices")) >= 3)  # retried, backing off
        assert watcher.devices([]) is None and not watcher.reflector.up
        api.forbidden = set()
        eventually(lambda: watcher.devices([]) == {(DRIVER, NODE, "gpu-0"): gpu_uuid(0)})
    finally:
        watcher.stop()
        watcher.join(5)


# --- the agent on a node with DRA and the device plugin ---


class DraNode(Node):  # Node's args() and stop(), its own devices
    """GPU 0 held by an idle DRA pod; GPU 1 in MIG mode, its MIG device held through DRA; GPU 2
    shared by two DRA pods through one claim, each running a process; GPU 3 held through the
    device plugin. A claim names a device no slice lists, another one is another driver's."""

    def __init__(self, tmp_path: Path) -> None:
        self.scenario_path = tmp_path / "scenario.txt"
        self.scenario = Scenario(
            gpus=[
                # Minor numbers that are not the driver's device names: only the uuid can tie them.
                Gpu(gpu_uuid(0), minor=4, util=37),
                Gpu(gpu_uuid(1), name="NVIDIA H100 80GB HBM3", minor=5, mig=True),
                Gpu(gpu_uuid(2), minor=6, util=60),
                Gpu(gpu_uuid(3), minor=7, util=20),
            ],
            migs=[Mig(parent=1, uuid=mig_uuid(0), gi=1, name="NVIDIA H100 MIG 1g.10gb", used=2 * 1024**3)],
            procs=[Proc(gpu=2, pid=5001, mem=1000, sm=45), Proc(gpu=2, pid=5002, mem=3000, sm=15)],
        )
        self.scenario.write(self.scenario_path)
        self.kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
        shared = claim("ml", "shared-gpu", "gpu-2")
        self.kubelet.set_pods(
            [
                PodDevices("ml", "llm-idle", claims={"server": [claim("ml", "llm-idle-gpu", "gpu-0")]}),
                PodDevices("ml", "mig-user", claims={"main": [claim("ml", "mig-claim", "gpu-1-mig-1g10gb-19-0")]}),
                PodDevices("ml", "share-a", claims={"main": [shared]}),
                PodDevices("ml", "share-b", claims={"main": [shared]}),
                PodDevices("ml", "plugin-pod", {"main": [("nvidia.com/gpu", [gpu_uuid(3)])]}),
                PodDevices("ml", "lost", claims={"main": [claim("ml", "lost-gpu", "gpu-9")]}),
                PodDevices("ml", "with-nic", claims={"main": [claim("ml", "nic", "nic-0", driver="nic.example.com")]}),
            ]
        )
        self.proc = FakeProc(tmp_path / "proc")
        self.api = FakeApiServer().start()
        pods = {
            5001: ("aaaaaaaa-0000-4000-8000-000000000001", "share-a"),
            5002: ("bbbbbbbb-0000-4000-8000-000000000002", "share-b"),
        }
        for pid, (uid, name) in pods.items():
            self.proc.add(pid, systemd_v2(uid, f"{pid:064x}"))
            self.api.apply(pod_json(uid, "ml", name, NODE, containers={"main": f"{pid:064x}"}))
        self.api.apply(
            uuid_slice(
                f"{NODE}-gpu.nvidia.com-abcde",
                NODE,
                {
                    "gpu-0": {"type": "gpu", "uuid": gpu_uuid(0), "productName": "NVIDIA H100 80GB HBM3"},
                    "gpu-1-mig-1g10gb-19-0": {
                        "type": "mig",
                        "uuid": mig_uuid(0),
                        "parentUUID": gpu_uuid(1),
                        "profile": "1g.10gb",
                    },
                    "gpu-2": {"type": "gpu", "uuid": gpu_uuid(2)},
                    "gpu-3": {"type": "gpu", "uuid": gpu_uuid(3)},
                },
            )
        )
        # Another node's slice, with its own pool: the field selector keeps it out.
        self.api.apply(uuid_slice("other-node-slice", "other-node", {"gpu-9": {"uuid": gpu_uuid(3)}}, pool=NODE))
        self.kubeconfig = self.api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def dra_node(tmp_path: Path) -> Iterator[DraNode]:
    node = DraNode(tmp_path)
    yield node
    node.stop()


def pods_on(samples: Samples, uuid: str) -> dict[str, float]:
    return {labels["pod"]: value for labels, value in find(samples, "duty_cycle_current", uuid=uuid)}


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_dra_gpus_are_labelled_with_their_pods(dra_node: DraNode, start_agent, version: str) -> None:  # type: ignore[no-untyped-def]
    dra_node.api.resource_versions = (version,)
    agent = start_agent(dra_node.args(), dra_node.scenario_path)
    samples = agent.wait_for(
        # Shares once the processes' cgroups are read (until then the device's value, never 0).
        lambda s: (
            pods_on(s, gpu_uuid(0)) == {"llm-idle": 37} and pods_on(s, gpu_uuid(2)) == {"share-a": 45, "share-b": 15}
        ),
        what="the DRA pods' series",
    )
    # An idle DRA pod, no process on its GPU: labelled all the same.
    [(labels, _)] = find(samples, "duty_cycle_current", uuid=gpu_uuid(0))
    assert (labels["namespace"], labels["pod"], labels["container"]) == ("ml", "llm-idle", "server")
    # A MIG device through DRA: the MIG device's series carry the pod.
    assert [lbl["pod"] for lbl, _ in find(samples, "memory_used_bytes_current", uuid=mig_uuid(0))] == ["mig-user"]
    # Two pods sharing GPU 2 through one claim: each its own processes' share, as with replicas.
    assert pods_on(samples, gpu_uuid(2)) == {"share-a": 45, "share-b": 15}
    assert find(samples, "gpu_exporter_gpu_sharing_pods", uuid=gpu_uuid(2))[0][1] == 2
    # The device plugin's pod on the same node.
    assert pods_on(samples, gpu_uuid(3)) == {"plugin-pod": 20}
    # A device no slice of this node lists: counted under its driver, not guessed; a NIC claim is none of ours.
    assert find(samples, "gpu_exporter_unknown_device_ids") == [({"resource": DRIVER}, 1)]
    info = {
        (lbl["pod"], lbl["claim"], lbl["device"], lbl["uuid"])
        for lbl, value in find(samples, "gpu_dra_allocation_info")
        if value == 1
    }
    assert info == {
        ("llm-idle", "llm-idle-gpu", "gpu-0", gpu_uuid(0)),
        ("mig-user", "mig-claim", "gpu-1-mig-1g10gb-19-0", mig_uuid(0)),
        ("share-a", "shared-gpu", "gpu-2", gpu_uuid(2)),
        ("share-b", "shared-gpu", "gpu-2", gpu_uuid(2)),
    }
    [(labels, _)] = find(samples, "gpu_dra_allocation_info", pod="llm-idle")
    assert labels == {
        "node": NODE,
        "namespace": "ml",
        "pod": "llm-idle",
        "container": "server",
        "claim_namespace": "ml",
        "claim": "llm-idle-gpu",
        "driver": DRIVER,
        "pool": POOL,
        "device": "gpu-0",
        "uuid": gpu_uuid(0),
    }
    assert dra_node.api.list_calls("resourceslices")[0].path.endswith(f"/{version}/resourceslices")


def test_unreadable_slices_fall_back_to_minor_numbers_until_rbac_allows_them(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    start_agent,
) -> None:
    scenario_path = tmp_path / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=11), Gpu(gpu_uuid(1), util=22)]).write(scenario_path)
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.set_pods([PodDevices("ml", "llm", claims={"server": [claim("ml", "llm-gpu", "gpu-1")]})])
    api = FakeApiServer().start()
    api.forbidden = {"resourceslices"}
    # Once readable, the slice says "gpu-1" is GPU 0: from then on the uuid decides.
    api.apply(uuid_slice("s", NODE, {"gpu-1": {"uuid": gpu_uuid(0)}}))
    try:
        args = ["--node-name", NODE, "--interval", "0.2", "--pod-resources-socket", kubelet.socket_path]
        agent = start_agent(
            [*args, "--proc-root", str(tmp_path), "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kc"))],
            scenario_path,
        )
        agent.wait_for(lambda s: pods_on(s, gpu_uuid(1)) == {"llm": 22}, what="the minor-number fallback")
        assert "HTTP 403" in agent.log()
        api.forbidden = set()
        samples = agent.wait_for(
            lambda s: pods_on(s, gpu_uuid(0)) == {"llm": 11} and pods_on(s, gpu_uuid(1)) == {"": 22},
            timeout_s=15,
            what="the slices' uuid",
        )
        assert find(samples, "gpu_exporter_unknown_device_ids") == []
    finally:
        kubelet.stop()
        api.stop()
