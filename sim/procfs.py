"""A /proc-like tree holding only what the agent reads: <pid>/cgroup, in the exact formats the
runtimes, cgroup versions and drivers write."""

from __future__ import annotations

from pathlib import Path


def systemd_v2(pod_uid: str, container_id: str, qos: str = "burstable", runtime: str = "cri-containerd") -> str:
    """cgroup v2, systemd driver: kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope."""
    uid = pod_uid.replace("-", "_")
    if qos == "guaranteed":
        path = f"/kubepods.slice/kubepods-pod{uid}.slice"
    else:
        path = f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid}.slice"
    return f"0::{path}/{runtime}-{container_id}.scope\n"


def cgroupfs_v2(pod_uid: str, container_id: str, qos: str = "besteffort") -> str:
    level = "" if qos == "guaranteed" else f"/{qos}"
    return f"0::/kubepods{level}/pod{pod_uid}/{container_id}\n"


def cgroupfs_v1(pod_uid: str, container_id: str, qos: str = "burstable") -> str:
    level = "" if qos == "guaranteed" else f"/{qos}"
    controllers = ["12:memory", "11:cpu,cpuacct", "10:devices", "9:pids", "1:name=systemd"]
    return "".join(f"{c}:/kubepods{level}/pod{pod_uid}/{container_id}\n" for c in controllers)


HOST_PROCESS = "0::/system.slice/nvidia-persistenced.service\n"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def add(self, pid: int, cgroup: str) -> None:
        directory = self.root / str(pid)
        directory.mkdir(exist_ok=True)
        (directory / "cgroup").write_text(cgroup)

    def remove(self, pid: int) -> None:
        directory = self.root / str(pid)
        (directory / "cgroup").unlink(missing_ok=True)
        if directory.exists():
            directory.rmdir()
