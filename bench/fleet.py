"""The adapter at fleet scale: ``python -m bench.fleet`` (part of make bench-adapter; ``--quick`` for a
50-node trial run).

The Prometheus of a 1000-node fleet of 8 GPUs each is built with ``promtool tsdb create-blocks-from
openmetrics``: the agent's seed families as it exports them (one real scrape of the agent on the fake
NVML is the template), one series per GPU and family for every node, an hour at 15 s. The hour ends
after the run, so the newest sample is always within Prometheus's lookback when the adapter asks
"now". Each node's first GPU runs a pod of the ``bert-intent-detection`` Deployment in ``default`` (so
its selector picks one pod per node: 1000 pods); the other GPUs run pods of 200 team namespaces. The
Kubernetes API stand-in serves the same pods (~10 KB each, as the API serves them).

Measured, with 10 concurrent clients, each request a selector of its own (``app=...,!bench-N``: no
answer is reused whole, as with many HPAs and ScaledObjects, while Prometheus's answer for the
namespace is shared for a second as in the adapter): the HPA's custom-metrics request for the 1000
pods, and the KEDA scaler's ``GetMetrics`` over gRPC with TLS and a client certificate. Then the same
PromQL the adapter sends, timed directly against Prometheus (sequential and at 10 clients), and one
cold adapter request a second (nothing shared: Prometheus asked every time), which together say how
much of a request is Prometheus's evaluation. The adapter's RSS after the load and at its peak.

Writes ``fleet.json`` and ``fleet.md`` under ``--out``. Everything shares this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.adapter import HEADERS, TOKEN, adapter, concurrently, peak_rss_bytes, percentiles, realistic_pod
from bench.measure import rss_bytes
from exporter.adapter.keda import externalscaler_pb2 as pb
from exporter.adapter.keda import externalscaler_pb2_grpc as pb_grpc
from exporter.adapter.prometheus import pods_query
from exporter.adapter.rules import DEFAULT_RULES
from exporter.catalogue import FAMILIES, SEED
from sim.apiserver import FakeApiServer
from sim.certs import Pki, make_pki
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import ROOT, free_port, spawn_agent
from sim.prometheus import Prometheus, installed
from sim.scenario import Gpu, Scenario, gpu_uuid

GPUS_PER_NODE = 8
APP = "bert-intent-detection"
TEAMS = 200
STEP_S = 15
HOUR_S = 3600
AFTER_THE_RUN_S = 45 * 60  # the hour ends this long after the data is made
METRIC = "duty_cycle_current"
CLIENTS = 10
GOAL_P99_MS = 250
GOAL_RSS_MB = 150


def seed_template(directory: Path) -> dict[str, list[tuple[str, dict[str, str]]]]:
    """One scrape of the agent (--metrics seed) on a fake node of 8 GPUs, each held by one pod: for
    every seed family, its samples' labels by GPU index."""
    Scenario(gpus=[Gpu(gpu_uuid(g), util=10 + g) for g in range(GPUS_PER_NODE)]).write(directory / "template.txt")
    kubelet = FakeKubelet(str(directory / "template.sock")).start()
    kubelet.set_pods(
        [
            PodDevices("default", f"pod-{g}", {"server": [("nvidia.com/gpu", [gpu_uuid(g)])]})
            for g in range(GPUS_PER_NODE)
        ]
    )
    port = free_port()
    seed = {f.name for f in FAMILIES if f.group == SEED}
    options = ("--no-kubernetes", "--pod-resources-socket", kubelet.socket_path, "--metrics", "seed")
    with spawn_agent(port, directory / "template.txt", *options) as agent:
        agent.wait_for_port(port)
        deadline = time.monotonic() + 30
        while True:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if text.count("gpu_pod_info{") == GPUS_PER_NODE or time.monotonic() > deadline:  # pods attributed
                break
            time.sleep(0.5)
    kubelet.stop()
    template: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in seed and "gpu" in sample.labels:
                template.setdefault(sample.name, []).append((sample.labels["gpu"], dict(sample.labels)))
    return template


def pod_of(node: int, gpu: int) -> tuple[str, str, str]:
    """(namespace, pod, app) of the pod holding the node's GPU."""
    if gpu == 0:
        return "default", f"{APP}-{node:05d}", APP
    index = node * GPUS_PER_NODE + gpu
    return f"team-{index % TEAMS}", f"service-{index:06d}", f"service-{index % 50}"


def write_openmetrics(path: Path, template: dict[str, list[tuple[str, dict[str, str]]]], nodes: int, end: int) -> int:
    """The fleet's hour as OpenMetrics text (each family once, each series in time order); returns
    the number of series."""
    times = range(end - HOUR_S + STEP_S, end + 1, STEP_S)
    series = 0
    with path.open("w") as out:
        for name, samples in template.items():
            out.write(f"# TYPE {name} gauge\n")
            for node in range(nodes):
                for gpu_text, labels in samples:
                    gpu = int(gpu_text)
                    namespace, pod, _ = pod_of(node, gpu)
                    uuid = f"GPU-{node:08x}-{gpu:04x}-4000-8000-fleet"
                    own = {**labels, "node": f"gpu-node-{node:05d}", "uuid": uuid}
                    if "pod" in own:
                        own.update(namespace=namespace, pod=pod)
                    text = ",".join(f'{k}="{v}"' for k, v in sorted(own.items()))
                    base = 20 + (node * 7 + gpu * 13) % 60
                    out.write("".join(f"{name}{{{text}}} {base + (t // STEP_S) % 5} {t}\n" for t in times))
                    series += 1
        out.write("# EOF\n")
    return series


def fleet_prometheus(directory: Path, nodes: int) -> tuple[Prometheus, dict[str, Any]]:
    """Prometheus on the fleet's blocks; returns it and how the data was made."""
    template = seed_template(directory)
    end = int(time.time()) + AFTER_THE_RUN_S
    source = directory / "fleet.om"
    started = time.monotonic()
    series = write_openmetrics(source, template, nodes, end)
    written_s = time.monotonic() - started
    store = directory / "prometheus"
    started = time.monotonic()
    subprocess.run(
        [installed("promtool"), "tsdb", "create-blocks-from", "openmetrics", str(source), str(store / "tsdb")],
        check=True,
        capture_output=True,
    )
    made = {
        "nodes": nodes,
        "gpus": nodes * GPUS_PER_NODE,
        "series": series,
        "families": sorted(template),
        "samples": series * (HOUR_S // STEP_S),
        "openmetrics_mb": round(source.stat().st_size / 2**20),
        "write_s": round(written_s, 1),
        "promtool_s": round(time.monotonic() - started, 1),
    }
    source.unlink()
    prometheus = Prometheus(store, [], free_port())
    prometheus.wait_for(f"count({METRIC}) == {nodes * GPUS_PER_NODE}", timeout_s=600)
    return prometheus, made


def fleet_cluster(nodes: int) -> FakeApiServer:
    api = FakeApiServer().start()
    api.tokens[TOKEN] = ("system:serviceaccount:kube-system:horizontal-pod-autoscaler", [])
    for node in range(nodes):
        for gpu in range(GPUS_PER_NODE):
            namespace, pod, app = pod_of(node, gpu)
            api.apply(realistic_pod(node * GPUS_PER_NODE + gpu, namespace, pod, app))
    return api


def hpa_client(url: str, pki: Pki, pods: int) -> Callable[[int], Callable[[int], bool]]:
    path = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/{METRIC}"

    def make(number: int) -> Callable[[int], bool]:
        session = requests.Session()

        def call(n: int) -> bool:
            selector = f"app={APP},!bench-{number}-{n}"
            response = session.get(
                url + path, params={"labelSelector": selector}, headers=HEADERS, verify=str(pki.ca), timeout=30
            )
            return response.status_code == 200 and response.content.count(b'"describedObject"') == pods

        return call

    return make


def keda_client(port: int, pki: Pki) -> Callable[[int], Callable[[int], bool]]:
    def make(number: int) -> Callable[[int], bool]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        stub = pb_grpc.ExternalScalerStub(grpc.secure_channel(f"127.0.0.1:{port}", credentials))

        def call(n: int) -> bool:
            selector = f"app={APP},!bench-{number}-{n}"
            metadata = {"metricName": METRIC, "podSelector": selector, "targetAverageValue": "20"}
            request = pb.GetMetricsRequest(
                scaledObjectRef=pb.ScaledObjectRef(name="bert", namespace="default", scalerMetadata=metadata),
                metricName=METRIC,
            )
            try:
                (value,) = stub.GetMetrics(request, timeout=30).metricValues
            except grpc.RpcError:
                return False
            return bool(value.metricValueFloat > 0)

        return call

    return make


def prometheus_client(url: str) -> Callable[[int], Callable[[int], bool]]:
    """The adapter's own query for the namespace's pods, posted as the adapter posts it."""
    rule = DEFAULT_RULES.custom_rule(METRIC)
    assert rule is not None
    query = pods_query(rule, "default")

    def make(_: int) -> Callable[[int], bool]:
        session = requests.Session()

        def call(_: int) -> bool:
            response = session.post(f"{url}/api/v1/query", data={"query": query}, timeout=30)
            return response.status_code == 200 and response.json()["status"] == "success"

        return call

    return make


def sequential(call: Callable[[int], bool], count: int, pause_s: float) -> dict[str, Any]:
    latencies, errors = [], 0
    for n in range(count):
        time.sleep(pause_s)
        started = time.perf_counter()
        errors += not call(n)
        latencies.append((time.perf_counter() - started) * 1000)
    return {**percentiles(latencies), "errors": errors}


def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    prometheus, made = fleet_prometheus(directory, args.nodes)
    api = fleet_cluster(args.nodes)
    pki = make_pki(directory / "pki")
    scaler_port = free_port()
    flags = ("--keda-scaler-port", str(scaler_port), "--keda-scaler-client-ca-file", str(pki.ca))
    process, url, ready_s = adapter(directory, pki, api, prometheus.url, ROOT, 600, extra=flags)
    try:
        hpa, keda = hpa_client(url, pki, args.nodes), keda_client(scaler_port, pki)
        assert hpa(0)(0) and keda(0)(0), "the adapter does not answer for the fleet's pods"
        results: dict[str, Any] = {
            "data": made,
            "adapter_seconds_to_ready": round(ready_s, 1),
            "hpa_request_c10": concurrently(args.seconds, CLIENTS, hpa),
            "keda_get_metrics_c10": concurrently(args.seconds, CLIENTS, keda),
            "prometheus_query_c10": concurrently(args.seconds, CLIENTS, prometheus_client(prometheus.url)),
            # A second apart: the adapter's shared Prometheus answer (one second) has expired each time.
            "prometheus_query_sequential": sequential(prometheus_client(prometheus.url)(0), 10, 1.1),
            "hpa_request_cold_sequential": sequential(hpa(99), 10, 1.1),
            "keda_get_metrics_cold_sequential": sequential(keda(99), 10, 1.1),
            "adapter_rss_mb": round(rss_bytes(process.pid) / 2**20, 1),
            "adapter_peak_rss_mb": round(peak_rss_bytes(process.pid) / 2**20, 1),
        }
    finally:
        process.stop()
        api.stop()
        prometheus.stop()
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    data = results["data"]
    hpa, keda = results["hpa_request_c10"], results["keda_get_metrics_c10"]
    prom_seq, prom_c10 = results["prometheus_query_sequential"], results["prometheus_query_c10"]
    cold = results["hpa_request_cold_sequential"]
    share = prom_seq["p50_ms"] / cold["p50_ms"] if cold["p50_ms"] else 0.0

    def met(ok: bool) -> str:
        if args.quick:
            return "not judged: the goals are for 1000 nodes"
        return "met" if ok else "missed"

    lines = [
        f"# The adapter at fleet scale ({'quick: ' if args.quick else ''}{data['nodes']} nodes)",
        "",
        f"`python -m bench.fleet{' --quick' if args.quick else ''}`, {platform.machine()}, CPython "
        f"{platform.python_version()}. Prometheus built by promtool from {data['series']} series "
        f"({data['nodes']} nodes x {GPUS_PER_NODE} GPUs, {len(data['families'])} seed families), "
        f"{data['samples']} samples (one hour at {STEP_S} s); the selector picks {data['nodes']} pods; "
        f"{CLIENTS} clients, {args.seconds} s each load, every request its own selector.",
        "",
        "| request | p50 ms | p99 ms | req/s | errors |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, key in (
        ("HPA custom-metrics request, 10 clients", "hpa_request_c10"),
        ("KEDA GetMetrics, 10 clients", "keda_get_metrics_c10"),
        ("the adapter's PromQL, straight to Prometheus, 10 clients", "prometheus_query_c10"),
        ("the adapter's PromQL, straight to Prometheus, one a second", "prometheus_query_sequential"),
        ("HPA request, cold (Prometheus asked), one a second", "hpa_request_cold_sequential"),
        ("KEDA GetMetrics, cold, one a second", "keda_get_metrics_cold_sequential"),
    ):
        r = results[key]
        rate = r.get("requests_per_second", "")
        lines.append(f"| {name} | {r['p50_ms']} | {r['p99_ms']} | {rate} | {r['errors']} |")
    lines += [
        "",
        f"Adapter RSS after the loads {results['adapter_rss_mb']} MB (peak {results['adapter_peak_rss_mb']} MB); "
        f"ready {results['adapter_seconds_to_ready']} s after start with {data['gpus']} pods in the API.",
        "",
        "| goal | figure | |",
        "| --- | --- | --- |",
        f"| HPA request p99 ≤ {GOAL_P99_MS} ms | {hpa['p99_ms']} ms | {met(hpa['p99_ms'] <= GOAL_P99_MS)} |",
        f"| KEDA GetMetrics p99 ≤ {GOAL_P99_MS} ms | {keda['p99_ms']} ms | {met(keda['p99_ms'] <= GOAL_P99_MS)} |",
        f"| adapter RSS ≤ {GOAL_RSS_MB} MB | {results['adapter_peak_rss_mb']} MB peak "
        f"| {met(results['adapter_peak_rss_mb'] <= GOAL_RSS_MB)} |",
        "",
        f"Prometheus's evaluation of the adapter's query takes {prom_seq['p50_ms']} ms (p50, alone) of a cold "
        f"request's {cold['p50_ms']} ms ({share:.0%}); at {CLIENTS} clients it answers in {prom_c10['p50_ms']} ms "
        f"p50 / {prom_c10['p99_ms']} ms p99, while the adapter asks it once a second per namespace and answers "
        f"the rest from that.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10, help="each load's duration")
    parser.add_argument("--quick", action="store_true", help="50 nodes, 5 s loads: a trial of the harness")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.seconds = 50, 5
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as directory:
        results = measure(args, Path(directory))
    results["quick"] = args.quick
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results, args)
    (args.out / "fleet.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
