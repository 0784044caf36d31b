"""A real Prometheus server scrapes the agent; its query API returns the fake GPU's value by pod."""

from __future__ import annotations

from pathlib import Path

from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid

BERT = "bert-intent-detection-6d5f8b7c9-x2x4q"


def test_prometheus_scrapes_the_pods_duty_cycle(tmp_path: Path, start_agent) -> None:  # type: ignore[no-untyped-def]
    scenario = tmp_path / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=42), Gpu(gpu_uuid(1), util=5)]).write(scenario)
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.set_pods([PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]})])
    agent = start_agent(
        ["--no-kubernetes", "--node-name", "gpu-node-1", "--pod-resources-socket", kubelet.socket_path], scenario
    )
    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{agent.port}"], free_port())
    try:
        (series,) = prometheus.wait_for(f'duty_cycle_current{{namespace="default",pod="{BERT}"}}')
        assert float(series["value"][1]) == 42
        assert series["metric"]["uuid"] == gpu_uuid(0)
        assert series["metric"]["node"] == "gpu-node-1"
        assert series["metric"]["container"] == "server"
    finally:
        prometheus.stop()
        kubelet.stop()
