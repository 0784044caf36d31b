"""A simulated GPU node, for running the agent on a machine with no GPU and no cluster.

Four H100s from the fake libnvidia-ml.so.1; a kubelet pod-resources server; a /proc tree; and a
pods API. Two replicas of a BERT intent-detection service hold a GPU each, two pods time-slice a
third, the fourth is idle. Their load moves in slow waves, rewritten every second. The real
agent runs against all of it as a child process: ``python -m sim.node [agent flags]``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from sim.apiserver import FakeApiServer, pod_json
from sim.fakelib import build_fake_nvml
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import Process
from sim.procfs import FakeProc, systemd_v2
from sim.scenario import GIB, Gpu, Proc, Scenario, gpu_uuid

NODE = "sim-gpu-node-1"
# (namespace, pod, uid, container, gpu index, device id, pid, phase of its load wave)
PODS = [
    (
        "default",
        "bert-intent-detection-6d5f8b7c9-x2x4q",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "server",
        0,
        gpu_uuid(0),
        41001,
        0.0,
    ),
    (
        "default",
        "bert-intent-detection-6d5f8b7c9-k7m2p",
        "7c9e6679-7425-40de-944b-e07fc1f90ae7",
        "server",
        1,
        gpu_uuid(1),
        41002,
        1.5,
    ),
    ("speech", "asr-whisper-0", "16fd2706-8baf-433b-82eb-8c7fada847da", "asr", 2, gpu_uuid(2) + "::0", 41003, 3.0),
    ("speech", "asr-whisper-1", "9b2e4c61-3f0a-4d7e-a1b5-2c8d9e0f1a2b", "asr", 2, gpu_uuid(2) + "::1", 41004, 4.5),
]


def scenario_at(t: float) -> Scenario:
    gpus = [Gpu(gpu_uuid(i), temp=38, power=70_000) for i in range(4)]
    procs = []
    for _ns, _pod, _uid, _container, index, _device, pid, phase in PODS:
        busy = round(25 + 20 * math.sin(t / 15 + phase))  # percent, waves of ~90 s
        procs.append(Proc(gpu=index, pid=pid, mem=6 * GIB + busy * 50_000_000, sm=busy))
        gpu = gpus[index]
        gpu.util = min(100, gpu.util + busy)
        gpu.used += 6 * GIB + busy * 50_000_000
        gpu.temp = 38 + gpu.util // 3
        gpu.power = 70_000 + gpu.util * 5_000
    return Scenario(gpus=gpus, procs=procs, driver_version="550.54.15 (simulated)")


def with_energy(before: Scenario, now: Scenario) -> Scenario:
    """``now`` with each GPU's energy counter going on from where ``before`` left it, at its new power."""
    when = time.time()
    for old, new in zip(before.gpus, now.gpus, strict=True):
        new.energy = old.energy_at(when)
        new.draw(new.power, when)
    return now


def main(argv: list[str]) -> int:
    state = Path(tempfile.mkdtemp(prefix="gpu-sim-node-"))
    library = build_fake_nvml()
    scenario_path = state / "scenario.txt"
    started = time.monotonic()
    scenario_at(0).write(scenario_path)

    kubelet = FakeKubelet(str(state / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices(ns, pod, {container: [("nvidia.com/gpu", [device])]})
            for ns, pod, _uid, container, _index, device, _pid, _phase in PODS
        ]
    )
    proc = FakeProc(state / "proc")
    api = FakeApiServer().start()
    for ns, pod, uid, container, _index, _device, pid, _phase in PODS:
        container_id = f"{pid:064x}"
        proc.add(pid, systemd_v2(uid, container_id))
        api.apply(pod_json(uid, ns, pod, NODE, containers={container: container_id}))
    kubeconfig = api.write_kubeconfig(state / "kubeconfig")

    print(
        f"SIMULATED NODE: no GPU or cluster is used. NVML is the fake {library} driven by {scenario_path}; "
        f"pod-resources, /proc and the pods API are simulated under {state}. 4 GPUs, {len(PODS)} pods.",
        flush=True,
    )
    env = dict(os.environ, LD_LIBRARY_PATH=str(library.parent), FAKE_NVML_SCENARIO=str(scenario_path))
    agent = Process(
        [
            sys.executable,
            "-m",
            "exporter",
            "--node-name",
            NODE,
            "--pod-resources-socket",
            kubelet.socket_path,
            "--proc-root",
            str(proc.root),
            "--kubeconfig",
            str(kubeconfig),
            *argv,
        ],
        what="the agent",
        output=None,  # the terminal's: this is what make run shows
        env=env,
    )
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scenario = scenario_at(0)
    try:
        while not stopping and agent.poll() is None:
            time.sleep(1)
            scenario = with_energy(scenario, scenario_at(time.monotonic() - started))
            scenario.write(scenario_path)
    finally:
        agent.stop()
        kubelet.stop()
        api.stop()
    return agent.returncode or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
