"""Energy conservation under churn: the real agent on a simulated node whose pods arrive and leave every
few seconds, scraped several times per poll; for every GPU, what its series of
gpu_pod_energy_joules_total gained (as Prometheus' increase() would count it) against what its energy
counter gained. The goal: 0 J of error beyond rounding.

The node: four H100s time-sliced by pods, and a fifth in MIG mode (3g.40gb, 2g.20gb, 1g.10gb) whose MIG
devices pods hold. Every ``--churn`` seconds one pod leaves and one or two arrive, each with a process at
a random SM share; each GPU's power follows its load and its energy counter grows with it.

    python -m bench.conservation [--duration 600] [--out bench/results]

writes conservation.json and conservation.md there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from sim.apiserver import FakeApiServer, pod_json
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port, spawn_agent
from sim.procfs import FakeProc, systemd_v2
from sim.scenario import Gpu, Mig, Proc, Scenario, gpu_uuid, mig_uuid

NODE = "bench-churn-node"
WHOLE_GPUS = 4
MIG_GPU = WHOLE_GPUS  # the index of the GPU in MIG mode
MIG_PROFILES = (("3g.40gb", 1), ("2g.20gb", 2), ("1g.10gb", 3))  # profile, GPU instance id
IDLE_MW, MW_PER_PERCENT = 70_000, 5_000


@dataclass
class Pod:
    name: str
    uid: str
    pid: int
    gpu: int
    device_id: str  # what the kubelet hands out: a GPU replica or a MIG device's UUID
    gi: int | None  # the MIG device's GPU instance
    sm: int


@dataclass
class ChurningNode:
    """The simulated node and its pods; ``churn`` moves it on by one step."""

    directory: Path
    rng: random.Random
    pods: dict[str, Pod] = field(default_factory=dict)
    arrived: int = 0
    left: int = 0

    def __post_init__(self) -> None:
        self.scenario_path = self.directory / "scenario.txt"
        now = time.time()
        self.scenario = Scenario(
            gpus=[
                *(Gpu(gpu_uuid(i), energy=self.rng.randrange(10**9), energy_since=now) for i in range(WHOLE_GPUS)),
                Gpu(gpu_uuid(MIG_GPU), mig=True, energy=self.rng.randrange(10**9), energy_since=now),
            ],
            migs=[
                Mig(parent=MIG_GPU, uuid=mig_uuid(n), gi=gi, name=f"NVIDIA H100 MIG {profile}")
                for n, (profile, gi) in enumerate(MIG_PROFILES)
            ],
        )
        self.kubelet = FakeKubelet(str(self.directory / "kubelet.sock")).start()
        self.proc = FakeProc(self.directory / "proc")
        self.api = FakeApiServer().start()
        self.kubeconfig = self.api.write_kubeconfig(self.directory / "kubeconfig")
        for _ in range(8):
            self._arrive()
        self._publish()

    def churn(self) -> None:
        if self.pods:
            self._leave(self.rng.choice(sorted(self.pods)))
        for _ in range(self.rng.choice((1, 1, 2))):
            self._arrive()
        if len(self.pods) > 16:
            self._leave(self.rng.choice(sorted(self.pods)))
        self._publish()

    def _arrive(self) -> None:
        n = self.arrived
        self.arrived += 1
        gpu = self.rng.randrange(WHOLE_GPUS + 1)
        gi, device_id = None, f"{gpu_uuid(gpu)}::{n}"
        if gpu == MIG_GPU:
            mig = self.rng.randrange(len(MIG_PROFILES))
            gi, device_id = MIG_PROFILES[mig][1], mig_uuid(mig)
        pod = Pod(f"churn-{n:05d}", f"{n:08x}-0000-4000-8000-00000000c0de", 200_000 + n, gpu, device_id, gi, 0)
        pod.sm = self.rng.randrange(0, 60)
        self.pods[pod.name] = pod
        container_id = f"{pod.pid:064x}"
        self.proc.add(pod.pid, systemd_v2(pod.uid, container_id))
        self.api.apply(pod_json(pod.uid, "churn", pod.name, NODE, containers={"main": container_id}))

    def _leave(self, name: str) -> None:
        pod = self.pods.pop(name)
        self.left += 1
        self.proc.remove(pod.pid)
        self.api.delete(pod.uid)

    def _publish(self) -> None:
        """The scenario of the pods now: processes, each GPU's load and the power its counter grows by."""
        now = time.time()
        pods = list(self.pods.values())
        self.scenario.procs = [Proc(gpu=p.gpu, pid=p.pid, sm=p.sm, gi=p.gi, ci=0 if p.gi else None) for p in pods]
        for mig in self.scenario.migs:
            mig.sm_active = float(min(100, sum(p.sm for p in pods if p.gi == mig.gi)))
        for index, gpu in enumerate(self.scenario.gpus):
            load = min(100, sum(p.sm for p in pods if p.gpu == index))
            gpu.util = 0 if gpu.mig else load
            gpu.power = IDLE_MW + MW_PER_PERCENT * load
            gpu.draw(gpu.power, now)
        self.scenario.write(self.scenario_path)
        self.kubelet.set_pods([PodDevices("churn", p.name, {"main": [(resource(p), [p.device_id])]}) for p in pods])

    def stop(self) -> None:
        self.kubelet.stop()
        self.api.stop()


def resource(pod: Pod) -> str:
    profile = next((profile for profile, gi in MIG_PROFILES if gi == pod.gi), None)
    return f"nvidia.com/mig-{profile}" if profile is not None else "nvidia.com/gpu.shared"


def physical(uuid: str) -> str:
    """The GPU whose counter pays a series: a MIG device's parent."""
    return gpu_uuid(MIG_GPU) if uuid.startswith("MIG-") else uuid


@dataclass
class Tally:
    """What the scrapes saw: each series' last value, what the series gained per GPU, the counters."""

    last: dict[tuple[str, ...], float] = field(default_factory=dict)
    gained_j: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    first_counter_j: dict[str, float] = field(default_factory=dict)
    last_counter_j: dict[str, float] = field(default_factory=dict)
    decreases: int = 0
    scrapes: int = 0
    gaps: dict[str, float] = field(default_factory=dict)

    def take(self, text: str) -> None:
        series: dict[tuple[str, ...], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "gpu_pod_energy_joules_total":
                    key = (labels["uuid"], labels["namespace"], labels["pod"], labels["container"])
                    series[key] = sample.value
                elif sample.name == "gpu_energy_joules_total":
                    self.first_counter_j.setdefault(labels["uuid"], sample.value)
                    self.last_counter_j[labels["uuid"]] = sample.value
                elif sample.name == "gpu_exporter_accounting_gaps_total":
                    self.gaps[labels["reason"]] = sample.value
        if not self.scrapes:
            self.last = series  # the start: what was paid before it is not counted
        for labels_of, value in series.items():
            before = self.last.get(labels_of, 0.0)  # a series that appears starts at 0
            if value < before:
                self.decreases += 1
            self.gained_j[physical(labels_of[0])] += value - before
        self.last = series
        self.scrapes += 1


def run(duration_s: float, interval_s: float, churn_s: float, seed: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="bench-conservation-"))
    node = ChurningNode(directory, random.Random(seed))
    port = free_port()
    agent = spawn_agent(
        port,
        node.scenario_path,
        *("--node-name", NODE, "--interval", str(interval_s), "--pod-resources-socket", node.kubelet.socket_path),
        *("--proc-root", str(node.proc.root), "--kubeconfig", str(node.kubeconfig)),
        output=(directory / "agent.log").open("wb"),
    )
    tally = Tally()
    try:
        agent.wait_for_port(port)
        url = f"http://127.0.0.1:{port}/metrics"
        while "gpu_pod_energy_joules_total{" not in requests.get(url, timeout=5).text:
            time.sleep(interval_s / 4)
        started = time.monotonic()
        next_churn = started + churn_s
        while time.monotonic() - started < duration_s:
            tally.take(requests.get(url, timeout=5).text)
            if time.monotonic() >= next_churn:
                node.churn()
                next_churn += churn_s
            time.sleep(interval_s / 4)  # several scrapes per poll: every snapshot is seen
        tally.take(requests.get(url, timeout=5).text)
    finally:
        agent.stop()
        node.stop()
    per_gpu = {}
    for uuid, first in sorted(tally.first_counter_j.items()):
        counted = tally.last_counter_j[uuid] - first
        per_gpu[uuid] = {
            "counter_increase_j": round(counted, 3),
            "series_increase_j": round(tally.gained_j[uuid], 3),
            "error_j": round(tally.gained_j[uuid] - counted, 6) or 0.0,  # never -0.0
        }
    return {
        "duration_s": duration_s,
        "interval_s": interval_s,
        "churn_every_s": churn_s,
        "gpus": WHOLE_GPUS + 1,
        "mig_devices": len(MIG_PROFILES),
        "pods_arrived": node.arrived,
        "pods_left": node.left,
        "scrapes": tally.scrapes,
        "energy_counted_j": round(sum(g["counter_increase_j"] for g in per_gpu.values()), 3),
        "total_abs_error_j": round(sum(abs(g["error_j"]) for g in per_gpu.values()), 6),
        "series_decreases": tally.decreases,
        "accounting_gaps": tally.gaps,
        "per_gpu": per_gpu,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Energy conservation under pod churn (`python -m bench.conservation`)",
        "",
        f"{result['duration_s']:g} s on a simulated node of {result['gpus']} GPUs (one in MIG mode, "
        f"{result['mig_devices']} MIG devices), agent polling every {result['interval_s']:g} s; a pod left and "
        f"one or two arrived every {result['churn_every_s']:g} s ({result['pods_arrived']} arrived, "
        f"{result['pods_left']} left); {result['scrapes']} scrapes.",
        "",
        "| GPU | counter increase (J) | series increase (J) | error (J) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for uuid, gpu in result["per_gpu"].items():
        lines.append(
            f"| {uuid} | {gpu['counter_increase_j']:.3f} | {gpu['series_increase_j']:.3f} | {gpu['error_j']:.6f} |"
        )
    lines += [
        "",
        f"Total |error|: **{result['total_abs_error_j']:.6f} J** of {result['energy_counted_j']:.3f} J counted; "
        f"series that went down: {result['series_decreases']}; accounting gaps: {result['accounting_gaps']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of churn (default 600)")
    parser.add_argument("--interval", type=float, default=1.0, help="the agent's poll interval (default 1)")
    parser.add_argument("--churn", type=float, default=3.0, help="seconds between pod changes (default 3)")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    result = run(args.duration, args.interval, args.churn, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conservation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "conservation.md").write_text(markdown(result))
    print(markdown(result), end="")
    return 0 if result["series_decreases"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
