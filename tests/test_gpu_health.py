"""One answer to "is this GPU healthy?" (issue 18, part 2): each rule of the table in force on a GPU
read through the real pynvml bindings from the fake libnvidia-ml.so.1, the recovery action field on a
driver that offers it and absent on one that does not, Xids within and outside the window, a lost
GPU, the agent's series, the flag and the README's table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.attribution.health import RULES, SEVERITIES, gpu_health
from exporter.catalogue import SLOW_EVERY
from exporter.config import parse_config
from exporter.model import GpuHealth
from exporter.sources.nvml import NvmlPoll, NvmlReader
from sim.scenario import Gpu, Mig, Scenario, Xid, gpu_uuid, mig_uuid
from tests.conftest import Node, find
from tests.test_health import wait_until

MakeReader = Callable[..., NvmlReader]
README = Path(__file__).resolve().parent.parent / "README.md"
HOUR = 3600.0
STALENESS = 3.0


def verdicts(
    poll: NvmlPoll, now: float | None = None, window_s: float = HOUR, staleness_s: float = STALENESS
) -> dict[str, GpuHealth]:
    now = time.monotonic() if now is None else now
    return {v.uuid: v for v in gpu_health(poll.devices, poll.lost, now, window_s, staleness_s)}


def answer(verdict: GpuHealth) -> tuple[int, dict[str, str]]:
    return verdict.status, dict(verdict.reasons)


# A GPU as the scenario sets it -> (status, {reason: severity}).
CASES: dict[str, tuple[Gpu, tuple[int, dict[str, str]]]] = {
    "healthy": (Gpu(gpu_uuid(0)), (0, {})),
    "row remap pending": (Gpu(gpu_uuid(0), remap_pending=True), (1, {"row_remap_pending": "degraded"})),
    "row remap failure": (Gpu(gpu_uuid(0), remap_failed=True), (2, {"row_remap_failure": "unhealthy"})),
    "uncorrectable ECC": (Gpu(gpu_uuid(0), ecc_uncorrected=1), (2, {"uncorrectable_ecc": "unhealthy"})),
    "corrected ECC only": (Gpu(gpu_uuid(0), ecc_corrected=50, remapped_correctable=2), (0, {})),
    "hw thermal slowdown": (Gpu(gpu_uuid(0), clock_reasons=0x40), (1, {"thermal_slowdown": "degraded"})),
    "sw thermal slowdown": (Gpu(gpu_uuid(0), clock_reasons=0x20), (1, {"thermal_slowdown": "degraded"})),
    "power brake": (Gpu(gpu_uuid(0), clock_reasons=0x80), (1, {"power_brake_slowdown": "degraded"})),
    "power cap and idle": (Gpu(gpu_uuid(0), clock_reasons=0x5), (0, {})),  # not faults
    "health reads unsupported": (
        Gpu(gpu_uuid(0), unsupported=("ecc", "remap", "reasons")),
        (1, {"unknown": "degraded"}),
    ),
    "ECC unsupported only": (
        Gpu(gpu_uuid(0), unsupported=("ecc",), remap_pending=True),
        (1, {"row_remap_pending": "degraded"}),
    ),
    "several": (
        Gpu(gpu_uuid(0), remap_pending=True, ecc_uncorrected=3, clock_reasons=0x80),
        (2, {"uncorrectable_ecc": "unhealthy", "row_remap_pending": "degraded", "power_brake_slowdown": "degraded"}),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_from_the_gpus_own_reads(scenario_file: Path, nvml_reader: MakeReader, case: str) -> None:
    gpu, expected = CASES[case]
    Scenario(gpus=[gpu]).write(scenario_file)
    poll = nvml_reader().poll(interval_s=1.0, deadline_s=5.0)
    assert answer(verdicts(poll)[gpu_uuid(0)]) == expected


def test_the_recovery_action_where_the_driver_offers_it_and_absent_where_not(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    gpus = [Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1), recovery_action=1), Gpu(gpu_uuid(2), recovery_action=3)]
    scenario = Scenario(gpus=gpus, recovery_field=True)
    scenario.write(scenario_file)
    reader = nvml_reader()
    poll = reader.poll(interval_s=1.0, deadline_s=5.0)
    actions = {d.uuid: {a: v for (a,), v in d.metrics["gpu_recovery_action"] if v} for d in poll.devices}
    assert actions == {gpu_uuid(0): {"none": 1.0}, gpu_uuid(1): {"gpu_reset": 1.0}, gpu_uuid(2): {"drain_p2p": 1.0}}
    assert {uuid: answer(v) for uuid, v in verdicts(poll).items()} == {
        gpu_uuid(0): (0, {}),
        gpu_uuid(1): (2, {"recovery_gpu_reset": "unhealthy"}),
        gpu_uuid(2): (1, {"recovery_drain_p2p": "degraded"}),
    }
    older = nvml_reader()  # a driver without the field answers the call but not the field
    scenario.recovery_field = False
    scenario.write(scenario_file)
    poll = older.poll(interval_s=1.0, deadline_s=5.0)
    assert not any("gpu_recovery_action" in d.metrics for d in poll.devices)  # absent, never guessed
    assert [answer(v) for v in verdicts(poll).values()] == [(0, {})] * 3


def test_xids_needing_a_reset_or_a_reboot_count_within_the_window_only(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    scenario = Scenario(
        gpus=[Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1), mig=True), Gpu(gpu_uuid(2))],
        migs=[Mig(parent=1, uuid=mig_uuid(0), gi=1)],
    )
    scenario.write(scenario_file)
    reader = nvml_reader()
    reader.poll(interval_s=1.0, deadline_s=5.0)
    wait_until(lambda: reader.xid_gpus_watched == 3, what="the GPUs registered")
    # 13 (an application's fault) is no reason; 48 on a GPU instance is its GPU's.
    scenario.xids += [Xid(gpu=0, code=79), Xid(gpu=1, code=48, gi=1), Xid(gpu=2, code=13)]
    scenario.write(scenario_file)
    polls: list[NvmlPoll] = []

    def seen_all() -> bool:
        polls.append(reader.poll(interval_s=1.0, deadline_s=5.0))
        return sum(len(d.xid_seen) for d in polls[-1].devices) == 3

    wait_until(seen_all, what="the three events")
    now = time.monotonic()
    assert {uuid: answer(v) for uuid, v in verdicts(polls[-1], now, window_s=60).items()} == {
        gpu_uuid(0): (2, {"xid_node_reboot": "unhealthy"}),
        gpu_uuid(1): (2, {"xid_gpu_reset": "unhealthy"}),
        gpu_uuid(2): (0, {}),
    }
    later = verdicts(polls[-1], now + 61, window_s=60, staleness_s=HOUR)  # the window has passed
    assert [answer(v) for v in later.values()] == [(0, {})] * 3


def test_a_corrected_ecc_storm_is_degraded_and_a_trickle_a_first_count_or_a_reset_is_not(
    scenario_file: Path, nvml_reader: MakeReader
) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(i), ecc_corrected=500) for i in range(3)])
    scenario.write(scenario_file)
    reader = nvml_reader()
    # 500 since the driver loaded is a count, not a rate.
    assert [answer(v) for v in verdicts(reader.poll(interval_s=1.0, deadline_s=5.0)).values()] == [(0, {})] * 3

    def next_read(*counts: int) -> dict[str, tuple[int, dict[str, str]]]:
        for gpu, count in zip(scenario.gpus, counts, strict=True):
            gpu.ecc_corrected = count
        scenario.write(scenario_file)
        for _ in range(SLOW_EVERY):  # the counts are read every SLOW_EVERY polls
            poll = reader.poll(interval_s=1.0, deadline_s=5.0)
        return {uuid: answer(v) for uuid, v in verdicts(poll).items()}

    storm = (1, {"corrected_ecc_storm": "degraded"})
    # Within the same minute: 50 more is a storm, 5 more a trickle; a count that went down was reset.
    assert next_read(550, 505, 0) == {gpu_uuid(0): storm, gpu_uuid(1): (0, {}), gpu_uuid(2): (0, {})}
    # The storm holds over the minute; after the reset the GPU is judged from its new count.
    assert next_read(550, 509, 50) == {gpu_uuid(0): storm, gpu_uuid(1): (0, {}), gpu_uuid(2): storm}


def test_a_lost_gpu_and_a_stalled_one_are_unhealthy(scenario_file: Path, nvml_reader: MakeReader) -> None:
    scenario = Scenario(gpus=[Gpu(gpu_uuid(0)), Gpu(gpu_uuid(1), name="NVIDIA A100-SXM4-80GB")])
    scenario.write(scenario_file)
    reader = nvml_reader()
    first = reader.poll(interval_s=1.0, deadline_s=5.0)
    scenario.gpus[1].lost = True
    scenario.write(scenario_file)
    poll = reader.poll(interval_s=1.0, deadline_s=5.0)
    assert [d.uuid for d in poll.devices] == [gpu_uuid(0)]  # its other series are gone
    lost = verdicts(poll)[gpu_uuid(1)]
    assert (lost.index, lost.model, answer(lost)) == (1, "NVIDIA A100-SXM4-80GB", (2, {"gpu_lost": "unhealthy"}))
    # A reading older than the staleness bound (its read stalled): unreadable, with what it last said.
    stalled = verdicts(first, now=first.devices[0].sampled_at + STALENESS + 1)[gpu_uuid(0)]
    assert answer(stalled) == (2, {"unreadable": "unhealthy"})
    scenario.gpus[1].lost = False
    scenario.write(scenario_file)
    assert [answer(v) for v in verdicts(reader.poll(interval_s=1.0, deadline_s=5.0)).values()] == [(0, {})] * 2


def test_the_agent_exports_status_reasons_and_recovery_action(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    node.scenario.recovery_field = True
    node.scenario.gpus[1].remap_failed = True
    node.scenario.gpus[1].recovery_action = 2
    node.scenario.write(node.scenario_path)
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    samples = agent.wait_for(lambda s: len(find(s, "gpu_health_status")) == 2, what="both GPUs judged")
    labels = {"node": "gpu-node-1", "model": "NVIDIA H100 80GB HBM3"}
    assert sorted((s["gpu"], s["uuid"], v) for s, v in find(samples, "gpu_health_status", **labels)) == [
        ("0", gpu_uuid(0), 0.0),
        ("1", gpu_uuid(1), 2.0),
    ]
    reasons = find(samples, "gpu_health_reason", gpu="1", **labels)
    assert sorted((s["reason"], s["severity"], v) for s, v in reasons) == [
        ("recovery_node_reboot", "unhealthy", 1.0),
        ("row_remap_failure", "unhealthy", 1.0),
    ]
    assert find(samples, "gpu_health_reason", gpu="0") == []  # none when healthy
    in_force = [s["action"] for s, v in find(samples, "gpu_recovery_action", uuid=gpu_uuid(1)) if v == 1]
    assert in_force == ["node_reboot"]
    node.scenario.gpus[1].lost = True  # its other series go; its status stays, at 2
    node.scenario.write(node.scenario_path)
    samples = agent.wait_for(
        lambda s: find(s, "gpu_health_reason", reason="gpu_lost") != [] and not find(s, "gpu_remapped_rows", gpu="1"),
        what="GPU 1 lost",
    )
    assert find(samples, "gpu_health_status", gpu="1") == [({**labels, "gpu": "1", "uuid": gpu_uuid(1)}, 2.0)]


def test_the_agent_without_the_health_group_judges_nothing(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes", "--metrics", "clocks"], node.scenario_path)
    samples = agent.wait_for(lambda s: len(find(s, "gpu_sm_clock_hertz")) == 2, what="a poll")
    assert find(samples, "gpu_health_status") == [] and find(samples, "gpu_health_reason") == []


@pytest.mark.parametrize("window", ["59s", "0.5m", "8d", "604801", "1w", "", "nan", "-1h", "inf"])
def test_a_bad_xid_window_is_one_line_naming_the_flag(window: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_config(["--health-xid-window", window], environ={})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--health-xid-window" in err, err


def test_the_xid_window_takes_seconds_or_units_and_defaults_to_an_hour() -> None:
    assert parse_config([], environ={}).health_xid_window_s == HOUR
    assert parse_config(["--health-xid-window", "90s"], environ={}).health_xid_window_s == 90
    assert parse_config(["--health-xid-window", "600"], environ={}).health_xid_window_s == 600
    assert parse_config(["--health-xid-window", "7d"], environ={}).health_xid_window_s == 7 * 86400
    environ = {"GPU_EXPORTER_HEALTH_XID_WINDOW": "30m"}
    assert parse_config([], environ=environ).health_xid_window_s == 1800


def test_the_readme_rules_table_matches_the_code() -> None:
    lines = README.read_text().splitlines()
    header = "| reason | severity | source |"
    assert header in lines, "README.md has no table of health rules"
    documented = []
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        documented.append(tuple(cell.strip() for cell in line.strip("|").split(" | ")))
    assert documented == [(f"`{r.reason}`", SEVERITIES[r.severity], r.source) for r in RULES]
