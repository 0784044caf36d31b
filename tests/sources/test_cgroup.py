import pytest

from exporter.sources.cgroup import parse_cgroup
from sim.procfs import HOST_PROCESS, cgroupfs_v1, cgroupfs_v2, systemd_v2

UID = "5f1d2c3b-aaaa-4bbb-8ccc-0123456789ab"
STATIC_UID = "0123456789abcdef0123456789abcdef"  # static / mirror pods: a 32-hex hash
CID = "a" * 56 + "12345678"


@pytest.mark.parametrize("qos", ["burstable", "besteffort", "guaranteed"])
@pytest.mark.parametrize("runtime", ["cri-containerd", "crio", "docker"])
def test_systemd_driver_v2(qos: str, runtime: str) -> None:
    assert parse_cgroup(systemd_v2(UID, CID, qos=qos, runtime=runtime)) == (UID, CID)


@pytest.mark.parametrize("qos", ["burstable", "besteffort", "guaranteed"])
def test_cgroupfs_driver_v1_and_v2(qos: str) -> None:
    assert parse_cgroup(cgroupfs_v2(UID, CID, qos=qos)) == (UID, CID)
    assert parse_cgroup(cgroupfs_v1(UID, CID, qos=qos)) == (UID, CID)


def test_crio_without_scope_suffix() -> None:
    assert parse_cgroup(f"0::/kubepods/burstable/pod{UID}/crio-{CID}\n") == (UID, CID)


def test_crio_conmon_is_not_the_container() -> None:
    text = f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-conmon-{CID}.scope\n"
    assert parse_cgroup(text) == (UID, None)


def test_static_pod_uid() -> None:
    assert parse_cgroup(cgroupfs_v2(STATIC_UID, CID)) == (STATIC_UID, CID)
    assert parse_cgroup(systemd_v2(STATIC_UID, CID)) == (STATIC_UID, CID)


def test_private_cgroup_namespace_relative_path() -> None:
    text = f"0::/../../kubepods-besteffort-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
    assert parse_cgroup(text) == (UID, CID)


def test_v1_with_non_pod_controllers_first() -> None:
    text = f"13:rdma:/\n12:misc:/\n4:memory:/kubepods/besteffort/pod{UID}/{CID}\n0::/\n"
    assert parse_cgroup(text) == (UID, CID)


@pytest.mark.parametrize(
    "text", [HOST_PROCESS, "0::/\n", "", "garbage", "0::/user.slice/user-0.slice/session-1.scope\n"]
)
def test_host_processes_name_no_pod(text: str) -> None:
    assert parse_cgroup(text) is None
