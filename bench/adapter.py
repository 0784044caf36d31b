"""The adapter's request latency for the HPA's request over a 500-pod label selector, against a real
Prometheus that scraped the real agent (fake NVML). ``python -m bench.adapter [--pods 500]``.

Requests authenticate with a bearer token (TokenReview and SubjectAccessReview are cached, as in a
cluster); ``hey -c 10`` sends them for a fixed time; the JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.measure import run_hey
from tests.adapter.test_adapter import start_adapter
from tests.conftest import free_port
from tests.sim.apiserver import FakeApiServer, pod_json
from tests.sim.certs import make_pki
from tests.sim.kubelet import FakeKubelet, PodDevices
from tests.sim.processes import spawn_agent
from tests.sim.prometheus import Prometheus
from tests.sim.scenario import Gpu, Scenario, gpu_uuid

GPUS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    Scenario(gpus=[Gpu(gpu_uuid(i), util=10 + i) for i in range(GPUS)]).write(directory / "scenario.txt")
    names = [f"bert-intent-detection-{i:04d}" for i in range(args.pods)]
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices("default", name, {"server": [("nvidia.com/gpu", [f"{gpu_uuid(i % GPUS)}::{i}"])]})
            for i, name in enumerate(names)
        ]
    )
    agent_port = free_port()
    agent = spawn_agent(
        agent_port, directory / "scenario.txt", "--no-kubernetes", "--pod-resources-socket", kubelet.socket_path
    )
    prometheus = Prometheus(directory / "prometheus", [f"127.0.0.1:{agent_port}"], free_port())
    api = FakeApiServer().start()
    for i, name in enumerate(names):
        api.apply(pod_json(f"uid-{i}", "default", name, "node", labels={"app": "bert-intent-detection"}))
    api.tokens["hpa-token"] = ("system:serviceaccount:kube-system:horizontal-pod-autoscaler", [])
    pki = make_pki(directory)
    adapter, url = start_adapter(directory, pki, api.write_kubeconfig(directory / "kubeconfig"), prometheus.url)
    path = (
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/duty_cycle_current"
        "?labelSelector=app%3Dbert-intent-detection"
    )
    headers = {"Authorization": "Bearer hpa-token"}
    try:
        prometheus.wait_for(f'count(duty_cycle_current{{pod!=""}}) == {args.pods}')
        deadline = time.monotonic() + 60
        items = 0
        while items < args.pods and time.monotonic() < deadline:
            response = requests.get(url + path, headers=headers, verify=str(pki.ca), timeout=30)
            items = len(response.json().get("items", ())) if response.status_code == 200 else 0
            time.sleep(0.5)
        single = []
        for _ in range(100):  # one client, one request at a time
            started = time.perf_counter()
            requests.get(url + path, headers=headers, verify=str(pki.ca), timeout=30).raise_for_status()
            single.append((time.perf_counter() - started) * 1000)
        single.sort()
        # hey skips certificate verification; the bearer token authenticates.
        loaded = run_hey(url + path, concurrency=10, duration_s=args.seconds, headers=headers)
        print(
            json.dumps(
                {
                    "pods": args.pods,
                    "items": items,
                    "sequential_p50_ms": single[49],
                    "sequential_p99_ms": single[98],
                    "hey_c10_p50_ms": loaded["p50_ms"],
                    "hey_c10_p99_ms": loaded["p99_ms"],
                    "hey_c10_requests_per_second": loaded["requests_per_second"],
                    "hey_errors": loaded["errors"],
                },
                indent=2,
            )
        )
    finally:
        adapter.stop()
        prometheus.stop()
        agent.stop()
        kubelet.stop()
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
