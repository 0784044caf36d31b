"""Measurement helpers for the benchmark: simulated node layouts and readings of a process's cost."""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.apiserver import pod_json
from sim.kubelet import PodDevices
from sim.procfs import systemd_v2
from sim.scenario import GIB, Gpu, Mig, Proc, Scenario, gpu_uuid, mig_uuid


@dataclass(frozen=True)
class NodeLayout:
    """One simulated node: NVML scenario, the kubelet's allocations, cgroups by PID, pods for the API."""

    scenario: Scenario
    allocations: list[PodDevices]
    cgroups: dict[int, str]
    pods: list[dict[str, Any]]


def node_layout(gpus: int, procs: int, pods: int, node: str = "bench-node", migs_per_gpu: int = 0) -> NodeLayout:
    """``pods`` pods time-slicing the node's devices round-robin; ``procs`` processes spread over the
    pods (many per device: MPS-style). With ``migs_per_gpu`` every GPU is split into that many MIG
    devices (1g.10gb) and the pods hold MIG devices instead of GPUs."""
    names = [f"bert-intent-detection-{i:04d}" for i in range(pods)]
    uids = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(pods)]
    migs = [
        Mig(parent=g, uuid=mig_uuid(g * migs_per_gpu + m), gi=m + 1, name="NVIDIA H100 MIG 1g.10gb", total=10 * GIB)
        for g in range(gpus)
        for m in range(migs_per_gpu)
    ]
    devices = [m.uuid for m in migs] or [gpu_uuid(g) for g in range(gpus)]
    resource = "nvidia.com/mig-1g.10gb" if migs else "nvidia.com/gpu"
    allocations = [
        PodDevices("default", name, {"server": [(resource, [f"{devices[i % len(devices)]}::{i}"])]})
        for i, name in enumerate(names)
    ]
    cgroups: dict[int, str] = {}
    processes = []
    containers: dict[int, dict[str, str]] = {}
    for p in range(procs):
        pod = p % pods
        pid = 100_000 + p
        cgroups[pid] = systemd_v2(uids[pod], f"{pid:064x}")
        containers.setdefault(pod, {"server": f"{pid:064x}"})
        if migs:
            mig = migs[pod % len(migs)]
            processes.append(Proc(gpu=mig.parent, pid=pid, mem=GIB // 8, gi=mig.gi, ci=0))
        else:
            processes.append(Proc(gpu=pod % gpus, pid=pid, mem=GIB, sm=(p * 7) % 50))
    scenario = Scenario(
        gpus=[Gpu(gpu_uuid(i), util=40, mig=bool(migs)) for i in range(gpus)], migs=migs, procs=processes
    )
    pod_objects = [pod_json(uids[i], "default", names[i], node, containers=containers.get(i, {})) for i in range(pods)]
    return NodeLayout(scenario, allocations, cgroups, pod_objects)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def run_hey(
    url: str, concurrency: int, duration_s: int, headers: dict[str, str] | None = None
) -> dict[str, float | None]:
    """hey for a fixed time at a fixed concurrency: latency percentiles (None when no request
    completed), throughput, and failed requests (requests still in flight at the end count)."""
    header_args = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        ["hey", "-z", f"{duration_s}s", "-t", "30", "-c", str(concurrency), *header_args, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    percentiles = {int(p): float(s) * 1000 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", out)}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    codes = {int(code): int(n) for code, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    failed = 0
    if "Error distribution:" in out:
        failed = sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s", out.split("Error distribution:")[1], re.M))
    return {
        "p50_ms": percentiles.get(50),
        "p99_ms": percentiles.get(99),
        "requests_per_second": float(rate.group(1)) if rate else 0.0,
        "completed": float(codes.get(200, 0)),
        "errors": float(sum(n for code, n in codes.items() if code != 200) + failed),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s live threads, in nanoseconds from each thread's schedstat where the
    kernel keeps it: /proc/PID/stat counts 10 ms ticks, too coarse to tell a 0.1 ms-per-poll step
    apart in a one-minute window. Threads that exited are not counted, so measure windows in which
    the thread set is fixed (the idle windows every caller uses). Without schedstat: the ticks."""
    if not Path(f"/proc/{pid}/schedstat").exists():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:  # the thread ended between listing and reading
            continue
    return total_ns / 1e9


class SlowClients:
    """``count`` connections that each send one byte of a request head every ``drip_s`` seconds
    and never finish it: what a slowloris attack or a fleet of stuck scrapers looks like to a
    server. Used as a context manager; every socket is closed on exit."""

    def __init__(self, host: str, port: int, count: int, drip_s: float = 2.0, connect_s: float = 10.0) -> None:
        self._address = (host, port)
        self._connect_s = connect_s
        self._count = count
        self._drip_s = drip_s
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, name="slow-clients", daemon=True)
        self.opened = 0

    def __enter__(self) -> SlowClients:
        """Opens every connection at once, without blocking: a server that stops accepting (a full
        backlog answers SYNs only as it accepts) must not stretch this out to a second per socket.
        Connections not established within ``connect_s`` are given up. To a loopback server they
        come from 250 addresses, as a fleet would: from one, they would meet the per-client bound."""
        pending: list[socket.socket] = []
        for n in range(self._count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self._address[0].startswith("127."):
                sock.bind((f"127.0.1.{1 + n % 250}", 0))
            sock.setblocking(False)
            sock.connect_ex(self._address)
            pending.append(sock)
        poller = select.poll()  # select() stops at descriptor 1024
        by_fd = {sock.fileno(): sock for sock in pending}
        for fd in by_fd:
            poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + self._connect_s
        while by_fd and time.monotonic() < deadline:
            for fd, _event in poller.poll(200):
                sock = by_fd.pop(fd)
                poller.unregister(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    self._sockets.append(sock)
                    self.opened += 1
                else:
                    sock.close()
        for sock in by_fd.values():
            sock.close()
        self._thread.start()
        return self

    def _drip(self) -> None:
        head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        position = 0
        while not self._stop.wait(self._drip_s):
            byte = head[position % len(head) : position % len(head) + 1]
            position += 1
            for sock in list(self._sockets):
                try:
                    sock.send(byte)
                except OSError:
                    self._sockets.remove(sock)  # the server closed it (deadline or cap)
                    sock.close()

    @property
    def still_open(self) -> int:
        return len(self._sockets)

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()


def thread_count(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
