"""What real nodes do to the agent: bad kubelet answers, vanishing processes, unsupported values,
load from many scrapers, and hostile HTTP clients. The agent must keep exporting throughout."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess

import pytest
import requests

from sim.kubelet import PodDevices
from sim.scenario import Proc, gpu_uuid
from tests.conftest import BERT, Node, find


def test_kubelet_garbage_is_ignored_and_counted(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    node.kubelet.set_pods(
        [
            PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices(
                "default", "elsewhere", {"c": [("nvidia.com/gpu", ["GPU-deadbeef-0000-0000-0000-000000000000"])]}
            ),
            PodDevices("default", "odd", {"c": [("nvidia.com/gpu", ["not-a-device", "nvidiaX", ""])]}),
            PodDevices("", "", {"": [("nvidia.com/gpu", [gpu_uuid(1)])]}),  # empty names
            PodDevices("default", "fpga", {"c": [("example.com/fpga", ["fpga0"])]}),  # not ours: ignored
        ]
    )
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    samples = agent.wait_for(lambda s: find(s, "gpu_exporter_unknown_device_ids") != [], what="counted ids")
    assert find(samples, "gpu_exporter_unknown_device_ids", resource="nvidia.com/gpu")[0][1] == 5
    assert {lbl["pod"] for lbl, _ in find(samples, "duty_cycle_current")} == {BERT, ""}
    assert find(samples, "gpu_exporter_pod_resources_up")[0][1] == 1


def test_processes_that_exit_or_belong_to_the_host(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    # PID 7001 is in NVML's list but gone from /proc by the time its cgroup is read.
    node.scenario.procs.append(Proc(gpu=1, pid=7001, mem=100, sm=10))
    node.scenario.write(node.scenario_path)
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    samples = agent.wait_for(
        lambda s: find(s, "gpu_exporter_gpu_processes", owner="exited") != [], what="the exited process to be counted"
    )
    assert find(samples, "gpu_exporter_gpu_processes", owner="exited")[0][1] == 1
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(1))[0][0]["pod"] == ""
    assert find(samples, "duty_cycle_current", pod=BERT)[0][1] == 42


def test_unsupported_power_on_one_gpu(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    node.scenario.gpus[1].unsupported = ("power", "temp")
    node.scenario.write(node.scenario_path)
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    samples = agent.wait_for(lambda s: len(find(s, "duty_cycle_current")) == 2, what="both GPUs")
    assert find(samples, "power_usage_milliwatts_current", uuid=gpu_uuid(1)) == []
    assert find(samples, "temperature_celsius_current", uuid=gpu_uuid(1)) == []
    assert find(samples, "power_usage_milliwatts_current", uuid=gpu_uuid(0))[0][1] == 250_000
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(1))[0][1] == 3
    assert len(re.findall(r"power usage not supported", agent.log())) == 1


def test_hey_load_while_polling_has_no_errors(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    hey = shutil.which("hey")
    if hey is None:
        pytest.skip("hey is not installed (apt-get install hey)")
    # hey's 100 connections come from one address: more than one client may hold by default.
    agent = start_agent([*node.args(), "--max-connections-per-client", "128"], node.scenario_path)
    agent.wait_for(lambda s: find(s, "duty_cycle_current", pod=BERT) != [], what="the BERT pod")
    out = subprocess.run(
        [hey, "-n", "10000", "-c", "100", agent.url + "/metrics"], capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r"\[200\]\s+10000 responses", out), out
    assert "Error distribution" not in out, out


def test_hostile_http_clients_do_not_hurt_the_server(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)

    def raw(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            return conn.recv(4096)

    assert raw(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414")
    # A line that is no HTTP at all (here a TLS hello) gets a 400.
    assert raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    assert raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n").startswith(b"HTTP/1.1 431")
    assert raw(b"GET /metrics HTTP/1.1\r\nX: " + b"v" * 70_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431")
    raw(b"")  # connect and hang up
    assert requests.get(agent.url + "/metrics", timeout=5).status_code == 200
    assert agent.process.poll() is None
