"""The agent as users run it: a real process, scraped over HTTP, with the fake NVML library, a real
gRPC pod-resources server, a /proc tree and a pods API around it."""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import requests

from sim.apiserver import pod_json
from sim.kubelet import PodDevices
from sim.procfs import HOST_PROCESS, systemd_v2
from sim.scenario import NVML_ERROR_DRIVER_NOT_LOADED, Gpu, Proc, Scenario, gpu_uuid
from tests.conftest import BERT, BERT_UID, NODE, Node, Samples, find


def pods_of(samples: Samples, name: str = "duty_cycle_current") -> dict[str, float]:
    return {labels["pod"]: value for labels, value in find(samples, name)}


def test_exports_each_gpu_labelled_with_the_pod_using_it(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    samples = agent.wait_for(
        lambda s: (
            BERT in pods_of(s)
            and find(s, "gpu_exporter_kubernetes_up")[0][1] == 1
            and find(s, "gpu_exporter_gpu_processes", owner="pod") != []
        ),  # cgroups are read off the poll path
        what="the BERT pod's series",
    )
    [(labels, value)] = find(samples, "duty_cycle_current", pod=BERT)
    assert labels == {
        "node": NODE,
        "gpu": "0",
        "uuid": gpu_uuid(0),
        "model": "NVIDIA H100 80GB HBM3",
        "namespace": "default",
        "pod": BERT,
        "container": "server",
    }
    assert value == 42
    assert find(samples, "memory_used_bytes_current", pod=BERT)[0][1] == 9_000_000_000
    assert find(samples, "temperature_celsius_current", pod=BERT)[0][1] == 65
    assert find(samples, "power_usage_milliwatts_current", pod=BERT)[0][1] == 250_000
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(1))[0][0]["pod"] == ""
    for name in ("gpu_exporter_nvml_up", "gpu_exporter_pod_resources_up", "gpu_exporter_kubernetes_up"):
        assert find(samples, name)[0][1] == 1, name
    assert find(samples, "gpu_exporter_gpu_processes", owner="pod")[0][1] == 1
    assert requests.get(agent.url + "/readyz", timeout=2).status_code == 200

    # The load changes: the next poll shows it.
    node.scenario.gpus[0].util = 77
    node.scenario.write(node.scenario_path)
    agent.wait_for(lambda s: pods_of(s).get(BERT) == 77, what="the new utilisation")


def test_pods_that_end_or_share_a_gpu(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")

    # Two pods time-slice GPU 1; each reports its own processes' share.
    uid_a, uid_b = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"
    node.api.apply(pod_json(uid_a, "ml", "shared-a", NODE, containers={"main": "a" * 64}))
    node.api.apply(pod_json(uid_b, "ml", "shared-b", NODE, containers={"main": "b" * 64}))
    node.proc.add(5001, systemd_v2(uid_a, "a" * 64, qos="besteffort"))
    node.proc.add(5002, systemd_v2(uid_b, "b" * 64, qos="guaranteed", runtime="crio"))
    node.proc.add(5003, HOST_PROCESS)
    node.scenario.gpus[1].util = 90
    node.scenario.procs += [
        Proc(gpu=1, pid=5001, mem=1000, sm=60),
        Proc(gpu=1, pid=5002, mem=3000, sm=25),
        Proc(gpu=1, pid=5003, mem=50, sm=0),
    ]
    node.scenario.write(node.scenario_path)
    node.kubelet.set_pods(
        [
            PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices("ml", "shared-a", {"main": [("nvidia.com/gpu.shared", [gpu_uuid(1) + "::0"])]}),
            PodDevices("ml", "shared-b", {"main": [("nvidia.com/gpu.shared", [gpu_uuid(1) + "::1"])]}),
        ]
    )
    # Until the pod watch has both pods, their shares are unmeasurable and each shows the device's 90.
    samples = agent.wait_for(
        lambda s: pods_of(s).get("shared-a") == 60 and pods_of(s).get("shared-b") == 25,
        what="each sharing pod's own share",
    )
    assert pods_of(samples, "memory_used_bytes_current")["shared-a"] == 1000
    assert find(samples, "gpu_exporter_gpu_sharing_pods", uuid=gpu_uuid(1))[0][1] == 2
    assert find(samples, "gpu_exporter_gpu_processes", owner="host")[0][1] == 1
    assert "" not in {lbl["pod"] for lbl, _ in find(samples, "duty_cycle_current", uuid=gpu_uuid(1))}

    # The BERT pod ends: its series go at the next poll, and GPU 0 keeps an unlabelled one.
    node.kubelet.set_pods(
        [
            PodDevices("ml", "shared-a", {"main": [("nvidia.com/gpu.shared", [gpu_uuid(1) + "::0"])]}),
            PodDevices("ml", "shared-b", {"main": [("nvidia.com/gpu.shared", [gpu_uuid(1) + "::1"])]}),
        ]
    )
    node.proc.remove(4242)
    node.scenario.procs = [p for p in node.scenario.procs if p.pid != 4242]
    node.scenario.write(node.scenario_path)
    samples = agent.wait_for(lambda s: BERT not in pods_of(s), what="the ended pod's series to go")
    for name in ("duty_cycle_current", "memory_used_bytes_current", "temperature_celsius_current"):
        assert not find(samples, name, pod=BERT), name
        assert find(samples, name, uuid=gpu_uuid(0))[0][0]["pod"] == ""

    # A pod the API reports as finished is not attributed while the kubelet still lists its device.
    node.api.apply(pod_json(uid_a, "ml", "shared-a", NODE, phase="Succeeded", containers={"main": "a" * 64}))
    agent.wait_for(lambda s: "shared-a" not in pods_of(s), what="the finished pod's series to go")


def test_kubelet_goes_away_and_comes_back(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")
    node.kubelet.stop()
    node.api.delete(BERT_UID)  # so the process cgroup cannot name the pod either
    samples = agent.wait_for(lambda s: find(s, "gpu_exporter_pod_resources_up")[0][1] == 0, what="pod-resources down")
    samples = agent.wait_for(lambda s: BERT not in pods_of(s), what="series without pod labels")
    # Device metrics keep flowing, both GPUs now without pod labels.
    unlabelled = {labels["uuid"]: value for labels, value in find(samples, "duty_cycle_current", pod="")}
    assert unlabelled == {gpu_uuid(0): 42, gpu_uuid(1): 3}
    node.kubelet.start()
    agent.wait_for(
        lambda s: BERT in pods_of(s) and find(s, "gpu_exporter_pod_resources_up")[0][1] == 1,
        timeout_s=15,
        what="pod labels to return",
    )


def test_without_a_driver_the_agent_serves_self_metrics_and_says_why(tmp_path: Path, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(
        ["--no-kubernetes", "--pod-resources-socket", str(tmp_path / "none.sock")], None, with_library=False
    )
    samples = agent.wait_for(lambda s: find(s, "gpu_exporter_nvml_up") != [], what="self-metrics")
    assert find(samples, "gpu_exporter_nvml_up")[0][1] == 0
    assert find(samples, "duty_cycle_current") == []  # nothing made up
    ready = requests.get(agent.url + "/readyz", timeout=2)
    assert ready.status_code == 503 and "libnvidia-ml.so.1 not found" in ready.text
    assert requests.get(agent.url + "/healthz", timeout=2).status_code == 200
    assert agent.log().count("libnvidia-ml.so.1 not found") == 1  # one clear line, not one per retry


def test_driver_not_loaded_at_start_then_loaded(tmp_path: Path, start_agent) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "scenario.txt"
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), util=12)], init_rc=NVML_ERROR_DRIVER_NOT_LOADED)
    scenario.write(path)
    agent = start_agent(
        ["--no-kubernetes", "--interval", "0.2", "--pod-resources-socket", str(tmp_path / "none.sock")], path
    )
    agent.wait_for(lambda s: find(s, "gpu_exporter_nvml_up") == [({}, 0.0)], what="NVML down")
    assert "DRIVER_NOT_LOADED" in requests.get(agent.url + "/readyz", timeout=2).text
    scenario.init_rc = 0
    scenario.write(path)
    samples = agent.wait_for(lambda s: pods_of(s).get("") == 12, timeout_s=15, what="GPUs once init succeeds")
    assert find(samples, "gpu_exporter_nvml_up")[0][1] == 1
    assert requests.get(agent.url + "/readyz", timeout=2).status_code == 200


def test_http_surface_and_sigterm(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")
    plain = requests.get(agent.url + "/metrics", headers={"Accept-Encoding": "identity"}, timeout=2)
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    raw = requests.get(agent.url + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=2, stream=True)
    assert raw.headers["Content-Encoding"] == "gzip"
    assert b"duty_cycle_current" in gzip.decompress(raw.raw.read())
    assert requests.head(agent.url + "/metrics", timeout=2).status_code == 200
    assert requests.get(agent.url + "/nope", timeout=2).status_code == 404
    assert requests.post(agent.url + "/metrics", timeout=2).status_code == 501
    started = time.monotonic()
    took = agent.stop()
    assert agent.process.returncode == 0
    assert took < 1.0, f"took {took:.2f}s to stop after SIGTERM"
    assert time.monotonic() - started < 2


def test_a_lost_gpu_goes_away_and_comes_back(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    agent.wait_for(lambda s: len(find(s, "duty_cycle_current")) == 2, what="both GPUs")
    node.scenario.gpus[0].lost = True
    node.scenario.write(node.scenario_path)
    samples = agent.wait_for(lambda s: find(s, "duty_cycle_current", uuid=gpu_uuid(0)) == [], what="GPU 0 to go")
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(1))[0][1] == 3  # the other keeps exporting
    assert find(samples, "gpu_exporter_device_errors_total", uuid=gpu_uuid(0), kind="GPU_IS_LOST")[0][1] >= 1
    assert find(samples, "gpu_exporter_kubernetes_up") == []  # the watch is off, not down
    node.scenario.gpus[0].lost = False
    node.scenario.write(node.scenario_path)
    agent.wait_for(lambda s: pods_of(s).get(BERT) == 42, what="GPU 0 back, with its pod")


def test_a_hung_gpu_ages_out_while_scrapes_keep_answering(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)  # staleness: 3 x 0.2 s
    agent.wait_for(lambda s: len(find(s, "duty_cycle_current")) == 2, what="both GPUs")
    node.scenario.gpus[0].block = {"util": 10}
    node.scenario.write(node.scenario_path)
    samples = agent.wait_for(
        lambda s: find(s, "duty_cycle_current", uuid=gpu_uuid(0)) == [],
        what="the hung GPU's series to be dropped as stale",
    )
    assert find(samples, "temperature_celsius_current", uuid=gpu_uuid(0)) == []
    assert find(samples, "gpu_exporter_stale_series")[0][1] >= 1
    assert find(samples, "gpu_exporter_device_data_age_seconds", uuid=gpu_uuid(0))[0][1] > 0.6
    assert find(samples, "gpu_exporter_device_data_age_seconds", uuid=gpu_uuid(1))[0][1] < 0.6
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(1))[0][1] == 3
    assert find(samples, "gpu_exporter_data_age_seconds")[0][1] < 1.0  # the rest is polled on time


def test_a_rate_limited_kubelet_call_does_not_strip_pod_labels(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes", "--max-staleness", "30"], node.scenario_path)
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")
    node.kubelet.exhausted = True
    samples = agent.wait_for(lambda s: find(s, "gpu_exporter_pod_resources_up")[0][1] == 0, what="rate limiting")
    assert BERT in pods_of(samples)  # the last good answer bridges the failed calls
    assert find(samples, "gpu_exporter_pod_resources_errors_total", code="RESOURCE_EXHAUSTED")[0][1] >= 1


def test_driver_library_installed_while_running(tmp_path: Path, fake_nvml: Path, start_agent) -> None:  # type: ignore[no-untyped-def]
    """libnvidia-ml.so.1 absent at start (driver not installed yet), then installed: no restart needed."""
    library_dir = tmp_path / "driver"
    library_dir.mkdir()
    path = tmp_path / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=21)]).write(path)
    agent = start_agent(
        ["--no-kubernetes", "--interval", "0.2", "--pod-resources-socket", str(tmp_path / "none.sock")],
        path,
        library_dir=library_dir,
    )
    agent.wait_for(lambda s: find(s, "gpu_exporter_nvml_up") == [({}, 0.0)], what="NVML down")
    shutil.copy(fake_nvml, library_dir / "libnvidia-ml.so.1")
    agent.wait_for(lambda s: pods_of(s).get("") == 21, timeout_s=40, what="GPUs once the library appears")


def test_a_slow_or_hanging_kubelet_never_holds_up_device_data(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)  # staleness: 3 x 0.2 s
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")
    for delay_s in (4.0, 60.0):  # answers late, then not at all within the client's timeout
        node.kubelet.delay_s = delay_s
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            samples = agent.scrape()
            assert len(find(samples, "duty_cycle_current")) == 2, f"GPU series missing with a {delay_s}s kubelet"
            assert find(samples, "gpu_exporter_data_age_seconds")[0][1] < 0.6
            assert BERT in pods_of(samples)  # the last good answer bridges the gap
            time.sleep(0.2)
        node.scenario.gpus[0].util = int(delay_s)
        node.scenario.write(node.scenario_path)
        agent.wait_for(lambda s, v=delay_s: pods_of(s).get(BERT) == v, timeout_s=2, what="new readings, promptly")
    assert requests.get(agent.url + "/readyz", timeout=2).status_code == 200


def test_a_pod_name_that_cannot_be_encoded_does_not_freeze_metrics(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")
    # A lone surrogate in the API's JSON: valid JSON, not encodable as UTF-8.
    odd_uid, odd_cid = "cccccccc-0000-4000-8000-000000000003", "c" * 64
    node.api.apply(pod_json(odd_uid, "default", "odd-\udc80-pod", NODE, containers={"main": odd_cid}))
    node.proc.add(5151, systemd_v2(odd_uid, odd_cid))
    node.scenario.procs.append(Proc(gpu=1, pid=5151, mem=1000, sm=3))
    node.scenario.write(node.scenario_path)
    agent.wait_for(lambda s: any(p.startswith("odd-") for p in pods_of(s)), what="the odd pod's series")
    for util in (11, 12):  # values keep moving: the renderer survived
        node.scenario.gpus[0].util = util
        node.scenario.write(node.scenario_path)
        agent.wait_for(lambda s, u=util: pods_of(s).get(BERT) == u, timeout_s=3, what=f"utilisation {util}")
    assert requests.get(agent.url + "/readyz", timeout=2).status_code == 200


def test_a_watch_answering_410_forever_backs_off_and_says_so(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: find(s, "gpu_exporter_kubernetes_up") == [({}, 1.0)], what="the watch up")
    node.api.watch_gone = True
    node.api.break_watches()
    agent.wait_for(lambda s: find(s, "gpu_exporter_kubernetes_up") == [({}, 0.0)], what="the watch down")
    started, calls_before = time.monotonic(), len(node.api.calls)
    time.sleep(6)
    requests_made = len(node.api.calls) - calls_before
    # client-go's backoff (about 1 s doubling to 30 s): a handful of requests, where a tight
    # re-list loop made hundreds a second.
    assert requests_made <= 12, f"{requests_made} requests in {time.monotonic() - started:.1f}s"
    samples = agent.scrape()
    assert find(samples, "gpu_exporter_kubernetes_up") == [({}, 0.0)]
    assert len(find(samples, "duty_cycle_current")) == 2  # device data unaffected
    node.api.watch_gone = False
    agent.wait_for(lambda s: find(s, "gpu_exporter_kubernetes_up") == [({}, 1.0)], timeout_s=40, what="recovery")
    warnings = [line for line in agent.log().splitlines() if "WARNING" in line and "exporter.sources.kube" in line]
    assert len(warnings) <= 2, warnings  # one line per change of state, not per retry


def test_a_new_pod_holding_an_idle_gpu_is_labelled_as_soon_as_the_watch_sees_it(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    """With the pod watch on, the kubelet is asked when this node's pods change, and otherwise only
    every 15 intervals (3 s here): a pod admitted to an idle GPU, with no process that could name it,
    gets its labels with the pod's next watch event, not at the next periodic List."""
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: BERT in pods_of(s), what="the BERT pod")
    lists = node.kubelet.calls
    time.sleep(2.0)
    # Idle: no pod and no process changed, so at most the periodic List (ten polls passed).
    assert node.kubelet.calls - lists <= 1
    lists = node.kubelet.calls
    deadline = time.monotonic() + 5
    while node.kubelet.calls == lists and time.monotonic() < deadline:  # a periodic List just happened
        time.sleep(0.02)
    node.kubelet.set_pods(
        [
            PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices("ml", "idle-holder", {"main": [("nvidia.com/gpu", [gpu_uuid(1)])]}),
        ]
    )
    node.api.apply(pod_json("cccccccc-0000-4000-8000-000000000003", "ml", "idle-holder", NODE))
    # The next periodic List is 3 s away: the labels come from the List the watch event asked for.
    agent.wait_for(lambda s: "idle-holder" in pods_of(s, "gpu_pod_info"), timeout_s=1.5, what="the new pod's labels")
