"""Side-by-side benchmark: this agent and nvitop-exporter on the same fake NVML scenarios.

For each scenario (1, 8, 16 GPUs x 0, 64, 512 GPU processes over up to 256 pods) each exporter polls
every second; we measure CPU seconds per minute of polling with no scrapes, RSS after warm-up,
scrape latency (median, p99) under 10 concurrent scrapers, requests per second at saturation
(50 concurrent), and series count. Then the agent alone runs an hour-equivalent of pod churn
(pods created and deleted every poll) to measure RSS growth. Writes a table, JSON and a PNG chart.

    python -m bench.compare [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import requests

from bench.measure import SlowClients, cpu_seconds, node_layout, rss_bytes, run_hey, thread_count
from sim.apiserver import FakeApiServer
from sim.fakelib import build_fake_nvml
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import Process, free_port, spawn_agent
from sim.procfs import FakeProc, systemd_v2
from sim.scenario import Scenario

EXPORTERS = ("gpu-pod-exporter", "nvitop-exporter")
NODE = "bench-node"  # the node the layouts' pods are scheduled on: the pod watch selects them


def wait_answering(process: Process, url: str) -> None:
    process.wait_until(lambda: requests.get(url, timeout=5).status_code > 0, timeout_s=30, what=f"answering {url}")


def start(
    exporter: str,
    state: Path,
    port: int,
    kubelet: FakeKubelet,
    proc: FakeProc,
    interval: float = 1.0,
    kubeconfig: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Process:
    if exporter == "gpu-pod-exporter":
        watch = ["--kubeconfig", str(kubeconfig)] if kubeconfig else ["--no-kubernetes"]
        return spawn_agent(
            port,
            state / "scenario.txt",
            *watch,
            *extra,
            "--node-name",
            NODE,
            "--interval",
            str(interval),
            "--pod-resources-socket",
            kubelet.socket_path,
            "--proc-root",
            str(proc.root),
        )
    command = [
        shutil.which("nvitop-exporter") or "nvitop-exporter",
        "--bind-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--interval",
        str(interval),
    ]
    env = dict(
        os.environ, LD_LIBRARY_PATH=str(build_fake_nvml().parent), FAKE_NVML_SCENARIO=str(state / "scenario.txt")
    )
    return Process(command, what=exporter, env=env)


def poll_durations_ms(url: str, samples: int) -> list[float]:
    """Our agent's own gpu_exporter_poll_duration_seconds, read once per poll."""
    found = []
    for _ in range(samples):
        text = requests.get(url, timeout=30).text
        value = re.search(r"^gpu_exporter_poll_duration_seconds (\S+)$", text, re.M)
        if value:
            found.append(float(value.group(1)) * 1000)
        time.sleep(1)
    return found


def series_count(url: str) -> int:
    text = requests.get(url, timeout=30).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


class SimulatedNode:
    """A node layout served to one exporter: NVML scenario, kubelet, /proc and the pods API."""

    def __init__(
        self, exporter: str, gpus: int, procs: int, pods: int, extra: tuple[str, ...] = (), migs_per_gpu: int = 0
    ) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        layout = node_layout(gpus, procs, pods, migs_per_gpu=migs_per_gpu)
        layout.scenario.write(self.state / "scenario.txt")
        self.kubelet = FakeKubelet(str(self.state / "kubelet.sock")).start()
        self.kubelet.set_pods(layout.allocations)
        proc = FakeProc(self.state / "proc")
        for pid, cgroup in layout.cgroups.items():
            proc.add(pid, cgroup)
        # Our agent runs as deployed: with its pod watch on.
        self.api = FakeApiServer().start()
        for pod in layout.pods:
            self.api.apply(pod)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        kubeconfig = self.api.write_kubeconfig(self.state / "kubeconfig")
        self.process = start(exporter, self.state, self.port, self.kubelet, proc, kubeconfig=kubeconfig, extra=extra)

    def __enter__(self) -> SimulatedNode:
        wait_answering(self.process, self.url)
        time.sleep(3)  # warm-up: a few polls
        return self

    def cpu_per_minute(self, seconds: float) -> float:
        before = cpu_seconds(self.process.pid)
        time.sleep(seconds)
        return (cpu_seconds(self.process.pid) - before) * 60 / seconds

    def __exit__(self, *_: object) -> None:
        self.process.stop()
        self.kubelet.stop()
        self.api.stop()


def measure(exporter: str, gpus: int, procs: int, pods: int, idle_s: float, load_s: int) -> dict[str, object]:
    with SimulatedNode(exporter, gpus, procs, pods) as node:
        rss_warm = rss_bytes(node.process.pid)
        cpu_per_minute = node.cpu_per_minute(idle_s)
        series = series_count(node.url)
        polls = poll_durations_ms(node.url, samples=10) if exporter == EXPORTERS[0] else []
        latency = run_hey(node.url, concurrency=10, duration_s=load_s)
        saturation = run_hey(node.url, concurrency=50, duration_s=max(2, load_s // 2))
        return {
            "exporter": exporter,
            "gpus": gpus,
            "processes": procs,
            "pods": pods,
            "series": series,
            "poll_ms_median": statistics.median(polls) if polls else None,
            "poll_ms_max": max(polls) if polls else None,
            "cpu_s_per_min": cpu_per_minute,
            "rss_mb": rss_warm / 1e6,
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
            "completed": latency["completed"],
            "errors": latency["errors"],
            "rps_saturated": saturation["requests_per_second"],
        }


def slow_connections(exporter: str, count: int, load_s: int) -> dict[str, object]:
    """8 GPUs / 64 processes with ``count`` connections dripping a request head that never ends:
    scrape latency meanwhile, and what the connections cost in memory and threads."""
    with SimulatedNode(exporter, 8, 64, 32) as node:
        rss_before, threads_before = rss_bytes(node.process.pid), thread_count(node.process.pid)
        with SlowClients("127.0.0.1", node.port, count) as clients:
            time.sleep(5)
            latency = run_hey(node.url, concurrency=10, duration_s=load_s)
            rss_during, threads_during = rss_bytes(node.process.pid), thread_count(node.process.pid)
            held = clients.still_open
        return {
            "exporter": exporter,
            "slow_connections": count,
            "accepted_then_held": held,
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
            "completed": latency["completed"],
            "errors": latency["errors"],
            "rss_mb_added": (rss_during - rss_before) / 1e6,
            "threads_before": threads_before,
            "threads_during": threads_during,
        }


def metrics_cost(idle_s: float) -> dict[str, float]:
    """Our agent's polling CPU at 8 GPUs, no processes: the seed families only, then every group."""
    found = {}
    for groups in ("seed", "all"):
        extra = ("--metrics", "seed") if groups == "seed" else ()
        with SimulatedNode(EXPORTERS[0], 8, 0, 8, extra=extra) as node:
            found[f"cpu_s_per_min_{groups}"] = node.cpu_per_minute(idle_s)
    found["ratio"] = found["cpu_s_per_min_all"] / found["cpu_s_per_min_seed"]
    return found


def churn(polls: int, interval: float) -> dict[str, float]:
    """The agent at 8 GPUs / 64 processes while every poll sees other pods: RSS before and after.

    Pods churn through the kubelet and /proc; the pod watch is off here (the fake API server's
    event history would grow without bound at this rate), so pods are named from pod-resources.
    """
    state = Path(tempfile.mkdtemp(prefix="gpu-churn-"))
    layout = node_layout(8, 64, 32)
    scenario, allocations, cgroups = layout.scenario, layout.allocations, layout.cgroups
    scenario.write(state / "scenario.txt")
    kubelet = FakeKubelet(str(state / "kubelet.sock")).start()
    kubelet.set_pods(allocations)
    proc = FakeProc(state / "proc")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    process = start("gpu-pod-exporter", state, port, kubelet, proc, interval=interval)

    def generation(n: int) -> None:
        """Generation n of the pods: new names, UIDs and PIDs, as if all were deleted and created."""
        kubelet.set_pods([PodDevices(p.namespace, f"{p.name}-g{n}", p.containers) for p in allocations])
        for index, pid in enumerate(cgroups):
            proc.remove(pid + 1000 * (n - 1))
            proc.add(pid + 1000 * n, systemd_v2(f"{n:08x}-0000-4000-8000-{index:012x}", f"{pid + 1000 * n:064x}"))
        procs = [replace(q, pid=q.pid + 1000 * n) for q in scenario.procs]
        Scenario(gpus=scenario.gpus, procs=procs).write(state / "scenario.txt")

    try:
        wait_answering(process, url)
        generation(0)
        time.sleep(3)
        rss_before = rss_bytes(process.pid)
        for n in range(1, polls + 1):
            generation(n)
            time.sleep(interval)
        rss_after = rss_bytes(process.pid)
        return {
            "churn_polls": polls,
            "rss_mb_before": rss_before / 1e6,
            "rss_mb_after": rss_after / 1e6,
            "rss_growth_percent": 100 * (rss_after - rss_before) / rss_before,
        }
    finally:
        process.stop()
        kubelet.stop()


def chart(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency_axis, cpu_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for exporter in EXPORTERS:
        mine = sorted((r for r in rows if r["exporter"] == exporter and r["processes"] == 64), key=lambda r: r["gpus"])  # type: ignore[arg-type,return-value]
        gpus = [r["gpus"] for r in mine]
        latency_axis.plot(gpus, [r["p99_ms"] or float("nan") for r in mine], marker="o", label=exporter)
        cpu_axis.plot(gpus, [r["cpu_s_per_min"] for r in mine], marker="o", label=exporter)
    latency_axis.set(
        xlabel="GPUs (64 GPU processes)",
        ylabel="scrape p99 (ms), 10 concurrent scrapers",
        yscale="log",
        title="Scrape latency",
    )
    cpu_axis.set(
        xlabel="GPUs (64 GPU processes)", ylabel="CPU seconds per minute, polling every 1 s", title="Polling cost"
    )
    for axis in (latency_axis, cpu_axis):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(f"gpu-pod-exporter vs nvitop-exporter, fake NVML, {os.cpu_count()} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def table(rows: list[dict[str, object]]) -> str:
    ours = {(r["gpus"], r["processes"]): r for r in rows if r["exporter"] == EXPORTERS[0]}
    peer = {(r["gpus"], r["processes"]): r for r in rows if r["exporter"] == EXPORTERS[1]}

    def ratio(key: str, scenario: tuple[object, object]) -> str:
        mine, theirs = ours[scenario][key], peer[scenario][key]
        if not mine or theirs is None:
            return "-"
        return f"{float(theirs) / float(mine):.1f}x"  # type: ignore[arg-type]

    def ms(value: object) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = [
        "| GPUs | procs | pods | series (ours/peer) | p50 ms (ours/peer) | p99 ms (ours/peer, ratio) | "
        "rps at c=50 (ours/peer) | CPU s/min (ours/peer, ratio) | RSS MB (ours/peer) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(ours):
        o, p = ours[key], peer[key]
        lines.append(
            f"| {key[0]} | {key[1]} | {o['pods']} | {o['series']}/{p['series']} | "
            f"{ms(o['p50_ms'])}/{ms(p['p50_ms'])} | {ms(o['p99_ms'])}/{ms(p['p99_ms'])} ({ratio('p99_ms', key)}) | "
            f"{o['rps_saturated']:.0f}/{p['rps_saturated']:.0f} | "
            f"{o['cpu_s_per_min']:.2f}/{p['cpu_s_per_min']:.2f} ({ratio('cpu_s_per_min', key)}) | "
            f"{o['rss_mb']:.0f}/{p['rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict[str, object]], slow: list[dict[str, object]]) -> str:
    """The agent-trust issue's four figures at 8 GPUs, ours beside the peer's, against the goals."""
    ours = {(r["gpus"], r["processes"]): r for r in rows if r["exporter"] == EXPORTERS[0]}
    peer = {(r["gpus"], r["processes"]): r for r in rows if r["exporter"] == EXPORTERS[1]}
    slow_ours, slow_peer = (next(r for r in slow if r["exporter"] == e) for e in EXPORTERS)

    def num(value: object, digits: int = 1) -> str:
        return "n/a" if value is None else f"{float(value):.{digits}f}"  # type: ignore[arg-type]

    def met(ok: bool) -> str:
        return "met" if ok else "missed"

    rss, rss_peer = ours[(8, 64)]["rss_mb"], peer[(8, 64)]["rss_mb"]
    cpu, cpu_peer = ours[(8, 0)]["cpu_s_per_min"], peer[(8, 0)]["cpu_s_per_min"]
    p99, p99_peer = ours[(8, 64)]["p99_ms"], peer[(8, 64)]["p99_ms"]
    slow_p99, slow_rss = slow_ours["p99_ms"], slow_ours["rss_mb_added"]
    p99_ratio = float(p99_peer) / float(p99) if p99 and p99_peer else None  # type: ignore[arg-type]
    lines = [
        "| figure (8 GPUs) | ours | peer | goal | |",
        "| --- | --- | --- | --- | --- |",
        f"| RSS after warm-up, pod watch on (64 processes, 32 pods) | {num(rss, 0)} MB | {num(rss_peer, 0)} MB "
        f"| ≤ 60 MB | {met(float(rss) <= 60)} |",  # type: ignore[arg-type]
        f"| polling CPU, no GPU processes, 1 s interval | {num(cpu, 2)} s/min | {num(cpu_peer, 2)} s/min "
        f"| ≤ the peer's | {met(round(float(cpu), 2) <= round(float(cpu_peer), 2))} |",  # type: ignore[arg-type]
        f"| scrape p99, 64 processes, 10 concurrent scrapers | {num(p99)} ms | {num(p99_peer)} ms "
        f"({num(p99_ratio, 0)}x) | ≤ 5 ms, ≥ 100x the peer "
        f"| {met(p99 is not None and float(p99) <= 5 and (p99_ratio or 0) >= 100)} |",  # type: ignore[arg-type]
        f"| {slow_ours['slow_connections']} slow connections open: scrape p99, RSS added, threads "
        f"| {num(slow_p99)} ms, +{num(slow_rss)} MB, {slow_ours['threads_during']} threads "
        f"| {num(slow_peer['p99_ms'])} ms, +{num(slow_peer['rss_mb_added'])} MB, "
        f"{slow_peer['threads_during']} threads | p99 < 50 ms, RSS + < 10 MB "
        f"| {met(slow_p99 is not None and float(slow_p99) < 50 and float(slow_rss) < 10)} |",  # type: ignore[arg-type]
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="8 GPUs with 0 and 64 processes only, shorter runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    grid = [(8, 0), (8, 64)] if args.quick else [(g, p) for g in (1, 8, 16) for p in (0, 64, 512)]
    # CPU is read from /proc in clock ticks (10 ms): over 60 s that is 0.01 CPU s/min, the precision shown.
    idle_s, load_s = (60.0, 5) if args.quick else (60.0, 8)
    rows = []
    for gpus, procs in grid:
        pods = min(256, procs // 2) if procs else gpus
        for exporter in EXPORTERS:
            row = measure(exporter, gpus, procs, pods, idle_s, load_s)
            print(json.dumps(row), flush=True)
            rows.append(row)
    slow = []
    for exporter in EXPORTERS:
        slow.append(slow_connections(exporter, count=2000, load_s=load_s))
        print(json.dumps(slow[-1]), flush=True)
    groups = metrics_cost(idle_s)
    print(json.dumps(groups), flush=True)
    churned = churn(polls=300 if args.quick else 3600, interval=0.1)
    print(json.dumps(churned), flush=True)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    )
    (args.out / "results.json").write_text(
        json.dumps(
            {"machine": machine, "rows": rows, "slow_connections": slow, "metrics_groups": groups, "churn": churned},
            indent=2,
        )
        + "\n"
    )
    chart(rows, args.out / "chart.png")
    summary = (
        f"Machine: {machine}\n\n{goals(rows, slow)}\n\n{table(rows)}\n\n"
        f"Metric groups (8 GPUs, no processes): polling CPU {groups['cpu_s_per_min_seed']:.2f} s/min with the "
        f"seed families only, {groups['cpu_s_per_min_all']:.2f} s/min with every group "
        f"({groups['ratio']:.2f}x; goal ≤ 1.5x)\n\n"
        f"Churn ({churned['churn_polls']} polls, pods replaced each "
        f"poll): RSS {churned['rss_mb_before']:.1f} MB -> {churned['rss_mb_after']:.1f} MB "
        f"({churned['rss_growth_percent']:+.1f}%)\n"
    )
    (args.out / "table.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
