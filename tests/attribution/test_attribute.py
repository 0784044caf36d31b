"""Attribution rules, on plain data: who uses each device, and each pod's share."""

from typing import Any

from exporter.attribution.attribute import attribute
from exporter.model import Allocation, DeviceReading, GpuProcess, GpuSeries, PodInfo, ProcessOwner

GPU0 = "GPU-00000000-1111-2222-3333-444455556666"
GPU1 = "GPU-00000001-1111-2222-3333-444455556666"
MIG0 = "MIG-00000000-aaaa-bbbb-cccc-ddddeeeeffff"


def gpu(uuid: str = GPU0, index: int = 0, **kwargs) -> DeviceReading:  # type: ignore[no-untyped-def]
    values: dict[str, Any] = dict(
        duty_cycle_percent=60.0,
        memory_used_bytes=1000,
        memory_total_bytes=8000,
        temperature_celsius=50.0,
        power_milliwatts=200_000.0,
        processes=(),
        process_sm_percent={},
    )
    values.update(kwargs)
    return DeviceReading(index=index, uuid=uuid, model="NVIDIA H100", sampled_at=0.0, minor_number=index, **values)


def alloc(
    pod: str, device_id: str, container: str = "main", resource: str = "nvidia.com/gpu", namespace: str = "default"
) -> Allocation:
    return Allocation(namespace=namespace, pod=pod, container=container, resource_name=resource, device_id=device_id)


def pod(uid: str, name: str, phase: str = "Running", containers: dict[str, str] | None = None) -> PodInfo:
    return PodInfo(uid=uid, namespace="default", name=name, phase=phase, container_names=containers or {})


def rows(result, uuid: str = GPU0) -> dict[str, GpuSeries]:  # type: ignore[no-untyped-def]
    return {s.pod: s for s in result.series if s.device.uuid == uuid}


def test_unallocated_gpu_keeps_its_series_without_pod_labels() -> None:
    result = attribute([gpu()], [], {}, {})
    (series,) = result.series
    assert (series.namespace, series.pod, series.container) == ("", "", "")
    assert series.duty_cycle_percent == 60.0 and series.memory_used_bytes == 1000
    assert result.sharing_pods == {}


def test_exclusive_gpu_reports_device_values_for_its_pod() -> None:
    result = attribute([gpu()], [alloc("bert-0", GPU0, container="server")], {}, None)
    series = rows(result)["bert-0"]
    assert (series.namespace, series.container) == ("default", "server")
    assert series.duty_cycle_percent == 60.0 and series.memory_used_bytes == 1000
    assert result.sharing_pods == {GPU0: 1}


def test_pod_with_two_gpus_gets_a_series_per_gpu() -> None:
    result = attribute(
        [gpu(GPU0, 0), gpu(GPU1, 1, duty_cycle_percent=10.0)], [alloc("big", GPU0), alloc("big", GPU1)], {}, None
    )
    assert [(s.device.uuid, s.pod, s.duty_cycle_percent) for s in result.series] == [
        (GPU0, "big", 60.0),
        (GPU1, "big", 10.0),
    ]


def test_time_sliced_replicas_report_each_pods_own_share() -> None:
    device = gpu(
        duty_cycle_percent=70.0,
        memory_used_bytes=5000,
        processes=(GpuProcess(101, 3000), GpuProcess(102, 1500), GpuProcess(103, 500)),
        process_sm_percent={101: 45.0, 102: 20.0},  # 103 had no sample: idle
    )
    owners = {
        101: ProcessOwner(101, "uid-a", "c-a"),
        102: ProcessOwner(102, "uid-b", "c-b"),
        103: ProcessOwner(103, "uid-b", "c-b"),
    }
    pods = {
        "uid-a": pod("uid-a", "a", containers={"c-a": "main"}),
        "uid-b": pod("uid-b", "b", containers={"c-b": "main"}),
        "uid-c": pod("uid-c", "c"),
    }
    result = attribute(
        [device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1"), alloc("c", f"{GPU0}::2")], owners, pods
    )
    by_pod = rows(result)
    assert by_pod["a"].duty_cycle_percent == 45.0 and by_pod["a"].memory_used_bytes == 3000
    assert by_pod["b"].duty_cycle_percent == 20.0 and by_pod["b"].memory_used_bytes == 2000
    # c holds a replica but runs nothing on the GPU: a measured zero, not a missing value.
    assert by_pod["c"].duty_cycle_percent == 0.0 and by_pod["c"].memory_used_bytes == 0
    assert result.sharing_pods == {GPU0: 3}
    assert result.processes_by_owner == {"pod": 3}


def test_shared_gpu_without_the_api_gives_every_pod_the_device_values() -> None:
    device = gpu(processes=(GpuProcess(101, 3000),), process_sm_percent={101: 45.0})
    result = attribute(
        [device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], {101: ProcessOwner(101, "uid-a", None)}, None
    )
    assert [(s.pod, s.duty_cycle_percent, s.memory_used_bytes) for s in result.series] == [
        ("a", 60.0, 1000),
        ("b", 60.0, 1000),
    ]
    assert result.sharing_pods == {GPU0: 2}


def test_shared_gpu_without_per_process_utilisation_falls_back_for_duty_cycle_only() -> None:
    device = gpu(processes=(GpuProcess(101, 300), GpuProcess(102, 100)), process_sm_percent=None)
    owners = {101: ProcessOwner(101, "uid-a", None), 102: ProcessOwner(102, "uid-b", None)}
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b")}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, pods)
    assert [(s.pod, s.duty_cycle_percent, s.memory_used_bytes) for s in result.series] == [
        ("a", 60.0, 300),
        ("b", 60.0, 100),
    ]


def test_a_process_of_a_pod_not_yet_in_the_watch_makes_shares_unmeasurable() -> None:
    device = gpu(processes=(GpuProcess(101, 300), GpuProcess(102, 100)), process_sm_percent={101: 30.0, 102: 25.0})
    owners = {101: ProcessOwner(101, "uid-a", None), 102: ProcessOwner(102, "uid-new", None)}
    result = attribute(
        [device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, {"uid-a": pod("uid-a", "a")}
    )
    # b's process is unknown to us: reporting b as 0 would be a lie, so both get device values.
    assert {s.pod: s.duty_cycle_percent for s in result.series} == {"a": 60.0, "b": 60.0}
    assert result.processes_by_owner == {"pod": 1, "unknown_pod": 1}


def test_processes_alone_attribute_a_gpu_the_kubelet_did_not_allocate() -> None:
    device = gpu(processes=(GpuProcess(101, 300),), process_sm_percent={101: 30.0})
    owners = {101: ProcessOwner(101, "uid-a", "cid-1")}
    result = attribute([device], [], owners, {"uid-a": pod("uid-a", "a", containers={"cid-1": "trainer"})})
    (series,) = result.series
    assert (series.pod, series.container, series.duty_cycle_percent) == ("a", "trainer", 60.0)


def test_finished_pods_are_not_attributed_even_if_the_kubelet_lists_them() -> None:
    pods = {"uid-a": pod("uid-a", "done", phase="Succeeded"), "uid-b": pod("uid-b", "failed", phase="Failed")}
    result = attribute([gpu()], [alloc("done", GPU0), alloc("failed", GPU0)], {}, pods)
    assert [s.pod for s in result.series] == [""]


def test_host_and_exited_processes_are_counted_not_attributed() -> None:
    device = gpu(processes=(GpuProcess(1, 10), GpuProcess(2, 10)))
    result = attribute([device], [], {1: ProcessOwner(1, None, None), 2: None}, {})
    assert [s.pod for s in result.series] == [""]
    assert result.processes_by_owner == {"host": 1, "exited": 1}


def test_unknown_ids_and_other_resources() -> None:
    allocations = [
        alloc("a", "GPU-ffffffff-1111-2222-3333-444455556666"),  # a GPU on another node
        alloc("a", "weird-id"),
        alloc("", GPU0),  # empty pod name
        alloc("a", "0", resource="example.com/fpga"),  # not a GPU resource: ignored, not counted
        alloc("b", GPU0, resource="nvidia.com/gpu.shared"),
    ]
    result = attribute([gpu()], allocations, {}, None)
    assert result.unknown_device_ids == {"nvidia.com/gpu": 3}
    assert [s.pod for s in result.series] == ["b"]


def test_mig_devices_by_uuid_gke_id_and_legacy_id() -> None:
    parent = gpu(GPU0, 0, duty_cycle_percent=None, process_sm_percent=None)
    migs = [
        DeviceReading(
            index=0,
            uuid=f"MIG-{i:08x}-aaaa-bbbb-cccc-ddddeeeeffff",
            model="MIG 1g.10gb",
            sampled_at=0.0,
            parent_uuid=GPU0,
            gpu_instance_id=gi,
            memory_used_bytes=100 * gi,
            memory_total_bytes=10_000,
            processes=(),
        )
        for i, gi in enumerate((1, 2, 3))
    ]
    allocations = [
        alloc("by-uuid", migs[0].uuid, resource="nvidia.com/mig-1g.10gb"),
        alloc("by-gke", "nvidia0/gi2", resource="nvidia.com/gpu"),
        alloc("by-legacy", f"MIG-{GPU0}/3/0", resource="nvidia.com/mig-1g.10gb"),
    ]
    result = attribute([parent, *migs], allocations, {}, None)
    by_pod = {s.pod: s for s in result.series}
    assert by_pod["by-uuid"].device.uuid == migs[0].uuid
    assert by_pod["by-gke"].device.uuid == migs[1].uuid
    assert by_pod["by-legacy"].device.uuid == migs[2].uuid
    assert by_pod["by-legacy"].memory_used_bytes == 300
    assert all(s.duty_cycle_percent is None for s in result.series)  # MIG: not measured, not 0
    assert by_pod[""].device.uuid == GPU0  # the parent keeps its own series


def test_summed_duty_cycle_is_capped_at_100() -> None:
    device = gpu(
        duty_cycle_percent=100.0,
        processes=(GpuProcess(1, 1), GpuProcess(2, 1), GpuProcess(3, 1)),
        process_sm_percent={1: 70.0, 2: 60.0, 3: 10.0},
    )
    owners = {1: ProcessOwner(1, "a", None), 2: ProcessOwner(2, "a", None), 3: ProcessOwner(3, "b", None)}
    result = attribute([device], [], owners, {"a": pod("a", "a"), "b": pod("b", "b")})
    assert {s.pod: s.duty_cycle_percent for s in result.series} == {"a": 100.0, "b": 10.0}


def test_busy_shared_gpu_with_no_process_listed_gives_every_pod_the_device_values() -> None:
    # MPS clients are listed as the MPS server, or processes are hidden: NVML lists nothing.
    device = gpu(duty_cycle_percent=50.0, memory_used_bytes=4000, processes=(), process_sm_percent={})
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b")}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], {}, pods)
    assert {s.pod: (s.duty_cycle_percent, s.memory_used_bytes) for s in result.series} == {
        "a": (50.0, 4000),
        "b": (50.0, 4000),
    }
    assert result.sharing_pods == {GPU0: 2}


def test_a_host_process_on_a_shared_gpu_makes_shares_unmeasurable() -> None:
    # The MPS control daemon runs on the host: the pods' work shows as its process.
    device = gpu(duty_cycle_percent=50.0, processes=(GpuProcess(1, 900),), process_sm_percent={1: 50.0})
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b")}
    owners = {1: ProcessOwner(1, None, None)}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, pods)
    assert {s.pod: s.duty_cycle_percent for s in result.series} == {"a": 50.0, "b": 50.0}


def test_busy_shared_gpu_whose_processes_have_no_samples_keeps_the_device_duty_cycle() -> None:
    device = gpu(duty_cycle_percent=50.0, processes=(GpuProcess(101, 300), GpuProcess(102, 100)), process_sm_percent={})
    owners = {101: ProcessOwner(101, "uid-a", None), 102: ProcessOwner(102, "uid-b", None)}
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b")}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, pods)
    assert {s.pod: (s.duty_cycle_percent, s.memory_used_bytes) for s in result.series} == {
        "a": (50.0, 300),
        "b": (50.0, 100),
    }


def test_a_pod_whose_process_memory_is_unknown_reports_the_device_memory_never_a_partial_sum() -> None:
    # NVML gives no usedGpuMemory for 102 (None: e.g. without privileges under MPS): b's own use is
    # unknown, and the 300 bytes of 103 alone would understate it. a's processes are all known.
    device = gpu(
        memory_used_bytes=5000,
        processes=(GpuProcess(101, 1200), GpuProcess(102, None), GpuProcess(103, 300)),
        process_sm_percent={101: 10.0, 102: 20.0, 103: 5.0},
    )
    owners = {
        101: ProcessOwner(101, "uid-a", None),
        102: ProcessOwner(102, "uid-b", None),
        103: ProcessOwner(103, "uid-b", None),
    }
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b")}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, pods)
    assert {s.pod: s.memory_used_bytes for s in result.series} == {"a": 1200, "b": 5000}
    assert {s.pod: s.duty_cycle_percent for s in result.series} == {"a": 10.0, "b": 25.0}


def test_a_finished_pod_found_through_its_processes_is_not_attributed() -> None:
    # No allocation names the GPU; the only process belongs to a pod the API says has Succeeded
    # (its container is being torn down): the GPU is nobody's.
    device = gpu(processes=(GpuProcess(101, 300),), process_sm_percent={101: 0.0})
    owners = {101: ProcessOwner(101, "uid-a", "cid-1")}
    pods = {"uid-a": pod("uid-a", "done", phase="Succeeded", containers={"cid-1": "main"})}
    result = attribute([device], [], owners, pods)
    assert [(s.namespace, s.pod, s.container) for s in result.series] == [("", "", "")]
    assert result.processes_by_owner == {"pod": 1}


def test_a_busy_process_of_a_finished_pod_makes_shares_unmeasurable() -> None:
    device = gpu(
        duty_cycle_percent=70.0,
        processes=(GpuProcess(101, 300), GpuProcess(102, 100), GpuProcess(103, 100)),
        process_sm_percent={101: 30.0, 102: 10.0, 103: 30.0},
    )
    owners = {
        101: ProcessOwner(101, "uid-a", None),
        102: ProcessOwner(102, "uid-b", None),
        103: ProcessOwner(103, "uid-done", None),
    }
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b"), "uid-done": pod("uid-done", "old", "Failed")}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, pods)
    assert {s.pod: s.duty_cycle_percent for s in result.series} == {"a": 70.0, "b": 70.0}


def test_an_idle_host_process_on_a_shared_gpu_leaves_the_shares_measured() -> None:
    # A monitoring tool's context on the host (no SM sample) takes nothing away from the pods.
    device = gpu(
        duty_cycle_percent=50.0,
        processes=(GpuProcess(1, 200), GpuProcess(101, 300), GpuProcess(102, 100)),
        process_sm_percent={101: 35.0, 102: 15.0},
    )
    owners = {
        1: ProcessOwner(1, None, None),
        101: ProcessOwner(101, "uid-a", None),
        102: ProcessOwner(102, "uid-b", None),
    }
    pods = {"uid-a": pod("uid-a", "a"), "uid-b": pod("uid-b", "b")}
    result = attribute([device], [alloc("a", f"{GPU0}::0"), alloc("b", f"{GPU0}::1")], owners, pods)
    assert {s.pod: (s.duty_cycle_percent, s.memory_used_bytes) for s in result.series} == {
        "a": (35.0, 300),
        "b": (15.0, 100),
    }
    assert result.processes_by_owner == {"host": 1, "pod": 2}
