"""A real Prometheus server scrapes the agent; its query API returns the fake GPU's value by pod."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.sim.kubelet import FakeKubelet, PodDevices
from tests.sim.scenario import Gpu, Scenario, gpu_uuid

BERT = "bert-intent-detection-6d5f8b7c9-x2x4q"


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run must apt-get install it")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return binary


@pytest.mark.prometheus
def test_prometheus_scrapes_the_pods_duty_cycle(tmp_path: Path, start_agent, prometheus_binary: str) -> None:  # type: ignore[no-untyped-def]
    scenario = tmp_path / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=42), Gpu(gpu_uuid(1), util=5)]).write(scenario)
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.set_pods([PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]})])
    agent = start_agent(
        ["--no-kubernetes", "--node-name", "gpu-node-1", "--pod-resources-socket", kubelet.socket_path], scenario
    )
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "- job_name: gpu-pod-exporter\n"
        "  honor_labels: true  # keep the agent's namespace/pod labels, not the scrape target's\n"
        f"  static_configs:\n  - targets: ['127.0.0.1:{agent.port}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    server = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        query = f'duty_cycle_current{{namespace="default",pod="{BERT}"}}'
        deadline = time.monotonic() + 60
        result: list = []  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            try:
                body = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=2).json()
                result = body["data"]["result"]
                if result:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        assert result, f"Prometheus never had {query}:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
        (series,) = result
        assert float(series["value"][1]) == 42
        assert series["metric"]["uuid"] == gpu_uuid(0)
        assert series["metric"]["node"] == "gpu-node-1"
        assert series["metric"]["container"] == "server"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
        kubelet.stop()
