"""The dcgm group: dcgm-exporter's series from the real agent over the fake NVML library, scraped by a
real Prometheus, read by the queries of the tools that consume them, copied unchanged from their
sources (only Grafana's variables are replaced, by regexes matching everything as "All" does)."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.catalogue import DCGM_FAMILIES, parse_groups
from sim.apiserver import FakeApiServer, pod_json
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port
from sim.procfs import FakeProc, systemd_v2
from sim.prometheus import Prometheus
from sim.scenario import GIB, Gpu, Mig, Proc, Scenario, Xid, gpu_uuid, mig_uuid, pci_bus_id
from tests.conftest import AgentProcess
from tests.sources.test_nvml import MakeReader, calls_made

MIB = 1024**2
NODE = "gpu-node-1"
DRIVER = "550.54.15"

# NVIDIA/dcgm-exporter grafana/dcgm-exporter-dashboard.json (commit 068798b0a1cb23d7764fa30f6f305d322ede87e2):
# every panel's expr and both query variables, as shipped.
DASHBOARD_PANELS = {
    "GPU Temperature": 'max(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$Hostname", gpu=~"$gpu"}) by (Hostname, gpu, uuid)',
    "GPU Avg. Temp": 'avg(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$Hostname", gpu=~"$gpu"})',
    "GPU Power Usage": 'max(DCGM_FI_DEV_POWER_USAGE{Hostname=~"$Hostname", gpu=~"$gpu"}) by (Hostname, gpu, uuid)',
    "GPU Power Total": 'sum(max(DCGM_FI_DEV_POWER_USAGE{Hostname=~"$Hostname", gpu=~"$gpu"}) by (gpu))',
    "GPU SM Clocks": 'max(DCGM_FI_DEV_SM_CLOCK{Hostname=~"$Hostname", gpu=~"$gpu"} * 1000000) by (Hostname, UUID, gpu)',
    "GPU Utilization": 'max(DCGM_FI_PROF_GR_ENGINE_ACTIVE{Hostname=~"$Hostname", gpu=~"$gpu"}) by (Hostname, gpu, GPU_I_ID, GPU_I_PROFILE)',  # noqa: E501
    "Tensor Core Utilization": 'max(DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{Hostname=~"$Hostname", gpu=~"$gpu"}) by (Hostname, gpu, GPU_I_ID, GPU_I_PROFILE)',  # noqa: E501
    "GPU Framebuffer Mem Used": 'max(DCGM_FI_DEV_FB_USED{Hostname=~"$Hostname", gpu=~"$gpu"}) by (Hostname, gpu, GPU_I_ID, GPU_I_PROFILE)',  # noqa: E501
}
DASHBOARD_VARIABLES = {
    "Hostname": "label_values(DCGM_FI_DEV_FB_FREE, Hostname)",
    "gpu": 'label_values(DCGM_FI_DEV_FB_FREE{Hostname=~"$Hostname"}, gpu)',
}
# opencost/opencost modules/prometheus-source/pkg/prom/metricsquerier.go (commit 1ea64d02df68):
# QueryGPUsUsageAvg's and QueryGPUInfo's queries, filled as OpenCost fills them: its cluster filter
# (empty for one cluster), the window, then its cluster label (default cluster_id).
OPENCOST_GPU_USAGE = (
    'avg(avg_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE{container!=""}[%s])) by (container, pod, namespace, uid, %s)'
)
OPENCOST_GPU_INFO = 'avg(avg_over_time(DCGM_FI_DEV_DEC_UTIL{container!="",%s}[%s])) by (container, pod, namespace, device, modelName, UUID, uid, %s)'  # noqa: E501
# DaoCloud/DaoCloud-docs docs/en/docs/kpanda/user-guide/gpu/gpu-metrics.md: the cluster's "GPU Avg
# Utilization" panel, and the per-GPU "GPU Total Energy Consumption" one (their cluster label is
# added by their scrape config: absent here, so $cluster is "").
DAOCLOUD_AVG_UTILIZATION = (
    'avg(max_over_time(DCGM_FI_DEV_GPU_UTIL{cluster="$cluster",node=~"${node}", gpu=~"${gpu}"}[29s]))'
)
DAOCLOUD_GPU_POWER = 'sum(DCGM_FI_DEV_POWER_USAGE{cluster="$cluster", UUID="${gpu}",GPU_I_ID=~"${gpu_i_id}"})'
# Yandex Cloud's managed Grafana "NVIDIA DCGM Dashboard w/o MIG metrics" (uid gpu-wo-mig), as its docs
# list it: the "GPU Energy Draw Total" panel, watt-hours drawn over the last hour (mJ ÷ 3 600 000).
ENERGY_DRAW_TOTAL = "sum(increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[1h]) / 3600000)"


# NVIDIA/dcgm-exporter etc/default-counters.csv (4.8): every field it enables, and the PCIe totals older
# files enabled.
DEFAULT_COUNTERS = (
    *("DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP"),
    *("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER"),
    *("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL"),
    *("DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED"),
    *("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_VGPU_LICENSE_STATUS"),
    *("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"),
    *("DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"),
    *("DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES"),
    *("DCGM_FI_DEV_PCIE_TX_THROUGHPUT", "DCGM_FI_DEV_PCIE_RX_THROUGHPUT"),
)


def grafana(expr: str, **values: str) -> str:
    """``$name`` and ``${name}`` replaced as Grafana does: by the value given, else by "All" (``.*``)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), ".*"), expr)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    container: str
    uid: str


TRAINER = Pod("default", "trainer-0", "trainer", "00000000-0000-0000-0000-00000000000a")
ASR0 = Pod("speech", "asr-0", "asr", "00000000-0000-0000-0000-00000000000b")
ASR1 = Pod("speech", "asr-1", "asr", "00000000-0000-0000-0000-00000000000c")
DETECTOR = Pod("vision", "detector-0", "detector", "00000000-0000-0000-0000-00000000000d")
H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
GPUS = [
    # 0: a trainer's own GPU; 1: no pod's, without GPM or Xid events; 2: time-sliced by two pods; 3: in MIG mode.
    Gpu(gpu_uuid(0), H100, util=30, memutil=12, used=10 * GIB, reserved=512 * MIB, temp=61, power=250_000,
        sm_clock=1755, energy=9_000_000, encoder=7, decoder=9, pcie_tx=1000, pcie_rx=2000, pcie_replays=3,
        remapped_correctable=2, remapped_uncorrectable=1, sm_active=45, tensor_active=20, dram_bandwidth=35,
        memory_temp=72),
    Gpu(gpu_uuid(1), A100, util=5, used=1 * GIB, temp=40, power=90_000, sm_clock=1410, unsupported=("events",)),
    Gpu(gpu_uuid(2), H100, util=55, used=5 * GIB, temp=70, power=400_000, sm_clock=1980, sm_active=50,
        tensor_active=30, dram_bandwidth=40),
    Gpu(gpu_uuid(3), H100, mig=True, temp=50, power=150_000, sm_clock=1600),
]  # fmt: skip
MIG = Mig(3, mig_uuid(0), 7, f"{H100} MIG 1g.10gb", total=10 * GIB, used=1 * GIB, sm_active=60, tensor_active=10)
PROCS = [Proc(gpu=2, pid=201, mem=2 * GIB, sm=20), Proc(gpu=2, pid=202, mem=3 * GIB, sm=35)]


@dataclass
class Scraped:
    prometheus: Prometheus
    agent: AgentProcess
    nvml: Scenario
    scenario_file: Path

    def query_at(self, promql: str, when: float) -> list[dict[str, Any]]:
        response = requests.get(
            f"{self.prometheus.url}/api/v1/query", params={"query": promql, "time": str(when)}, timeout=5
        )
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.prometheus.query(promql)

    def by(self, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        """The query's result: the given labels' values (missing: "") -> value."""
        return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in self.query(promql)}

    def label_values(self, query: str) -> set[str]:
        """A Grafana ``label_values(selector, label)`` variable, asked as Grafana asks it."""
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, query
        response = requests.get(
            f"{self.prometheus.url}/api/v1/label/{match.group(2)}/values",
            params={"match[]": grafana(match.group(1))},
            timeout=5,
        )
        return set(response.json()["data"])


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    from sim.fakelib import build_fake_nvml

    directory = tmp_path_factory.mktemp("dcgm")
    scenario = directory / "scenario.txt"
    nvml = Scenario(gpus=GPUS, migs=[MIG], procs=PROCS, driver_version=DRIVER)
    nvml.write(scenario)
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices(TRAINER.namespace, TRAINER.name, {TRAINER.container: [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices(ASR0.namespace, ASR0.name, {"asr": [("nvidia.com/gpu.shared", [gpu_uuid(2) + "::0"])]}),
            PodDevices(ASR1.namespace, ASR1.name, {"asr": [("nvidia.com/gpu.shared", [gpu_uuid(2) + "::1"])]}),
            PodDevices(DETECTOR.namespace, DETECTOR.name, {"detector": [("nvidia.com/mig-1g.10gb", [mig_uuid(0)])]}),
        ]
    )
    proc = FakeProc(directory / "proc")
    api = FakeApiServer().start()
    for pid, pod in ((201, ASR0), (202, ASR1)):
        container_id = f"{pid:064d}"
        proc.add(pid, systemd_v2(pod.uid, container_id))
        api.apply(pod_json(pod.uid, pod.namespace, pod.name, NODE, containers={pod.container: container_id}))
    args = ["--node-name", NODE, "--interval", "0.2", "--metrics", "seed,dcgm"]
    args += ["--pod-resources-socket", kubelet.socket_path, "--proc-root", str(proc.root)]
    args += ["--kubeconfig", str(api.write_kubeconfig(directory / "kubeconfig"))]
    agent = AgentProcess(args, scenario, build_fake_nvml().parent, directory / "agent.log")
    prometheus = Prometheus(directory / "prometheus", [f"127.0.0.1:{agent.port}"], free_port())
    try:
        # The pods' own shares, the sampled reads (every few polls) and GPM (two samples) are in.
        prometheus.wait_for(
            'count(DCGM_FI_DEV_GPU_UTIL{pod=~"asr-.*"} != 55) == 2 and count(DCGM_FI_PROF_PCIE_TX_BYTES) > 0'
            ' and count(DCGM_FI_PROF_GR_ENGINE_ACTIVE{GPU_I_ID="7"}) > 0'
            ' and count(DCGM_FI_DEV_XID_ERRORS{gpu="0"}) > 0'  # GPU 0 watched for Xid events
        )
        nvml.xids.append(Xid(gpu=0, code=79))
        nvml.write(scenario)
        prometheus.wait_for('DCGM_FI_DEV_XID_ERRORS{gpu="0"} == 79')
        yield Scraped(prometheus, agent, nvml, scenario)
    finally:
        prometheus.stop()
        agent.stop()
        api.stop()
        kubelet.stop()


def test_the_dcgm_exporter_dashboard_shows_each_gpu(scraped: Scraped) -> None:
    panel = {title: grafana(expr) for title, expr in DASHBOARD_PANELS.items()}
    per_gpu = ("Hostname", "gpu")
    assert scraped.by(panel["GPU Temperature"], *per_gpu) == {
        (NODE, "0"): 61, (NODE, "1"): 40, (NODE, "2"): 70, (NODE, "3"): 50
    }  # fmt: skip
    # An average over series: the shared GPU's temperature once per pod, as with dcgm-exporter.
    assert scraped.by(panel["GPU Avg. Temp"]) == {(): pytest.approx((61 + 40 + 2 * 70 + 50) / 5)}
    assert scraped.by(panel["GPU Power Usage"], *per_gpu) == {
        (NODE, "0"): 250, (NODE, "1"): 90, (NODE, "2"): 400, (NODE, "3"): 150
    }  # fmt: skip
    assert scraped.by(panel["GPU Power Total"]) == {(): 250 + 90 + 400 + 150}  # the shared GPU once
    assert scraped.by(panel["GPU SM Clocks"], "UUID", "gpu") == {
        (gpu_uuid(i), str(i)): mhz * 1e6 for i, mhz in enumerate((1755, 1410, 1980, 1600))
    }
    mig_profile = ("gpu", "GPU_I_ID", "GPU_I_PROFILE")
    # GPM: ratios from the GPUs that have it, the MIG device's own; none from the A100 (no GPM).
    assert scraped.by(panel["GPU Utilization"], *mig_profile) == {
        ("0", "", ""): 0.45, ("2", "", ""): 0.50, ("3", "", ""): 0.0, ("3", "7", "1g.10gb"): 0.60
    }  # fmt: skip
    assert scraped.by(panel["Tensor Core Utilization"], *mig_profile) == {
        ("0", "", ""): 0.20, ("2", "", ""): 0.30, ("3", "", ""): 0.0, ("3", "7", "1g.10gb"): 0.10
    }  # fmt: skip
    # MiB: the shared GPU's largest pod share (asr-1's 3 GiB), the MIG device's own memory.
    fb_used = scraped.by(panel["GPU Framebuffer Mem Used"], *mig_profile)
    assert {k: v for k, v in fb_used.items() if k != ("3", "", "")} == {
        ("0", "", ""): 10 * 1024, ("1", "", ""): 1024, ("2", "", ""): 3 * 1024, ("3", "7", "1g.10gb"): 1024
    }  # fmt: skip
    assert scraped.label_values(DASHBOARD_VARIABLES["Hostname"]) == {NODE}
    # dcgm-exporter 4.6+ names the node "hostname" (NVIDIA/dcgm-exporter#655), as its dashboard's legends
    # now do ("{{hostname}} - GPU {{gpu}}", #709): both names carry it.
    assert scraped.label_values("label_values(DCGM_FI_DEV_FB_FREE, hostname)") == {NODE}
    assert scraped.by('max(DCGM_FI_DEV_GPU_TEMP{hostname=~".*"}) by (hostname, gpu)', "hostname", "gpu") == {
        (NODE, "0"): 61, (NODE, "1"): 40, (NODE, "2"): 70, (NODE, "3"): 50
    }  # fmt: skip
    assert scraped.label_values(DASHBOARD_VARIABLES["gpu"]) == {"0", "1", "2", "3"}


def test_opencost_reads_each_pods_gpu_usage_and_gpu(scraped: Scraped) -> None:
    pod = ("namespace", "pod", "container")
    usage = scraped.by(OPENCOST_GPU_USAGE % ("1h", "cluster_id"), *pod)
    assert usage == pytest.approx(
        {
            ("default", "trainer-0", "trainer"): 0.45,
            ("speech", "asr-0", "asr"): 0.50,  # the device's value: DCGM's profiling fields are not split
            ("speech", "asr-1", "asr"): 0.50,
            ("vision", "detector-0", "detector"): 0.60,
        }
    )
    info = scraped.by(OPENCOST_GPU_INFO % ("", "1h", "cluster_id"), *pod, "device", "modelName", "UUID")
    assert info == {
        ("default", "trainer-0", "trainer", "nvidia0", H100, gpu_uuid(0)): 9,
        ("speech", "asr-0", "asr", "nvidia2", H100, gpu_uuid(2)): 0,
        ("speech", "asr-1", "asr", "nvidia2", H100, gpu_uuid(2)): 0,
    }  # NVML reads no decoder utilisation on a MIG device: the detector has no series here


def test_a_third_consumers_dashboard_and_energy_panels(scraped: Scraped) -> None:
    # Each series' own GPU_UTIL: the shared GPU's pods carry their own processes' shares.
    assert scraped.by(grafana(DAOCLOUD_AVG_UTILIZATION, cluster="")) == {(): (30 + 5 + 20 + 35) / 4}
    assert scraped.by(grafana(DAOCLOUD_GPU_POWER, cluster="", gpu=gpu_uuid(0))) == {(): 250}
    # sum() over a shared GPU counts its power once per pod holding it (the README's caveat) ...
    assert scraped.by(grafana(DAOCLOUD_GPU_POWER, cluster="", gpu=gpu_uuid(2))) == {(): 2 * 400}
    # ... and max by (UUID), as the README says, counts it once.
    assert scraped.by("sum(max by (UUID) (DCGM_FI_DEV_POWER_USAGE))") == {(): 250 + 90 + 400 + 150}


def test_a_third_consumers_energy_panel_shows_the_watt_hours_a_gpu_drew(scraped: Scraped) -> None:
    # GPU 2 (two pods) draws 400 W for 3 s, both ends ahead, so every read sees the counter's one path.
    shared = scraped.nvml.gpus[2]
    start = time.time() + 1.0
    shared.energy_rate, shared.energy_since, shared.energy_until = 400_000, start, start + 3.0
    scraped.nvml.write(scraped.scenario_file)
    drawn_mj = shared.energy_at(start + 3.0) - shared.energy_at(start)
    assert drawn_mj == 1_200_000
    series = f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{UUID="{gpu_uuid(2)}"}}'
    scraped.prometheus.wait_for(f"count({series} == {shared.energy_at(start + 3.0)}) == 2")
    time.sleep(2.0)  # a few scrapes of the stopped counter
    # Evaluated at the last scrape, increase() extrapolates nothing: not forward (no time after it), nor
    # back (the counter started at 0, and Prometheus extrapolates no further back than zero).
    last = max(float(r["value"][1]) for r in scraped.query(f"timestamp({series})"))
    raw = scraped.query_at(f"{series}[1h]", last)
    assert {r["metric"]["pod"]: float(r["values"][-1][1]) - float(r["values"][0][1]) for r in raw} == {
        "asr-0": drawn_mj, "asr-1": drawn_mj  # each pod's series carries the device's counter
    }  # fmt: skip
    # Every other device's counter stood still; the shared GPU counts once per pod (the README's caveat) ...
    assert float(scraped.query_at(ENERGY_DRAW_TOTAL, last)[0]["value"][1]) == pytest.approx(2 * drawn_mj / 3_600_000)
    # ... and max by (UUID), as the README says, counts it once: 1 200 J is a third of a watt-hour.
    once = "sum(max by (UUID) (increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[1h]))) / 3600000"
    assert float(scraped.query_at(once, last)[0]["value"][1]) == pytest.approx(1 / 3)


def test_series_carry_dcgm_exporters_labels(scraped: Scraped) -> None:
    common = {"Hostname": NODE, "hostname": NODE, "DCGM_FI_DRIVER_VERSION": DRIVER, "job": "gpu-pod-exporter"}
    series = {r["metric"]["pod"] if "pod" in r["metric"] else r["metric"]["gpu"]: r["metric"]
              for r in scraped.query('DCGM_FI_DEV_GPU_TEMP or DCGM_FI_DEV_FB_USED{GPU_I_ID="7"}')}  # fmt: skip
    without_instance = {name: {k: v for k, v in labels.items() if k != "instance"} for name, labels in series.items()}
    assert without_instance["1"] == {
        "__name__": "DCGM_FI_DEV_GPU_TEMP", "gpu": "1", "UUID": gpu_uuid(1), "pci_bus_id": pci_bus_id(1),
        "device": "nvidia1", "modelName": A100, **common,
    }  # fmt: skip  # no pod holds it: no namespace, pod or container label
    assert without_instance["trainer-0"] == {
        "__name__": "DCGM_FI_DEV_GPU_TEMP", "gpu": "0", "UUID": gpu_uuid(0), "pci_bus_id": pci_bus_id(0),
        "device": "nvidia0", "modelName": H100, "namespace": "default", "pod": "trainer-0", "container": "trainer",
        **common,
    }  # fmt: skip
    assert without_instance["detector-0"] == {
        "__name__": "DCGM_FI_DEV_FB_USED", "gpu": "3", "UUID": gpu_uuid(3), "pci_bus_id": pci_bus_id(3),
        "device": "nvidia3", "modelName": H100, "GPU_I_PROFILE": "1g.10gb", "GPU_I_ID": "7", "namespace": "vision",
        "pod": "detector-0", "container": "detector", **common,
    }  # fmt: skip
    # Each field in its dcgm-exporter unit, from the value the library was set to (GPU 0).
    gpu0 = {r["metric"]["__name__"]: float(r["value"][1]) for r in scraped.query(f'{{UUID="{gpu_uuid(0)}"}}')}
    assert gpu0 == {
        "DCGM_FI_DEV_SM_CLOCK": 1755, "DCGM_FI_DEV_MEM_CLOCK": 2619, "DCGM_FI_DEV_GPU_TEMP": 61,
        "DCGM_FI_DEV_POWER_USAGE": 250, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 9_000_000,
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 3, "DCGM_FI_DEV_GPU_UTIL": 30, "DCGM_FI_DEV_MEM_COPY_UTIL": 12,
        "DCGM_FI_DEV_ENC_UTIL": 7, "DCGM_FI_DEV_DEC_UTIL": 9, "DCGM_FI_DEV_FB_FREE": 80 * 1024 - 10 * 1024 - 512,
        "DCGM_FI_DEV_FB_USED": 10 * 1024, "DCGM_FI_DEV_FB_RESERVED": 512,
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 2, "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": 1,
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0, "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.45,
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.20, "DCGM_FI_PROF_DRAM_ACTIVE": 0.35,
        "DCGM_FI_PROF_PCIE_TX_BYTES": 1000 * 1024, "DCGM_FI_PROF_PCIE_RX_BYTES": 2000 * 1024,
        "DCGM_FI_DEV_XID_ERRORS": 79, "DCGM_FI_DEV_MEMORY_TEMP": 72,
    }  # fmt: skip
    # Every field but the two pod shares is the device's in each pod's series.
    shared = scraped.by(f'{{UUID="{gpu_uuid(2)}",__name__=~"DCGM_FI_DEV_(GPU_UTIL|FB_USED|POWER_USAGE)"}}',
                        "__name__", "pod")  # fmt: skip
    assert shared == {
        ("DCGM_FI_DEV_GPU_UTIL", "asr-0"): 20, ("DCGM_FI_DEV_GPU_UTIL", "asr-1"): 35,
        ("DCGM_FI_DEV_FB_USED", "asr-0"): 2 * 1024, ("DCGM_FI_DEV_FB_USED", "asr-1"): 3 * 1024,
        ("DCGM_FI_DEV_POWER_USAGE", "asr-0"): 400, ("DCGM_FI_DEV_POWER_USAGE", "asr-1"): 400,
    }  # fmt: skip


def test_the_exposition_has_no_duplicate_series_and_types_every_dcgm_family(scraped: Scraped) -> None:
    text = requests.get(scraped.agent.url + "/metrics", timeout=5).text
    samples = [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert [s for s, n in Counter(samples).items() if n > 1] == []
    exposed = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
    helped = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
    for family in DCGM_FAMILIES:
        assert exposed.get(family.name) == family.type, family.name
        assert family.name in helped, family.name
        assert re.search(rf"^{family.name}{{", text, re.M), family.name  # named as dcgm-exporter names it
    dcgm_samples = [s for s in samples if s.startswith("DCGM_")]
    assert dcgm_samples and all(re.search(r'[{,]pci_bus_id="00000000:[0-9A-F]{2}:00\.0"', s) for s in dcgm_samples)


def test_the_last_xid_code_per_gpu_as_dcgm_exporter_shows_it(scraped: Scraped) -> None:
    # 0 on a watched GPU before its first Xid, as dcgm-exporter's err_code="0"; none from GPU 1, which
    # cannot register for Xid events (never a made-up 0), nor from the MIG device (a GPU field).
    assert scraped.by("DCGM_FI_DEV_XID_ERRORS", "gpu", "GPU_I_ID", "pod", "err_code") == {
        ("0", "", "trainer-0", "79"): 79, ("2", "", "asr-0", "0"): 0, ("2", "", "asr-1", "0"): 0, ("3", "", "", "0"): 0
    }  # fmt: skip
    # An alert keyed on err_code, as dcgm-exporter users write them, for Xids needing a reset or a reboot.
    assert scraped.by('max(DCGM_FI_DEV_XID_ERRORS{err_code=~"48|79|95"}) by (Hostname, gpu)', "gpu") == {("0",): 79}


def test_the_pci_bus_id_is_read_once_per_gpu_and_mig_devices_carry_their_gpus(
    scenario_file: Path, nvml_reader: MakeReader, fake_nvml: Path
) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1), mig=True)], migs=[Mig(1, mig_uuid(0), 7)]).write(scenario_file)
    reader = nvml_reader(groups=parse_groups("seed,dcgm"))
    before = calls_made(fake_nvml, "pci")
    for _ in range(3):
        devices = {d.uuid: d.pci_bus_id for d in reader.poll(interval_s=1.0, deadline_s=5.0).devices}
    assert devices == {gpu_uuid(0): pci_bus_id(0), gpu_uuid(1): pci_bus_id(1), mig_uuid(0): pci_bus_id(1)}
    assert calls_made(fake_nvml, "pci") - before == 2  # a static value: once per GPU, not every poll


def test_the_memory_temperature_where_the_gpu_has_it(scraped: Scraped) -> None:
    # GPU 0 answers the field (HBM); the others answer NOT_SUPPORTED: absent, never 0. This driver
    # lacks the recovery action field, read in the same call: each field has its own answer.
    assert scraped.by("DCGM_FI_DEV_MEMORY_TEMP", "gpu") == {("0",): 72}
    assert scraped.query("gpu_recovery_action") == []


def test_the_memory_temperature_comes_in_the_recovery_actions_call(
    scenario_file: Path, nvml_reader: MakeReader, fake_nvml: Path
) -> None:
    gpus = [Gpu(gpu_uuid(0), memory_temp=72, recovery_action=1), Gpu(gpu_uuid(1))]
    Scenario(gpus=gpus, recovery_field=True).write(scenario_file)
    reader = nvml_reader(groups=parse_groups("seed,dcgm"))
    before = calls_made(fake_nvml, "fields")
    devices = {d.uuid: d.metrics for d in reader.poll(interval_s=1.0, deadline_s=5.0).devices}
    assert calls_made(fake_nvml, "fields") - before == 2  # one call per GPU for both fields
    assert dict(devices[gpu_uuid(0)]["DCGM_FI_DEV_MEMORY_TEMP"]) == {(): 72.0}
    assert "DCGM_FI_DEV_MEMORY_TEMP" not in devices[gpu_uuid(1)]
    in_force = {uuid: [a for (a,), v in metrics["gpu_recovery_action"] if v] for uuid, metrics in devices.items()}
    assert in_force == {gpu_uuid(0): ["gpu_reset"], gpu_uuid(1): ["none"]}


def test_every_default_counter_is_emitted_or_named_in_the_readme_with_its_reason() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    never = readme[readme.index("Never emitted, of dcgm-exporter's default counters") :].split("\n\n")[0]
    explained = {f for f in DEFAULT_COUNTERS if re.search(rf"^- [^:]*`{f}`[^:]*: \S", never, re.M)}
    emitted = {f.name for f in DCGM_FAMILIES}
    assert set(DEFAULT_COUNTERS) - emitted == explained
    assert not explained & emitted
