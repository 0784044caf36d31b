"""Measures the agent on a simulated node: poll duration, scrape latency under concurrent
scrapers (hey), and memory. ``python -m bench.agent --gpus 8 --procs 64 --pods 32``.

Not part of the test suite: figures depend on the machine, so they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.conftest import find, free_port, parse_samples
from tests.sim.fakelib import build_fake_nvml
from tests.sim.kubelet import FakeKubelet, PodDevices
from tests.sim.procfs import FakeProc, systemd_v2
from tests.sim.scenario import GIB, Gpu, Proc, Scenario, gpu_uuid


def node_scenario(gpus: int, procs: int, pods: int) -> tuple[Scenario, list[PodDevices], dict[int, str]]:
    """``pods`` pods time-slicing ``gpus`` GPUs round-robin; ``procs`` processes spread over the pods."""
    pod_names = [f"bert-intent-detection-{i:04d}" for i in range(pods)]
    pod_gpu = {name: i % gpus for i, name in enumerate(pod_names)}
    allocations = [PodDevices("default", name, {"server": [("nvidia.com/gpu", [f"{gpu_uuid(pod_gpu[name])}::{i}"])]})
                   for i, name in enumerate(pod_names)]
    cgroups: dict[int, str] = {}
    processes = []
    for p in range(procs):
        pod = p % pods
        pid = 100_000 + p
        uid = f"{pod:08x}-0000-4000-8000-{p:012x}"
        cgroups[pid] = systemd_v2(uid, f"{pid:064x}")
        processes.append(Proc(gpu=pod_gpu[pod_names[pod]], pid=pid, mem=GIB, sm=(p * 7) % 50))
    scenario = Scenario(gpus=[Gpu(gpu_uuid(i), util=40) for i in range(gpus)], procs=processes)
    return scenario, allocations, cgroups


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def run_hey(url: str, requests_total: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run(["hey", "-n", str(requests_total), "-c", str(concurrency), url],
                         capture_output=True, text=True, check=True).stdout
    figures = {f"p{m.group(1)}_ms": float(m.group(2)) * 1000
               for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)}
    figures["requests_per_second"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    ok = re.search(r"\[200\]\s+(\d+) responses", out)
    figures["errors"] = requests_total - (int(ok.group(1)) if ok else 0)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--procs", type=int, default=64)
    parser.add_argument("--pods", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--polls", type=int, default=20, help="polls to sample the poll duration over")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    library = build_fake_nvml()
    scenario, allocations, cgroups = node_scenario(args.gpus, args.procs, args.pods)
    scenario.write(state / "scenario.txt")
    kubelet = FakeKubelet(str(state / "kubelet.sock")).start()
    kubelet.set_pods(allocations)
    proc = FakeProc(state / "proc")
    for pid, cgroup in cgroups.items():
        proc.add(pid, cgroup)
    port = free_port()
    env = dict(os.environ, LD_LIBRARY_PATH=str(library.parent), FAKE_NVML_SCENARIO=str(state / "scenario.txt"))
    agent = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", "--no-kubernetes", "--interval", "1",
         "--pod-resources-socket", kubelet.socket_path, "--proc-root", str(proc.root)],
        env=env, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        durations = []
        series = 0
        time.sleep(3)
        for _ in range(args.polls):
            samples = parse_samples(requests.get(url, timeout=5).text)
            durations.append(find(samples, "gpu_exporter_poll_duration_seconds")[0][1] * 1000)
            series = len(find(samples, "duty_cycle_current"))
            time.sleep(1)
        rss_idle = rss_bytes(agent.pid)
        cpu_before = _cpu_seconds(agent.pid)
        time.sleep(10)
        cpu_idle_per_minute = (_cpu_seconds(agent.pid) - cpu_before) * 6
        scrape = run_hey(url, args.requests, args.concurrency)
        figures = {
            "machine": f"{os.cpu_count()} cores",
            "gpus": args.gpus, "processes": args.procs, "pods": args.pods,
            "duty_cycle_series": series,
            "poll_ms_median": statistics.median(durations), "poll_ms_max": max(durations),
            "cpu_seconds_per_minute_polling_no_scrapes": cpu_idle_per_minute,
            "rss_mb_after_warmup": rss_idle / 1e6, "rss_mb_after_load": rss_bytes(agent.pid) / 1e6,
            "scrape_concurrency": args.concurrency, "scrape_requests": args.requests,
            **{f"scrape_{k}": v for k, v in scrape.items()},
        }
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        kubelet.stop()
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
