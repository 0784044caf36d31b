"""The GPU HPA story on one machine: load makes a BERT service's GPUs busy, the HPA scales it out,
the load stops, it scales back in. Only the GPUs and the cluster are simulated.

Real parts: the agent (on the fake NVML), Prometheus scraping it, the adapter serving the custom
metrics API over TLS, hey for load, and one HTTP server process per replica. Simulated: the GPUs
(utilisation from each replica's served requests, sim/inference.py), the kubelet's
pod-resources and the pods API (sim), a round-robin Service in front of the replicas, and
the HPA controller, which runs exporter.adapter.hpa and sim/autoscaler.py (upstream's
arithmetic) against the adapter exactly as kube-controller-manager reads it. Every HPA time (15 s
sync, 15 s policy periods, 300 s scale-down window, the adapter's 15 s metrics window) is multiplied
by one factor.
``python -m sim.hpademo`` (make demo).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import requests

from exporter.adapter.hpa import NoMetricsError, Pod, pods_metric_replicas
from exporter.adapter.quantity import format_quantity, parse_milli
from exporter.exposition.httpserver import Handler, Server
from sim.apiserver import FakeApiServer, pod_json
from sim.autoscaler import Autoscaler, Policy, ScalingRules, largest_proposal
from sim.certs import make_pki
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import Process, free_port, spawn_agent, start_adapter
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid

DEPLOYMENT = "bert-intent-detection"
TARGET = 20.0  # targetAverageValue of duty_cycle_current
MIN_REPLICAS, MAX_REPLICAS = 1, 10
TOLERANCE = 0.1
HPA_URL = (
    f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/duty_cycle_current"
    f"?labelSelector=app%3D{DEPLOYMENT}"
)


@dataclass
class Replica:
    name: str
    uid: str
    gpu: int
    port: int
    status: Path
    process: Process

    def utilisation(self) -> int:
        try:
            return int(self.status.read_text() or 0)
        except (OSError, ValueError):
            return 0


@dataclass
class Sync:
    """What one HPA sync saw and did."""

    t: float
    replicas_before: int
    replicas_after: int
    average: float | None  # the HPA's view: average duty_cycle_current, None when <unknown>
    per_pod: dict[str, float]
    rps: float
    proposal: int | None


@dataclass
class Cluster:
    directory: Path
    kubelet: FakeKubelet
    api: FakeApiServer
    scenario: Path
    replicas: list[Replica] = field(default_factory=list)
    served: int = 0
    _ids: Any = field(default_factory=lambda: count())
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def scale_to(self, wanted: int) -> None:
        with self._lock:
            while len(self.replicas) < wanted:
                self.replicas.append(self._start())
            while len(self.replicas) > wanted:
                self._stop(self.replicas.pop())
            self._publish()

    def _start(self) -> Replica:
        used = {r.gpu for r in self.replicas}
        gpu = min(set(range(MAX_REPLICAS)) - used)
        number = next(self._ids)
        name = f"{DEPLOYMENT}-6d5f8b7c9-{number:05x}"
        port = free_port()
        status = self.directory / f"{name}.util"
        status.write_text("0")
        process = Process(
            [sys.executable, "-m", "sim.inference", "--port", str(port), "--status-file", str(status)],
            what=f"replica {name}",
        )
        replica = Replica(name, f"00000000-0000-4000-8000-{number:012x}", gpu, port, status, process)
        self.api.apply(pod_json(replica.uid, "default", name, "sim-gpu-node-1", labels={"app": DEPLOYMENT}))
        return replica

    def _stop(self, replica: Replica) -> None:
        replica.process.stop()
        self.api.delete(replica.uid)

    def _publish(self) -> None:
        self.kubelet.set_pods(
            [PodDevices("default", r.name, {"server": [("nvidia.com/gpu", [gpu_uuid(r.gpu)])]}) for r in self.replicas]
        )

    def write_gpus(self) -> None:
        """The fake NVML's view: each replica's GPU as busy as its served requests make it."""
        with self._lock:
            busy = {r.gpu: r.utilisation() for r in self.replicas}
        Scenario(
            gpus=[
                Gpu(
                    gpu_uuid(i),
                    util=busy.get(i, 0),
                    used=(8 << 30) if i in busy else 0,
                    temp=35 + busy.get(i, 0) // 3,
                    power=70_000 + 5_000 * busy.get(i, 0),
                )
                for i in range(MAX_REPLICAS)
            ]
        ).write(self.scenario)

    def ports(self) -> list[int]:
        with self._lock:
            return [r.port for r in self.replicas]


def service(cluster: Cluster) -> Server:
    """The Deployment's Service: round-robin over the live replicas."""
    turn = count()
    local = threading.local()

    class Balancer(Handler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            ports = cluster.ports()
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            try:
                answer = session.get(f"http://127.0.0.1:{ports[next(turn) % len(ports)]}{self.path}", timeout=5)
                body, code = answer.content, answer.status_code
                cluster.served += 1
            except (requests.RequestException, ZeroDivisionError):
                body, code = b'{"error": "no replica answered"}', 503
            self.send(code, body, "application/json")

    server = Server(("127.0.0.1", free_port()), Balancer, None)
    server.start()
    return server


def run(
    load_s: float = 45, cooldown_s: float = 60, factor: float = 0.1, out: Path | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Runs the story; returns the syncs and the figures, and draws the timeline when ``out`` is given."""
    directory = Path(tempfile.mkdtemp(prefix="gpu-hpa-demo-"))
    scenario = directory / "scenario.txt"
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    api = FakeApiServer().start()
    api.tokens["hpa"] = ("system:serviceaccount:kube-system:horizontal-pod-autoscaler", [])
    cluster = Cluster(directory, kubelet, api, scenario)
    cluster.write_gpus()
    agent_port = free_port()
    agent = spawn_agent(
        agent_port,
        scenario,
        "--no-kubernetes",
        "--interval",
        "0.5",
        "--node-name",
        "sim-gpu-node-1",
        "--pod-resources-socket",
        kubelet.socket_path,
    )
    prometheus = Prometheus(directory / "prometheus", [f"127.0.0.1:{agent_port}"], free_port())
    pki = make_pki(directory / "pki")
    # The metrics window is an HPA time too: metrics-server's 15 s, scaled like the sync period.
    window = f"--metrics-window={max(1, round(15 * factor))}s"
    kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
    adapter, adapter_url = start_adapter(directory, pki, kubeconfig, prometheus.url, window)
    front = service(cluster)
    stop = threading.Event()

    def keep_gpus_current() -> None:
        while not stop.is_set():
            cluster.write_gpus()
            stop.wait(0.25)

    threading.Thread(target=keep_gpus_current, daemon=True).start()
    sync_s = 15 * factor
    hpa = Autoscaler(
        MIN_REPLICAS,
        MAX_REPLICAS,
        scale_up=ScalingRules(0, (Policy("Pods", 4, 15 * factor), Policy("Percent", 100, 15 * factor))),
        scale_down=ScalingRules(300 * factor, (Policy("Percent", 100, 15 * factor),)),
    )
    syncs: list[Sync] = []
    hey: Process | None = None
    try:
        cluster.scale_to(MIN_REPLICAS)
        prometheus.wait_for('count(duty_cycle_current{pod!=""}) > 0')
        start = time.monotonic()
        load_at, stop_at = 2 * sync_s, 2 * sync_s + load_s
        end_at = stop_at + cooldown_s
        last_served, last_t = 0, start
        while (now := time.monotonic() - start) < end_at:
            if hey is None and now >= load_at:
                # The issue's `hey -n 10000 -c 100`, scaled to this machine: 20 workers at 10 req/s each.
                hey = Process(
                    [
                        "hey",
                        "-z",
                        f"{int(load_s)}s",
                        "-c",
                        "20",
                        "-q",
                        "10",
                        f"http://127.0.0.1:{front.server_address[1]}/predict?query=play%20music",
                    ],
                    what="hey",
                )
            moment = time.monotonic()
            rps = (cluster.served - last_served) / max(1e-6, moment - last_t)
            last_served, last_t = cluster.served, moment
            syncs.append(sync(cluster, hpa, adapter_url, pki.ca, now, rps))
            if not quiet:
                line = syncs[-1]
                current = "<unknown>" if line.average is None else format_quantity(line.average)
                print(
                    f"t={now:5.1f}s  gpu-hpa   Deployment/{DEPLOYMENT}   {current}/{format_quantity(TARGET)}   "
                    f"{MIN_REPLICAS}   {MAX_REPLICAS}   {line.replicas_after}   ({line.rps:.0f} req/s)",
                    flush=True,
                )
            time.sleep(max(0.0, sync_s - (time.monotonic() - start - now)))
    finally:
        stop.set()
        if hey is not None:
            hey.stop()
        front.stop()
        for replica in cluster.replicas:
            replica.process.stop()
        adapter.stop()
        prometheus.stop()
        agent.stop()
        kubelet.stop()
        api.stop()
    result = summarise(syncs, load_at, stop_at)
    if out is not None:
        draw(syncs, load_at, stop_at, out)
        result["png"] = str(out)
    return result


def sync(cluster: Cluster, hpa: Autoscaler, url: str, ca: Path, now: float, rps: float) -> Sync:
    """One HPA sync, reading the metric through the adapter as the controller does."""
    current = len(cluster.replicas)
    per_pod: dict[str, float] = {}
    try:
        answer = requests.get(url + HPA_URL, headers={"Authorization": "Bearer hpa"}, verify=str(ca), timeout=10)
        answer.raise_for_status()
        per_pod = {i["describedObject"]["name"]: parse_milli(i["value"]) / 1000 for i in answer.json()["items"]}
    except requests.RequestException:
        pass
    pods = [Pod(r.name) for r in cluster.replicas]
    try:
        milli = {name: round(value * 1000) for name, value in per_pod.items()}
        proposal = pods_metric_replicas(current, round(TARGET * 1000), pods, milli)
    except NoMetricsError:  # an empty list: kubectl shows <unknown> and nothing scales
        return Sync(now, current, current, None, per_pod, rps, None)
    combined = largest_proposal(current, [proposal.replicas])  # this HPA has one metric
    assert combined is not None
    desired = hpa.decide(now, current, combined)
    if desired != current:
        cluster.scale_to(desired)
    return Sync(now, current, desired, proposal.usage_milli / 1000, per_pod, rps, proposal.replicas)


def summarise(syncs: list[Sync], load_at: float, stop_at: float) -> dict[str, Any]:
    outs = [s for s in syncs if s.replicas_after > s.replicas_before]
    back = [s for s in syncs if s.t > stop_at and s.replicas_after == MIN_REPLICAS and s.replicas_before > MIN_REPLICAS]
    return {
        "first_scale_out_after_load_s": outs[0].t - load_at if outs else None,
        "peak_replicas": max(s.replicas_after for s in syncs),
        "scale_in_to_min_after_load_stop_s": back[-1].t - stop_at if back else None,
        "syncs": [s.__dict__ for s in syncs],
    }


def draw(syncs: list[Sync], load_at: float, stop_at: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in syncs]
    figure, (load, duty, replicas) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    load.plot(t, [s.rps for s in syncs], color="tab:gray")
    load.set_ylabel("requests / s")
    for pod in sorted({p for s in syncs for p in s.per_pod}):
        duty.plot(t, [s.per_pod.get(pod) for s in syncs], linewidth=0.8, alpha=0.6, label=pod.rsplit("-", 1)[-1])
    duty.plot(t, [s.average for s in syncs], color="black", linewidth=2, label="HPA average")
    duty.axhline(TARGET, color="tab:red", linestyle="--", label="target 20")
    duty.set_ylabel("duty_cycle_current (%)")
    duty.legend(fontsize=7, ncol=4)
    replicas.step(t, [s.replicas_after for s in syncs], where="post", color="tab:blue")
    replicas.set_ylabel("replicas")
    replicas.set_xlabel("seconds (HPA times scaled)")
    for s in syncs:
        if s.replicas_after != s.replicas_before:
            colour = "tab:green" if s.replicas_after > s.replicas_before else "tab:orange"
            for axis in (load, duty, replicas):
                axis.axvline(s.t, color=colour, alpha=0.4)
    for axis in (load, duty, replicas):
        axis.axvspan(load_at, stop_at, color="tab:gray", alpha=0.08)
        axis.grid(True, alpha=0.3)
    figure.suptitle("GPU HPA on a simulated node: load (shaded), scale-out (green), scale-in (orange)")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-seconds", type=float, default=45)
    parser.add_argument("--cooldown-seconds", type=float, default=60)
    parser.add_argument("--factor", type=float, default=0.1, help="HPA time scale (0.1: a 15 s sync is 1.5 s)")
    parser.add_argument("--png", type=Path, default=Path("hpa-demo.png"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    print(
        "SIMULATED CLUSTER: GPUs, kubelet and pods API simulated; agent, Prometheus, adapter and hey are real.",
        flush=True,
    )
    result = run(args.load_seconds, args.cooldown_seconds, args.factor, args.png)
    print(json.dumps({k: v for k, v in result.items() if k != "syncs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
