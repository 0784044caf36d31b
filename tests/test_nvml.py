"""The NVML reader through the real pynvml bindings, over the fake libnvidia-ml.so.1."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from exporter.nvml import NvmlReader
from tests.sim.scenario import GIB, NVML_ERROR_DRIVER_NOT_LOADED, Gpu, Mig, Proc, Scenario, gpu_uuid, mig_uuid


def by_uuid(reader: NvmlReader, deadline_s: float = 2.0):  # type: ignore[no-untyped-def]
    result = reader.poll(interval_s=1.0, deadline_s=deadline_s)
    return {d.uuid: d for d in result.devices}, result.errors


def test_reads_every_value_of_every_gpu(scenario_file: Path) -> None:
    Scenario(
        gpus=[
            Gpu(gpu_uuid(0), util=42, used=3 * GIB, reserved=1 * GIB, temp=61, power=312_500),
            Gpu(gpu_uuid(1), name="NVIDIA A10", util=7, minor=4),
        ],
        procs=[Proc(gpu=0, pid=4242, mem=2 * GIB, sm=30), Proc(gpu=0, pid=4243, mem=GIB, sm=0)],
    ).write(scenario_file)
    devices, errors = by_uuid(NvmlReader())
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


def test_not_supported_values_are_absent_not_zero(scenario_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exporter.nvml")
    Scenario(gpus=[Gpu(gpu_uuid(0), unsupported=("power", "temp")), Gpu(gpu_uuid(1))]).write(scenario_file)
    reader = NvmlReader()
    devices, errors = by_uuid(reader)
    by_uuid(reader)
    assert devices[gpu_uuid(0)].power_milliwatts is None
    assert devices[gpu_uuid(0)].temperature_celsius is None
    assert devices[gpu_uuid(0)].duty_cycle_percent is not None
    assert devices[gpu_uuid(1)].power_milliwatts == 100_000.0
    assert errors == ()  # unsupported is not an error
    logged = [r.message for r in caplog.records if "not supported" in r.message]
    assert len(logged) == 2, logged  # once per value, not once per poll


def test_older_drivers_fall_back_to_v1_memory_and_legacy_temperature(scenario_file: Path) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), used=3 * GIB, reserved=GIB, temp=70, unsupported=("memv2", "tempv"))]).write(
        scenario_file
    )
    devices, _ = by_uuid(NvmlReader())
    assert devices[gpu_uuid(0)].memory_used_bytes == 4 * GIB  # v1 counts reserved as used
    assert devices[gpu_uuid(0)].temperature_celsius == 70.0


def test_a_failing_value_is_counted_and_left_out(scenario_file: Path) -> None:
    Scenario(gpus=[Gpu(gpu_uuid(0), fail={"power": 999})]).write(scenario_file)
    devices, errors = by_uuid(NvmlReader())
    assert devices[gpu_uuid(0)].power_milliwatts is None
    assert devices[gpu_uuid(0)].duty_cycle_percent == 0.0
    assert errors == (("0", gpu_uuid(0), "UNKNOWN"),)


def test_lost_gpu_is_dropped_and_counted_then_picked_up_again(scenario_file: Path) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), util=10), Gpu(gpu_uuid(1), util=20)])
    scenario.write(scenario_file)
    reader = NvmlReader()
    assert set(by_uuid(reader)[0]) == {gpu_uuid(0), gpu_uuid(1)}
    scenario.gpus[0].lost = True
    scenario.write(scenario_file)
    devices, errors = by_uuid(reader)
    assert set(devices) == {gpu_uuid(1)}
    assert errors == (("0", gpu_uuid(0), "GPU_IS_LOST"),)
    scenario.gpus[0].lost = False
    scenario.write(scenario_file)
    assert set(by_uuid(reader)[0]) == {gpu_uuid(0), gpu_uuid(1)}


def test_a_blocked_gpu_does_not_hold_up_the_others(scenario_file: Path) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0), util=10), Gpu(gpu_uuid(1), util=20)])
    scenario.write(scenario_file)
    reader = NvmlReader()
    fresh, _ = by_uuid(reader)
    scenario.gpus[0].block = {"util": 3}
    scenario.write(scenario_file)
    started = time.monotonic()
    devices, _ = by_uuid(reader, deadline_s=0.3)
    assert time.monotonic() - started < 1.5
    # The stuck GPU keeps its last reading, with its old sample time, for staleness to judge.
    assert devices[gpu_uuid(0)].sampled_at == fresh[gpu_uuid(0)].sampled_at
    assert devices[gpu_uuid(1)].sampled_at > fresh[gpu_uuid(1)].sampled_at
    scenario.gpus[0].block = {}
    scenario.write(scenario_file)
    # While the stuck read is still running it is not asked again; once it returns, GPU 0 is read afresh.
    devices, _ = by_uuid(reader, deadline_s=0.3)
    assert devices[gpu_uuid(0)].sampled_at == fresh[gpu_uuid(0)].sampled_at
    time.sleep(3)
    by_uuid(reader)
    devices, _ = by_uuid(reader)
    assert devices[gpu_uuid(0)].sampled_at > fresh[gpu_uuid(0)].sampled_at


def test_mig_devices_and_their_processes(scenario_file: Path) -> None:
    Scenario(
        gpus=[Gpu(gpu_uuid(0), name="NVIDIA A100-SXM4-40GB", mig=True, total=40 * GIB)],
        migs=[Mig(parent=0, uuid=mig_uuid(0), gi=1, used=GIB), Mig(parent=0, uuid=mig_uuid(1), gi=2, used=2 * GIB)],
        procs=[Proc(gpu=0, pid=500, mem=None, gi=1), Proc(gpu=0, pid=501, mem=None, gi=2)],
    ).write(scenario_file)
    devices, errors = by_uuid(NvmlReader())
    parent, first, second = devices[gpu_uuid(0)], devices[mig_uuid(0)], devices[mig_uuid(1)]
    assert parent.duty_cycle_percent is None  # NVML has no utilisation in MIG mode
    assert parent.processes == ()
    assert (first.parent_uuid, first.gpu_instance_id, first.memory_used_bytes) == (gpu_uuid(0), 1, GIB)
    assert first.model == "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
    assert [p.pid for p in first.processes or ()] == [500]
    assert [p.pid for p in second.processes or ()] == [501]
    assert first.processes and first.processes[0].used_memory_bytes is None
    assert errors == ()


def test_driver_not_loaded_then_loaded(scenario_file: Path) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0))], init_rc=NVML_ERROR_DRIVER_NOT_LOADED)
    scenario.write(scenario_file)
    reader = NvmlReader(retry_min_s=0.05)
    assert by_uuid(reader)[0] == {}
    assert not reader.initialised
    assert "DRIVER_NOT_LOADED" in reader.status
    scenario.init_rc = 0
    scenario.write(scenario_file)
    time.sleep(0.1)
    assert set(by_uuid(reader)[0]) == {gpu_uuid(0)}
    assert reader.initialised
