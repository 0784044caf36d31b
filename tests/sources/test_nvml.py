"""The NVML reader through the real pynvml bindings, over the fake libnvidia-ml.so.1."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest
import requests

from exporter.sources.nvml import NvmlReader
from sim.fakelib import build_fake_nvml
from sim.scenario import GIB, NVML_ERROR_DRIVER_NOT_LOADED, Gpu, Mig, Proc, Scenario, gpu_uuid, mig_uuid
from tests.conftest import Node, find

ROOT = Path(__file__).resolve().parents[2]
MakeReader = Callable[..., NvmlReader]  # the nvml_reader fixture


def by_uuid(reader: NvmlReader, deadline_s: float = 2.0):  # type: ignore[no-untyped-def]
    result = reader.poll(interval_s=1.0, deadline_s=deadline_s)
    return {d.uuid: d for d in result.devices}, result.errors


def calls_made(fake_nvml: Path, call: str) -> int:
    """How often the fake library was asked ``call`` (its scenario name), across devices."""
    library = ctypes.CDLL(str(fake_nvml))
    library.fakeNvmlCallCount.restype = ctypes.c_ulonglong
    return int(library.fakeNvmlCallCount(call.encode()))


def older_driver(directory: Path, *missing: str) -> Path:
    """A directory holding a libnvidia-ml.so.1 without the C symbols ``missing``."""
    return build_fake_nvml(without=missing, directory=directory).parent


# Polls in a process of its own: one with an older driver's library loaded (pynvml caches the
# library and its function pointers per process). Prints each poll's devices and errors as JSON.
_POLL_IN_A_PROCESS = """
import json, logging, sys
from exporter.sources.nvml import NvmlReader
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
reader = NvmlReader()
for _ in range(int(sys.argv[1])):
    poll = reader.poll(interval_s=1.0, deadline_s=5.0)
    print(json.dumps({
        "devices": {d.uuid: {"temperature": d.temperature_celsius, "memory": d.memory_used_bytes,
                             "duty": d.duty_cycle_percent, "power": d.power_milliwatts,
                             "metrics": d.metrics} for d in poll.devices},
        "errors": poll.errors,
    }))
reader.close()
"""


def poll_in_a_process(library_dir: Path, scenario: Path, polls: int) -> tuple[list[dict], str]:  # type: ignore[type-arg]
    env = {**os.environ, "LD_LIBRARY_PATH": str(library_dir), "FAKE_NVML_SCENARIO": str(scenario)}
    done = subprocess.run(
        [sys.executable, "-c", _POLL_IN_A_PROCESS, str(polls)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_reads_every_value_of_every_gpu(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(
        gpus=[
            Gpu(gpu_uuid(0), util=42, used=3 * GIB, reserved=1 * GIB, temp=61, power=312_500),
            Gpu(gpu_uuid(1), name="NVIDIA A10", util=7, minor=4),
        ],
        procs=[Proc(gpu=0, pid=4242, mem=2 * GIB, sm=30), Proc(gpu=0, pid=4243, mem=GIB, sm=0)],
    ).write(scenario_file)
    devices, errors = by_uuid(nvml_reader())
    first = devices[gpu_uuid(0)]
    assert (first.index, first.model, first.minor_number) == (0, "NVIDIA H100 80GB HBM3", 0)
    assert first.duty_cycle_percent == 42.0
    assert first.memory_used_bytes == 3 * GIB  # v2: the driver's reservation is not "used"
    assert first.memory_total_bytes == 80 * GIB
    assert (first.temperature_celsius, first.power_milliwatts) == (61.0, 312_500.0)
    assert [(p.pid, p.used_memory_bytes) for p in first.processes or ()] == [(4242, 2 * GIB), (4243, GIB)]
    assert first.process_sm_percent == {4242: 30.0}
    assert devices[gpu_uuid(1)].minor_number == 4
    assert errors == ()


def test_not_supported_values_are_absent_not_zero(
    scenario_file: Path, nvml_reader: MakeReader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.nvmlquery")
    Scenario(gpus=[Gpu(gpu_uuid(0), unsupported=("power", "temp")), Gpu(gpu_uuid(1))]).write(scenario_file)
    reader = nvml_reader()
    devices, errors = by_uuid(reader)
    by_uuid(reader)
    assert devices[gpu_uuid(0)].power_milliwatts is None
    assert devices[gpu_uuid(0)].temperature_celsius is None
    assert devices[gpu_uuid(0)].duty_cycle_percent is not None
    assert devices[gpu_uuid(1)].power_milliwatts == 100_000.0
    assert errors == ()  # unsupported is not an error
    logged = [r.message for r in caplog.records if "not supported" in r.message]
    assert len(logged) == 2, logged  # once per value, not once per poll


def test_older_drivers_fall_back_to_v1_memory_and_legacy_temperature(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), used=3 * GIB, reserved=GIB, temp=70, unsupported=("memv2", "tempv"))]).write(
        scenario_file
    )
    devices, _ = by_uuid(nvml_reader())
    assert devices[gpu_uuid(0)].memory_used_bytes == 4 * GIB  # v1 counts reserved as used
    assert devices[gpu_uuid(0)].temperature_celsius == 70.0


def test_a_failing_value_is_counted_and_left_out(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), fail={"power": 999})]).write(scenario_file)
    devices, errors = by_uuid(nvml_reader())
    assert devices[gpu_uuid(0)].power_milliwatts is None
    assert devices[gpu_uuid(0)].duty_cycle_percent == 0.0
    assert errors == (("0", gpu_uuid(0), "UNKNOWN"),)


def test_lost_gpu_is_dropped_and_counted_then_picked_up_again(scenario_file: Path, nvml_reader: MakeReader) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), util=10), Gpu(gpu_uuid(1), util=20)])
    scenario.write(scenario_file)
    reader = nvml_reader()
    assert set(by_uuid(reader)[0]) == {gpu_uuid(0), gpu_uuid(1)}
    scenario.gpus[0].lost = True
    scenario.write(scenario_file)
    devices, errors = by_uuid(reader)
    assert set(devices) == {gpu_uuid(1)}
    assert errors == (("0", gpu_uuid(0), "GPU_IS_LOST"),)
    scenario.gpus[0].lost = False
    scenario.write(scenario_file)
    assert set(by_uuid(reader)[0]) == {gpu_uuid(0), gpu_uuid(1)}


def gpu_0_blocking(scenario_file: Path, nvml_reader: MakeReader, seconds: float):  # type: ignore[no-untyped-def]
    """Two GPUs read once, then GPU 0's utilisation call blocking for ``seconds``: the scenario,
    the reader and the first readings."""
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), util=10), Gpu(gpu_uuid(1), util=20)])
    scenario.write(scenario_file)
    reader = nvml_reader()
    fresh, _ = by_uuid(reader)
    scenario.gpus[0].block = {"util": seconds}
    scenario.write(scenario_file)
    return scenario, reader, fresh


def test_a_blocked_gpu_does_not_hold_up_the_others(scenario_file: Path, nvml_reader: MakeReader) -> None:
    scenario, reader, fresh = gpu_0_blocking(scenario_file, nvml_reader, 3)
    started = time.monotonic()
    devices, _ = by_uuid(reader, deadline_s=0.3)
    assert time.monotonic() - started < 1.5
    # The stuck GPU keeps its last reading, with its old sample time, for staleness to judge.
    assert devices[gpu_uuid(0)].sampled_at == fresh[gpu_uuid(0)].sampled_at
    assert devices[gpu_uuid(1)].sampled_at > fresh[gpu_uuid(1)].sampled_at
    scenario.gpus[0].block = {}
    scenario.write(scenario_file)
    # While the stuck read is still running it is not asked again; once it returns, GPU 0 is read afresh.
    for _ in range(3):
        devices, _ = by_uuid(reader, deadline_s=0.3)
        assert devices[gpu_uuid(0)].sampled_at == fresh[gpu_uuid(0)].sampled_at
    # One thread is left to the stuck call, one reads the rest: polls do not pile threads up.
    assert len([t for t in threading.enumerate() if t.name.startswith("nvml-read")]) == 2
    time.sleep(3)
    by_uuid(reader)
    devices, _ = by_uuid(reader)
    assert devices[gpu_uuid(0)].sampled_at > fresh[gpu_uuid(0)].sampled_at


def test_a_stalled_read_is_logged_once_when_it_stalls_and_once_when_it_recovers(
    scenario_file: Path, nvml_reader: MakeReader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.nvml")
    scenario, reader, fresh = gpu_0_blocking(scenario_file, nvml_reader, 1.5)
    for _ in range(3):
        by_uuid(reader, deadline_s=0.3)
        assert reader.stalled_gpus == {0}
    scenario.gpus[0].block = {}
    scenario.write(scenario_file)
    deadline = time.monotonic() + 5
    while by_uuid(reader, deadline_s=0.3)[0][gpu_uuid(0)].sampled_at == fresh[gpu_uuid(0)].sampled_at:
        assert time.monotonic() < deadline, "GPU 0 was not read again once its call returned"
        time.sleep(0.05)
    assert reader.stalled_gpus == frozenset()
    lines = [r.getMessage() for r in caplog.records if "GPU 0" in r.getMessage()]
    assert len(lines) == 2, lines  # not once per poll
    assert "a read has not returned" in lines[0]
    assert "GPU 0 recovered" in lines[1] and gpu_uuid(0) in lines[1]


def test_a_gpu_that_begins_to_hang_late_in_a_poll_does_not_hold_up_the_gpus_behind_it(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(i), util=10 + i) for i in range(6)])
    scenario.write(scenario_file)
    reader = nvml_reader()
    fresh, _ = by_uuid(reader)
    # GPUs 0-3 answer slowly, each within the stall bound (a quarter of 0.8 s): GPU 4 starts to hang
    # too late in the poll for the stall to be seen before its deadline; GPU 5 is queued behind it.
    for gpu in scenario.gpus[:4]:
        gpu.block = {"util": 0.18}
    scenario.gpus[4].block = {"util": 2}
    scenario.write(scenario_file)
    by_uuid(reader, deadline_s=0.8)
    devices, _ = by_uuid(reader, deadline_s=0.8)
    assert devices[gpu_uuid(5)].sampled_at > fresh[gpu_uuid(5)].sampled_at  # read by the next poll
    assert devices[gpu_uuid(4)].sampled_at == fresh[gpu_uuid(4)].sampled_at  # the hung one keeps its last
    assert len([t for t in threading.enumerate() if t.name.startswith("nvml-read")]) <= 2
    for gpu in scenario.gpus:
        gpu.block = {}
    scenario.write(scenario_file)
    time.sleep(2)  # the hung call returns before the reader is closed


def test_mig_devices_and_their_processes(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(
        gpus=[Gpu(gpu_uuid(0), name="NVIDIA A100-SXM4-40GB", mig=True, total=40 * GIB)],
        migs=[Mig(parent=0, uuid=mig_uuid(0), gi=1, used=GIB), Mig(parent=0, uuid=mig_uuid(1), gi=2, used=2 * GIB)],
        procs=[Proc(gpu=0, pid=500, mem=None, gi=1), Proc(gpu=0, pid=501, mem=None, gi=2)],
    ).write(scenario_file)
    devices, errors = by_uuid(nvml_reader())
    parent, first, second = devices[gpu_uuid(0)], devices[mig_uuid(0)], devices[mig_uuid(1)]
    assert parent.duty_cycle_percent is None  # NVML has no utilisation in MIG mode
    assert parent.processes == ()
    assert (first.parent_uuid, first.gpu_instance_id, first.memory_used_bytes) == (gpu_uuid(0), 1, GIB)
    assert first.model == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    assert [p.pid for p in first.processes or ()] == [500]
    assert [p.pid for p in second.processes or ()] == [501]
    assert first.processes and first.processes[0].used_memory_bytes is None
    assert errors == ()


def test_driver_not_loaded_then_loaded(scenario_file: Path, nvml_reader: MakeReader) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0))], init_rc=NVML_ERROR_DRIVER_NOT_LOADED)
    scenario.write(scenario_file)
    reader = nvml_reader(retry_min_s=0.05)
    assert by_uuid(reader)[0] == {}
    assert not reader.initialised
    assert "DRIVER_NOT_LOADED" in reader.status
    scenario.init_rc = 0
    scenario.write(scenario_file)
    time.sleep(0.1)
    assert set(by_uuid(reader)[0]) == {gpu_uuid(0)}
    assert reader.initialised


def test_a_name_that_is_no_utf8_is_decoded_with_replacement(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(
        gpus=[
            Gpu(gpu_uuid(0), name=b"NVIDIA H100 \xff80GB", util=42, temp=61),
            Gpu(gpu_uuid(1), name="NVIDIA A100-SXM4-40GB", mig=True),
        ],
        migs=[Mig(parent=1, uuid=mig_uuid(0), gi=1, name=b"NVIDIA A100 MIG \xfe1g", used=GIB)],
    ).write(scenario_file)
    reader = nvml_reader()
    for _ in range(3):  # every poll, not just the first: the fault never stops polling
        devices, errors = by_uuid(reader)
        assert devices[gpu_uuid(0)].model == "NVIDIA H100 \ufffd80GB"
        assert (devices[gpu_uuid(0)].duty_cycle_percent, devices[gpu_uuid(0)].temperature_celsius) == (42.0, 61.0)
        assert devices[mig_uuid(0)].model == "NVIDIA A100 MIG \ufffd1g"
        assert devices[mig_uuid(0)].memory_used_bytes == GIB
        assert errors == ()


def test_the_call_variant_that_answers_is_remembered(
    scenario_file: Path, nvml_reader: MakeReader, fake_nvml: Path
) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), used=3 * GIB, reserved=GIB, temp=70, unsupported=("memv2", "tempv"))]).write(
        scenario_file
    )
    reader = nvml_reader()
    before = {call: calls_made(fake_nvml, call) for call in ("memv2", "mem", "tempv", "temp")}
    for _ in range(4):
        devices, _ = by_uuid(reader)
        assert devices[gpu_uuid(0)].memory_used_bytes == 4 * GIB
        assert devices[gpu_uuid(0)].temperature_celsius == 70.0
    made = {call: calls_made(fake_nvml, call) - n for call, n in before.items()}
    # The newer calls are asked once (tempv not at all with bindings that lack it), not every poll.
    assert (made["memv2"], made["mem"], made["temp"]) == (1, 4, 4)
    assert made["tempv"] <= 1


def test_a_function_missing_from_the_driver_leaves_only_its_value_out(scenario_file: Path, tmp_path: Path) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), util=42, temp=61, used=3 * GIB), Gpu(gpu_uuid(1), util=7)]).write(scenario_file)
    library = older_driver(tmp_path / "old", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
    polls, log = poll_in_a_process(library, scenario_file, polls=3)
    for poll in polls:
        first = poll["devices"][gpu_uuid(0)]
        assert first["temperature"] is None
        assert (first["duty"], first["memory"], first["power"]) == (42.0, 3 * GIB, 100_000.0)
        assert poll["devices"][gpu_uuid(1)]["duty"] == 7.0
        assert poll["errors"] == []
    # Logged once each (TemperatureV may be missing from the bindings already, as in nvidia-ml-py 12.535).
    assert log.count("nvmlDeviceGetTemperatureV is not in") == 1, log
    assert log.count("nvmlDeviceGetTemperature is not in the driver") == 1, log


def test_an_older_driver_without_the_versioned_call_uses_the_older_one(scenario_file: Path, tmp_path: Path) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), temp=61, used=3 * GIB, reserved=GIB)]).write(scenario_file)
    library = older_driver(tmp_path / "old", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetMemoryInfo_v2")
    polls, _ = poll_in_a_process(library, scenario_file, polls=2)
    assert [p["devices"][gpu_uuid(0)]["temperature"] for p in polls] == [61.0, 61.0]
    assert [p["devices"][gpu_uuid(0)]["memory"] for p in polls] == [4 * GIB, 4 * GIB]  # v1: reserved is used


def test_a_lost_gpu_keeps_its_uuid_and_is_logged_once_per_change(
    scenario_file: Path, nvml_reader: MakeReader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.nvml")
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1))])
    scenario.write(scenario_file)
    reader = nvml_reader()
    by_uuid(reader)
    scenario.gpus[0].lost = True
    scenario.write(scenario_file)
    for _ in range(3):
        devices, errors = by_uuid(reader)
        assert set(devices) == {gpu_uuid(1)}
        assert errors == (("0", gpu_uuid(0), "GPU_IS_LOST"),)  # never a second series with uuid=""
    scenario.gpus[0].lost = False
    scenario.write(scenario_file)
    by_uuid(reader)
    by_uuid(reader)
    lines = [r.getMessage() for r in caplog.records if "GPU 0" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "is lost (GPU_IS_LOST)" in lines[0] and gpu_uuid(0) in lines[0]
    assert "answering again" in lines[1]


def test_a_gpu_that_cannot_tell_its_uuid_is_dropped_counted_and_read_again(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), util=10), Gpu(gpu_uuid(1), util=20)])
    scenario.write(scenario_file)
    reader = nvml_reader()
    by_uuid(reader)
    scenario.gpus[0].fail = {"uuid": 999}
    scenario.write(scenario_file)
    devices, errors = by_uuid(reader)
    assert set(devices) == {gpu_uuid(1)}
    assert errors == (("0", gpu_uuid(0), "UNKNOWN"),)
    scenario.gpus[0].fail = {}
    scenario.write(scenario_file)
    assert by_uuid(reader)[0][gpu_uuid(0)].duty_cycle_percent == 10.0


def test_close_stops_the_reader_threads_and_shuts_nvml_down(scenario_file: Path, nvml_reader: MakeReader) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1))]).write(scenario_file)
    before = set(threading.enumerate())
    reader = nvml_reader()
    assert len(by_uuid(reader)[0]) == 2
    started = set(threading.enumerate()) - before
    assert {t.name for t in started} == {"nvml-read-0", "nvml-events"}  # one thread reads both GPUs
    reader.close()
    for thread in started:  # the events thread ends when its wait (up to a second) returns
        thread.join(timeout=2)
    assert not [t for t in started if t.is_alive()]
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    assert reader.poll(interval_s=1.0, deadline_s=1.0).devices == ()


def test_the_agent_exports_a_gpu_whose_name_is_no_utf8(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    node.scenario.gpus[1].name = b"NVIDIA A10 \xfe"
    node.scenario.write(node.scenario_path)
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    samples = agent.wait_for(lambda s: len(find(s, "duty_cycle_current")) == 2, what="both GPUs")
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(1))[0][0]["model"] == "NVIDIA A10 \ufffd"
    node.scenario.gpus[1].util = 77  # polling goes on
    node.scenario.write(node.scenario_path)
    agent.wait_for(lambda s: [v for _, v in find(s, "duty_cycle_current", uuid=gpu_uuid(1))] == [77], what="77 %")
    assert requests.get(agent.url + "/readyz", timeout=5).status_code == 200


def test_the_agent_with_a_driver_missing_a_function(node: Node, start_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    library = older_driver(tmp_path / "old", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature")
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path, library_dir=library)
    samples = agent.wait_for(lambda s: len(find(s, "power_usage_milliwatts_current")) == 2, what="both GPUs")
    assert find(samples, "temperature_celsius_current") == []
    assert find(samples, "duty_cycle_current", uuid=gpu_uuid(0))[0][1] == 42
    node.scenario.gpus[0].util = 55  # polling goes on
    node.scenario.write(node.scenario_path)
    agent.wait_for(lambda s: [v for _, v in find(s, "duty_cycle_current", uuid=gpu_uuid(0))] == [55], what="55 %")
    assert requests.get(agent.url + "/readyz", timeout=5).status_code == 200
    assert agent.log().count("nvmlDeviceGetTemperature is not in the driver") == 1
