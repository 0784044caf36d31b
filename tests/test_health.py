"""Health, efficiency and profiling families (issue 12), read through the real pynvml bindings from
the fake libnvidia-ml.so.1 and exported by the agent: values and units, NOT_SUPPORTED per call, an
older driver, Xid events counted once each on the right device, GPM, groups and the pod join."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter.catalogue import CLOCK_EVENT_REASONS, DEVICE_FAMILIES, SAMPLED_EVERY, SLOW_EVERY
from exporter.config import parse_config
from exporter.model import DeviceReading
from exporter.sources.nvml import NvmlReader
from sim.scenario import Gpu, Mig, Scenario, Xid, gpu_uuid, mig_uuid
from tests.conftest import BERT, Node, find
from tests.sources.test_nvml import calls_made, older_driver, poll_in_a_process

MakeReader = Callable[..., NvmlReader]


def busy_h100(uuid: str = gpu_uuid(0), **changes: Any) -> Gpu:
    """A GPU with every value set to something distinct, in NVML's own units."""
    return replace(BUSY_H100, uuid=uuid, **changes)


BUSY_H100 = Gpu(
    gpu_uuid(0),
    memutil=25,
    sm_clock=1410,
    mem_clock=2619,
    energy=123_456_789,
    power_limit=350_000,
    encoder=12,
    decoder=34,
    pcie_tx=1000,
    pcie_rx=2000,
    pcie_replays=5,
    ecc_corrected=7,
    ecc_uncorrected=2,
    remapped_correctable=3,
    remapped_uncorrectable=1,
    remap_pending=True,
    clock_reasons=0x88,  # hw_slowdown | hw_power_brake_slowdown
    sm_active=63.5,
    sm_occupancy=41.0,
    tensor_active=22.5,
    dram_bandwidth=80.0,
)

# Each family's samples from BUSY_H100, in base units: {extra label values: value}.
EXPECTED: dict[str, dict[tuple[str, ...], float]] = {
    "gpu_memory_utilization_ratio": {(): 0.25},
    "gpu_sm_clock_hertz": {(): 1.41e9},
    "gpu_memory_clock_hertz": {(): 2.619e9},
    "gpu_energy_joules_total": {(): 123_456.789},
    "gpu_power_limit_watts": {(): 350.0},
    "gpu_encoder_utilization_ratio": {(): 0.12},
    "gpu_decoder_utilization_ratio": {(): 0.34},
    "gpu_pcie_throughput_bytes_per_second": {("tx",): 1_024_000.0, ("rx",): 2_048_000.0},
    "gpu_pcie_replay_errors_total": {(): 5.0},
    "gpu_ecc_errors_total": {("corrected",): 7.0, ("uncorrected",): 2.0},
    "gpu_remapped_rows": {("correctable",): 3.0, ("uncorrectable",): 1.0},
    "gpu_row_remap_pending": {(): 1.0},
    "gpu_row_remap_failed": {(): 0.0},
    "gpu_clock_event_active": {
        (reason,): float(reason in ("hw_slowdown", "hw_power_brake_slowdown")) for reason in CLOCK_EVENT_REASONS
    },
    "gpu_sm_active_ratio": {(): 0.635},
    "gpu_sm_occupancy_ratio": {(): 0.41},
    "gpu_tensor_active_ratio": {(): 0.225},
    "gpu_dram_bandwidth_ratio": {(): 0.8},
}

# The fake library's call name -> the families that call feeds.
FAMILIES_OF_CALL = {
    "clock": {"gpu_sm_clock_hertz", "gpu_memory_clock_hertz"},
    "energy": {"gpu_energy_joules_total"},
    "plimit": {"gpu_power_limit_watts"},
    "enc": {"gpu_encoder_utilization_ratio"},
    "dec": {"gpu_decoder_utilization_ratio"},
    "pcie": {"gpu_pcie_throughput_bytes_per_second"},
    "replay": {"gpu_pcie_replay_errors_total"},
    "ecc": {"gpu_ecc_errors_total"},
    "remap": {"gpu_remapped_rows", "gpu_row_remap_pending", "gpu_row_remap_failed"},
    "reasons": {"gpu_clock_event_active"},
    "gpm": {"gpu_sm_active_ratio", "gpu_sm_occupancy_ratio", "gpu_tensor_active_ratio", "gpu_dram_bandwidth_ratio"},
    "util": {"gpu_memory_utilization_ratio"},
}


def devices_after(reader: NvmlReader, polls: int = 2) -> dict[str, DeviceReading]:
    """Devices after ``polls`` polls (GPM needs two samples a poll apart)."""
    devices: tuple[DeviceReading, ...] = ()
    for _ in range(polls):
        devices = reader.poll(interval_s=1.0, deadline_s=5.0).devices
        time.sleep(0.01)
    return {d.uuid: d for d in devices}


def as_dict(device: DeviceReading, family: str) -> dict[tuple[str, ...], float]:
    return dict(device.metrics.get(family, ()))


def test_the_catalogue_declares_exactly_the_families_under_test() -> None:
    # Xid counts and the recovery action are tested on their own (tests/test_gpu_health.py for the latter).
    assert {f.name for f in DEVICE_FAMILIES} - {"gpu_xid_errors_total", "gpu_recovery_action"} == set(EXPECTED)


def test_every_family_is_read_with_its_value_in_base_units(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(gpus=[busy_h100()]).write(scenario_file)
    device = devices_after(nvml_reader())[gpu_uuid(0)]
    for family, expected in EXPECTED.items():
        assert as_dict(device, family) == pytest.approx(expected), family


@pytest.mark.parametrize("call", sorted(FAMILIES_OF_CALL))
def test_a_call_not_supported_leaves_out_only_its_families(
    scenario_file: Path, nvml_reader: MakeReader, call: str
) -> None:
    unsupported = busy_h100(gpu_uuid(1), unsupported=(call,))
    Scenario(gpus=[busy_h100(), unsupported]).write(scenario_file)
    devices = devices_after(nvml_reader())
    assert set(devices[gpu_uuid(0)].metrics) == set(EXPECTED)
    assert set(devices[gpu_uuid(1)].metrics) == set(EXPECTED) - FAMILIES_OF_CALL[call]  # absent, never 0


def test_a_failing_call_is_counted_and_leaves_out_only_its_family(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(gpus=[busy_h100(fail={"energy": 999})]).write(scenario_file)
    poll = nvml_reader().poll(interval_s=1.0, deadline_s=5.0)
    assert "gpu_energy_joules_total" not in poll.devices[0].metrics
    assert "gpu_power_limit_watts" in poll.devices[0].metrics
    assert poll.errors == (("0", gpu_uuid(0), "UNKNOWN"),)


def test_gpm_is_absent_on_a_gpu_before_hopper_and_per_mig_device_on_hopper(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    Scenario(
        gpus=[
            Gpu(gpu_uuid(0), name="NVIDIA A100-SXM4-80GB", sm_active=50.0),
            Gpu(gpu_uuid(1), name="NVIDIA H100 80GB HBM3", mig=True),
        ],
        migs=[
            Mig(parent=1, uuid=mig_uuid(0), gi=1, name="NVIDIA H100 MIG 1g.10gb", sm_active=30.0, tensor_active=5.0),
            Mig(parent=1, uuid=mig_uuid(1), gi=2, name="NVIDIA H100 MIG 3g.40gb", sm_active=70.0),
        ],
    ).write(scenario_file)
    reader = nvml_reader()
    first = devices_after(reader, polls=1)
    assert not any("gpu_sm_active_ratio" in d.metrics for d in first.values())  # one sample is no interval
    devices = devices_after(reader, polls=2)
    assert "gpu_sm_active_ratio" not in devices[gpu_uuid(0)].metrics  # A100: no GPM, absent rather than 0
    assert as_dict(devices[mig_uuid(0)], "gpu_sm_active_ratio") == {(): 0.3}
    assert as_dict(devices[mig_uuid(0)], "gpu_tensor_active_ratio") == {(): 0.05}
    assert as_dict(devices[mig_uuid(1)], "gpu_sm_active_ratio") == {(): 0.7}
    # Whole-GPU families are not read on MIG devices, nor invented for them.
    assert "gpu_sm_clock_hertz" not in devices[mig_uuid(0)].metrics


def test_an_older_driver_without_the_clocks_event_call_uses_the_throttle_reasons(
    scenario_file: Path, tmp_path: Path
) -> None:
    Scenario(gpus=[busy_h100()]).write(scenario_file)
    library = older_driver(tmp_path / "old", "nvmlDeviceGetCurrentClocksEventReasons")
    polls, log = poll_in_a_process(library, scenario_file, polls=3)
    for poll in polls:
        active = poll["devices"][gpu_uuid(0)]["metrics"]["gpu_clock_event_active"]
        assert {reason for (reason,), value in active if value == 1.0} == {"hw_slowdown", "hw_power_brake_slowdown"}
    assert log.count("nvmlDeviceGetCurrentClocksEventReasons is not in the driver") == 1, log


def test_values_are_read_at_their_cadence(scenario_file: Path, nvml_reader: MakeReader, fake_nvml: Path) -> None:
    scenario = Scenario(gpus=[busy_h100()])
    scenario.write(scenario_file)
    reader = nvml_reader()
    calls = ("ecc", "remap", "clock", "reasons", "util", "gpm")
    before = {call: calls_made(fake_nvml, call) for call in calls}
    for _ in range(SLOW_EVERY + 1):
        reader.poll(interval_s=1.0, deadline_s=5.0)
    made = {call: calls_made(fake_nvml, call) - n for call, n in before.items()}
    sampled_reads = 1 + SLOW_EVERY // SAMPLED_EVERY  # the first poll, then every SAMPLED_EVERY polls
    assert made == {
        "ecc": 2 * 2,  # the first poll and SLOW_EVERY polls later; corrected and uncorrected each time
        "remap": 2,
        "clock": 2 * sampled_reads,  # SM and memory clocks
        "reasons": sampled_reads,
        "util": SLOW_EVERY + 1,  # the seed's values every poll
        "gpm": 1 + SLOW_EVERY + 1,  # support asked once, then a sample every poll
    }
    scenario.gpus[0].ecc_uncorrected = 9
    scenario.write(scenario_file)
    values = []
    for _ in range(SLOW_EVERY):
        device = reader.poll(interval_s=1.0, deadline_s=5.0).devices[0]
        values.append(as_dict(device, "gpu_ecc_errors_total")[("uncorrected",)])
    assert values[0] == 2.0 and values[-1] == 9.0  # a new count shows within SLOW_EVERY polls


def test_seed_only_reads_nothing_else(scenario_file: Path, nvml_reader: MakeReader, fake_nvml: Path) -> None:
    Scenario(gpus=[busy_h100()]).write(scenario_file)
    calls = ("clock", "energy", "ecc", "reasons", "gpm", "events", "pcie")
    before = {call: calls_made(fake_nvml, call) for call in calls}
    reader = nvml_reader(groups={"seed"})
    device = devices_after(reader, polls=3)[gpu_uuid(0)]
    assert set(device.metrics) == {"gpu_memory_utilization_ratio"}
    assert device.duty_cycle_percent is not None
    assert {call: calls_made(fake_nvml, call) - n for call, n in before.items()} == dict.fromkeys(calls, 0)


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def xids_of(reader: NvmlReader) -> dict[str, dict[tuple[str, ...], float]]:
    devices = reader.poll(interval_s=1.0, deadline_s=5.0).devices
    return {d.uuid: as_dict(d, "gpu_xid_errors_total") for d in devices if "gpu_xid_errors_total" in d.metrics}


def test_xid_events_are_counted_once_each_on_the_right_device(scenario_file: Path, nvml_reader: MakeReader) -> None:
    scenario = Scenario(
        gpus=[Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1), name="NVIDIA A100-SXM4-40GB", mig=True)],
        migs=[Mig(parent=1, uuid=mig_uuid(0), gi=1), Mig(parent=1, uuid=mig_uuid(1), gi=2)],
    )
    scenario.write(scenario_file)
    reader = nvml_reader()
    reader.poll(interval_s=1.0, deadline_s=5.0)
    wait_until(lambda: reader.xid_gpus_watched == 2, what="both GPUs registered")
    assert xids_of(reader) == {}  # no event yet: absent, not 0
    scenario.xids += [Xid(gpu=0, code=79), Xid(gpu=1, code=94, gi=2), Xid(gpu=0, code=79), Xid(gpu=0, code=48)]
    scenario.write(scenario_file)
    expected = {
        gpu_uuid(0): {("79",): 2.0, ("48",): 1.0},
        mig_uuid(1): {("94",): 1.0},  # the event named GPU instance 2: that MIG device, not its GPU
    }
    wait_until(lambda: xids_of(reader) == expected, what="the four events counted")
    for util in (1, 2, 3):  # the library re-reads the file; nothing is delivered twice
        scenario.gpus[0].util = util
        scenario.write(scenario_file)
        time.sleep(0.3)
        assert xids_of(reader) == expected


def test_the_xid_watcher_recovers_from_a_failed_registration(
    scenario_file: Path, nvml_reader: MakeReader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.nvmlevents")
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), fail={"events": 999})])
    scenario.write(scenario_file)
    reader = nvml_reader()
    reader.poll(interval_s=1.0, deadline_s=5.0)
    wait_until(lambda: any("retrying with backoff" in r.getMessage() for r in caplog.records), what="the failure")
    scenario.gpus[0].fail = {}
    scenario.write(scenario_file)
    wait_until(lambda: reader.xid_gpus_watched == 1, timeout_s=5, what="registration after the backoff")
    scenario.xids.append(Xid(gpu=0, code=119))
    scenario.write(scenario_file)
    wait_until(lambda: xids_of(reader) == {gpu_uuid(0): {("119",): 1.0}}, what="the event after recovery")
    failures = [r for r in caplog.records if "retrying with backoff" in r.getMessage()]
    assert len(failures) == 1  # one line per change of state, not one per retry


def test_an_event_wait_that_times_out_at_once_is_floored(
    scenario_file: Path, nvml_reader: MakeReader, fake_nvml: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exporter.sources.nvmlevents")
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0))], instant_timeout=True)
    scenario.write(scenario_file)
    reader = nvml_reader()
    reader.poll(interval_s=1.0, deadline_s=5.0)
    wait_until(lambda: reader.xid_gpus_watched == 1, what="the GPU registered")
    before = calls_made(fake_nvml, "eventwait")
    time.sleep(1.0)
    waits = calls_made(fake_nvml, "eventwait") - before
    assert waits <= 3, f"{waits} waits in a second: the watcher spins"  # a backoff apart, not a tight loop
    said = [r.getMessage() for r in caplog.records if "timed out at once" in r.getMessage()]
    assert len(said) == 1, said  # one line for the state, not one per wait
    scenario.xids.append(Xid(gpu=0, code=79))  # still registered: the event is seen after the pause
    scenario.write(scenario_file)
    wait_until(lambda: xids_of(reader) == {gpu_uuid(0): {("79",): 1.0}}, what="the event after the backoff")


def test_metrics_flag_names_unknown_groups_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--metrics", "seed,helth"], environ={})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--metrics" in err and "'helth'" in err
    assert parse_config(["--metrics", "health"], environ={}).metric_groups == {"seed", "health"}
    assert parse_config([], environ={"GPU_EXPORTER_METRICS": "clocks,power"}).metric_groups == {
        "seed",
        "clocks",
        "power",
    }


def scrape_typed(url: str) -> dict[str, str]:
    """Family name -> its TYPE, from the agent's exposition."""
    text = requests.get(url + "/metrics", timeout=5).text
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_the_agent_exports_every_family_per_device_and_the_pod_join(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    node.scenario.gpus[0] = busy_h100(util=42, used=9_000_000_000)
    node.scenario.gpus[1].name = "NVIDIA A100-SXM4-80GB"  # no GPM
    node.scenario.write(node.scenario_path)
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    samples = agent.wait_for(lambda s: find(s, "gpu_sm_active_ratio") != [], what="GPM values")
    device_labels = {"node": "gpu-node-1", "gpu": "0", "uuid": gpu_uuid(0), "model": "NVIDIA H100 80GB HBM3"}
    for family, expected in EXPECTED.items():
        got = find(samples, family, uuid=gpu_uuid(0))
        assert got, family
        for labels, value in got:
            extra = tuple(v for k, v in sorted(labels.items()) if k not in device_labels)
            assert {k: labels[k] for k in device_labels} == device_labels, family  # no pod labels
            assert value == pytest.approx(expected[extra]), (family, extra)
    assert find(samples, "gpu_sm_active_ratio", uuid=gpu_uuid(1)) == []
    # One info series per (device, pod) carries the pod; the seed families keep their pod labels.
    assert find(samples, "gpu_pod_info") == [
        ({"node": "gpu-node-1", "gpu": "0", "uuid": gpu_uuid(0), "namespace": "default", "pod": BERT,
          "container": "server"}, 1.0)
    ]  # fmt: skip
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(0))[0][0]["pod"] == BERT
    types = scrape_typed(agent.url)
    for device_family in DEVICE_FAMILIES:
        if device_family.name in EXPECTED:
            assert types[device_family.name.removesuffix("_total")] == device_family.type, device_family.name


def test_the_agent_counts_xid_events_and_a_new_code_appears_at_one(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    wait_until(lambda: "Xid events: watching 2 of 2 GPUs" in agent.log(), what="the agent watching Xid events")
    node.scenario.xids.append(Xid(gpu=1, code=79))
    node.scenario.write(node.scenario_path)
    samples = agent.wait_for(lambda s: find(s, "gpu_xid_errors_total") != [], what="the Xid counted")
    assert find(samples, "gpu_xid_errors_total") == [
        ({"node": "gpu-node-1", "gpu": "1", "uuid": gpu_uuid(1), "model": "NVIDIA H100 80GB HBM3", "xid": "79"}, 1.0)
    ]
    assert re.search(r"GPU-00000001\S*: Xid 79", agent.log())


def test_the_agent_with_seed_only_exports_no_other_family(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes", "--metrics", "seed"], node.scenario_path)
    agent.wait_for(lambda s: len(find(s, "duty_cycle_current")) == 2, what="both GPUs")
    names = set(scrape_typed(agent.url))
    exported = {f.name.removesuffix("_total") for f in DEVICE_FAMILIES} & names
    assert exported == {"gpu_memory_utilization_ratio"}
    assert "Xid events" not in agent.log()
