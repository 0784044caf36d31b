"""The adapter under load, against a real Prometheus that scraped the real agent (fake NVML) and the
Kubernetes API stand-in (sim/apiserver.py). ``python -m bench.adapter`` (make bench-adapter).

- ``hpa``: the HPA's request over a 500-pod label selector from 10 concurrent clients. Identical
  requests (hey -c 10) share one answer a second; distinct selectors (10 Python clients, each
  request its own selector) compute each answer over Prometheus's shared per-namespace answer;
  cold answers (one a second, sequential) ask Prometheus every time.
- ``slow``: the same hey -c 10 while 1000 clients hold stalled connections, re-opened as fast as the
  adapter closes them.
- ``cluster``: clusters of 10 000 and 50 000 pods, each ~10 KB as the API serves it (labels,
  annotations, managed fields, owner, spec, status): time from start until /readyz, and RSS.

Requests authenticate with a bearer token (TokenReview and SubjectAccessReview cached, as in a
cluster). ``--baseline DIR`` runs the same against the adapter of another checkout, side by side.
Everything shares this machine's cores: figures are for comparison on one machine, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench.measure import rss_bytes, run_hey
from sim.apiserver import FakeApiServer
from sim.certs import Pki, make_pki
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import ROOT, Process, adapter_args, free_port, spawn_adapter, spawn_agent
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid

GPUS = 16
APP = "bert-intent-detection"
PATH = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/duty_cycle_current?labelSelector=app%3D{APP}"
TOKEN = "hpa-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def realistic_pod(i: int, namespace: str, name: str, app: str) -> dict[str, Any]:
    """A pod about the size the API serves for a Deployment's pod (~10 KB of JSON)."""
    template_hash = f"{i % 997:05x}"
    labels = {"app": app, "pod-template-hash": template_hash, "app.kubernetes.io/name": app, "tier": "inference"}
    env = [{"name": f"SETTING_{k}", "value": f"value-{k}-" + "x" * 40} for k in range(20)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"{i:08x}-1111-4000-8000-{i:012x}",
            "labels": labels,
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-01T10:00:00Z",
                "prometheus.io/scrape": "true",
                "checksum/config": "0" * 64,
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-{template_hash}",
                    "uid": f"rs-{template_hash}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {
                        "f:metadata": {"f:labels": {f"f:{k}": {} for k in labels}},
                        "f:spec": {"f:containers": {f'k:{{"name":"server-{c}"}}': {"f:env": {}} for c in range(4)}},
                    },
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "subresource": "status",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}}},
                },
            ],
        },
        "spec": {
            "nodeName": f"gpu-node-{i % 200}",
            "containers": [
                {
                    "name": "server",
                    "image": "registry.example.com/ml/bert-intent-detection:2026.11.1",
                    "env": env,
                    "resources": {"limits": {"nvidia.com/gpu": "1", "memory": "16Gi"}, "requests": {"cpu": "2"}},
                    "volumeMounts": [{"name": "model", "mountPath": "/models"}, {"name": "cache", "mountPath": "/c"}],
                }
            ],
            "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": "models"}}, {"name": "cache"}],
        },
        "status": {
            "phase": "Running",
            "podIP": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2026-11-01T10:00:00Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "containerStatuses": [
                {"name": "server", "ready": True, "restartCount": 0, "containerID": f"containerd://{i:064x}"}
            ],
        },
    }


def cluster(pods: int) -> FakeApiServer:
    """``pods`` pods: the 500 BERT pods of namespace default, the rest over 200 other namespaces."""
    api = FakeApiServer().start()
    api.tokens[TOKEN] = ("system:serviceaccount:kube-system:horizontal-pod-autoscaler", [])
    for i in range(pods):
        if i < 500:
            api.apply(realistic_pod(i, "default", f"{APP}-{i:04d}", APP))
        else:
            api.apply(realistic_pod(i, f"team-{i % 200}", f"service-{i:06d}", f"service-{i % 50}"))
    return api


def adapter(
    directory: Path,
    pki: Pki,
    api: FakeApiServer,
    prometheus_url: str,
    root: Path,
    ready_within_s: float = 300,
    extra: Sequence[str] = (),
) -> tuple[Process, str, float]:
    """The adapter of the checkout at ``root`` (with ``extra`` flags); returns it, its URL and the
    seconds until /readyz."""
    port = free_port()
    started = time.monotonic()
    kubeconfig = api.write_kubeconfig(directory / f"kubeconfig-{port}")
    process = spawn_adapter(
        port,
        *adapter_args(pki, kubeconfig, prometheus_url),
        *extra,
        what=f"the adapter of {root}",
        output=directory / f"adapter-{port}.log",
        cwd=root,
    )
    url = f"https://127.0.0.1:{port}"
    process.wait_until(
        lambda: requests.get(url + "/readyz", verify=str(pki.ca), timeout=5).status_code == 200, ready_within_s
    )
    return process, url, time.monotonic() - started


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
    }


def concurrently(seconds: float, clients: int, make_client: Callable[[int], Callable[[int], bool]]) -> dict[str, Any]:
    """``clients`` threads, each calling its own client (``make_client(number)``: request number ->
    answered well) until time is up: latency percentiles, rate and failures."""
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + seconds

    def run(number: int) -> None:
        call = make_client(number)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            started = time.perf_counter()
            good = call(n)
            latencies.append((time.perf_counter() - started) * 1000)
            errors[0] += not good

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {**percentiles(latencies), "requests_per_second": round(len(latencies) / seconds, 1), "errors": errors[0]}


def distinct_requests(url: str, ca: Path, seconds: float, clients: int = 10) -> dict[str, float]:
    """``clients`` keep-alive clients, each request with its own selector (the same 500 pods)."""

    def make(number: int) -> Callable[[int], bool]:
        session = requests.Session()

        def call(n: int) -> bool:
            response = session.get(f"{url}{PATH},!bench-{number}-{n}", headers=HEADERS, verify=str(ca), timeout=30)
            return response.status_code == 200 and response.content.count(b'"describedObject"') == 500

        return call

    return concurrently(seconds, clients, make)


def cold_requests(url: str, ca: Path, count: int = 10) -> dict[str, float]:
    """One request a second, each a new selector: nothing shared, Prometheus asked every time."""
    latencies = []
    for n in range(count):
        time.sleep(1.1)
        started = time.perf_counter()
        requests.get(f"{url}{PATH},!cold-{n}", headers=HEADERS, verify=str(ca), timeout=30).raise_for_status()
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(statistics.median(latencies), 1), "max_ms": round(max(latencies), 1)}


@contextmanager
def stalled_clients(port: int, count: int) -> Iterator[dict[str, int]]:
    """``count`` connections that say nothing (half of them the start of a TLS record), each
    re-opened as soon as the adapter closes it, until the block ends."""
    stats = {"reopened": 0}
    stop = threading.Event()

    def open_one(n: int) -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        if n % 2:
            connection.sendall(b"\x16\x03\x01\x02")
        return connection

    connections: list[socket.socket | None] = [open_one(n) for n in range(count)]

    def keep() -> None:
        while not stop.wait(0.2):
            open_now = [c for c in connections if c is not None]
            readable, _, _ = select.select(open_now, [], [], 0)
            for closed in readable:  # closed by the adapter (EOF or reset)
                closed.close()
                connections[connections.index(closed)] = None
            for index, slot in enumerate(connections):
                if slot is None:
                    try:
                        connections[index] = open_one(index)
                        stats["reopened"] += 1
                    except OSError:
                        break  # the next round tries again

    keeper = threading.Thread(target=keep, daemon=True)
    keeper.start()
    try:
        yield stats
    finally:
        stop.set()
        keeper.join()
        for connection in connections:
            if connection is not None:
                connection.close()


def threads_of(pid: int) -> int:
    found = re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) if found else 0


def peak_rss_bytes(pid: int) -> int:
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(found.group(1)) * 1024 if found else 0


def measure(root: Path, args: argparse.Namespace, directory: Path, pki: Pki, prometheus: Prometheus) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if "hpa" in args.scenarios or "slow" in args.scenarios:
        api = cluster(500)
        process, url, _ = adapter(directory, pki, api, prometheus.url, root)
        try:
            requests.get(url + PATH, headers=HEADERS, verify=str(pki.ca), timeout=30).raise_for_status()
            if "hpa" in args.scenarios:
                hey = run_hey(url + PATH, concurrency=10, duration_s=args.seconds, headers=HEADERS)
                results["hpa_500_pods"] = {
                    "identical_c10": {k: hey[k] for k in ("p50_ms", "p99_ms", "requests_per_second", "errors")},
                    "distinct_c10": distinct_requests(url, pki.ca, args.seconds),
                    "cold_sequential": cold_requests(url, pki.ca),
                    "adapter_rss_mb_after": round(rss_bytes(process.pid) / 2**20, 1),
                }
            if "slow" in args.scenarios:
                with stalled_clients(int(url.rsplit(":", 1)[1]), args.slow_connections) as stalled:
                    time.sleep(1)
                    threads_held = threads_of(process.pid)
                    hey = run_hey(url + PATH, concurrency=10, duration_s=args.seconds, headers=HEADERS)
                    results["hpa_500_pods_with_stalled_connections"] = {
                        "stalled_connections": args.slow_connections,
                        **{k: hey[k] for k in ("p50_ms", "p99_ms", "requests_per_second", "errors")},
                        "adapter_threads": max(threads_held, threads_of(process.pid)),
                        "adapter_rss_mb": round(rss_bytes(process.pid) / 2**20, 1),
                        "stalled_closed_by_the_adapter": stalled["reopened"],
                    }
        finally:
            process.stop()
            api.stop()
    if "cluster" in args.scenarios:
        for pods in args.cluster_pods:
            api = cluster(pods)
            try:
                process, url, ready_s = adapter(directory, pki, api, prometheus.url, root)
            except RuntimeError as error:
                results[f"cluster_{pods}_pods"] = {"failed": str(error).splitlines()[0]}
                api.stop()
                continue
            try:
                response = requests.get(url + PATH, headers=HEADERS, verify=str(pki.ca), timeout=60)
                results[f"cluster_{pods}_pods"] = {
                    "seconds_to_ready": round(ready_s, 1),
                    "rss_mb": round(rss_bytes(process.pid) / 2**20, 1),
                    "peak_rss_mb": round(peak_rss_bytes(process.pid) / 2**20, 1),
                    "hpa_request_items": len(response.json().get("items", ())) if response.ok else response.status_code,
                }
            finally:
                process.stop()
                api.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10, help="each load's duration")
    parser.add_argument("--scenarios", default="hpa,slow,cluster", type=lambda s: set(s.split(",")))
    parser.add_argument("--slow-connections", type=int, default=1000)
    parser.add_argument("--cluster-pods", default="10000,50000", type=lambda s: [int(n) for n in s.split(",")])
    parser.add_argument("--baseline", type=Path, help="another checkout whose adapter to measure side by side")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    Scenario(gpus=[Gpu(gpu_uuid(i), util=10 + i) for i in range(GPUS)]).write(directory / "scenario.txt")
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices("default", f"{APP}-{i:04d}", {"server": [("nvidia.com/gpu", [f"{gpu_uuid(i % GPUS)}::{i}"])]})
            for i in range(500)
        ]
    )
    agent_port = free_port()
    agent = spawn_agent(
        agent_port, directory / "scenario.txt", "--no-kubernetes", "--pod-resources-socket", kubelet.socket_path
    )
    prometheus = Prometheus(directory / "prometheus", [f"127.0.0.1:{agent_port}"], free_port())
    pki = make_pki(directory / "pki")
    try:
        prometheus.wait_for('count(duty_cycle_current{pod!=""}) == 500')
        report: dict[str, Any] = {"this": measure(ROOT, args, directory, pki, prometheus)}
        if args.baseline:
            report["baseline"] = measure(args.baseline.resolve(), args, directory, pki, prometheus)
        print(json.dumps(report, indent=2))
    finally:
        prometheus.stop()
        agent.stop()
        kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
