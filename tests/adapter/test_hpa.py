"""The HPA arithmetic against cases from upstream's replica_calculator_test.go (inputs and expected
replica counts are facts from kubernetes pkg/controller/podautoscaler; the tests are ours), the
controller's stabilisation and rate limits, and the hpa-explain command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exporter.adapter.hpa import NoMetricsError, Pod, Tolerances, pods_metric_replicas, usage_ratio
from exporter.adapter.quantity import parse_milli
from sim.autoscaler import Autoscaler, largest_proposal


def pods(n: int, phases: list[str] | None = None) -> list[Pod]:
    return [Pod(f"p-{i}", (phases or ["Running"] * n)[i]) for i in range(n)]


def levels(*values: int) -> dict[str, int]:
    return {f"p-{i}": v for i, v in enumerate(values)}


@pytest.mark.parametrize(
    ("name", "current", "pod_list", "metrics", "target", "tolerances", "expected", "usage"),
    [
        ("TestReplicaCalcScaleUpCM", 3, pods(3), levels(20000, 10000, 30000), 15000, Tolerances(), 4, 20000),
        # Readiness is not consulted for Pods metrics: the unready pod's 30000 counts.
        (
            "TestReplicaCalcScaleUpCMUnreadyHotCpuNoLessScale",
            3,
            [Pod("p-0"), Pod("p-1"), Pod("p-2", ready=False)],
            levels(50000, 10000, 30000),
            15000,
            Tolerances(),
            6,
            30000,
        ),
        (
            "TestReplicaCalcScaleUpCMUnreadyHotCpuScaleWouldScaleDown",
            3,
            [Pod("p-0", ready=False), Pod("p-1"), Pod("p-2", ready=False)],
            levels(50000, 15000, 30000),
            15000,
            Tolerances(),
            7,
            31666,
        ),
        (
            "TestReplicaCalcScaleDownCM",
            5,
            pods(5),
            levels(12000, 12000, 12000, 12000, 12000),
            20000,
            Tolerances(),
            3,
            12000,
        ),
        ("TestReplicaCalcToleranceCM", 3, pods(3), levels(20000, 21000, 21000), 20000, Tolerances(), 3, 20666),
        (
            "TestReplicaCalcConfigurableToleranceCM",
            3,
            pods(3),
            levels(20000, 21000, 21000),
            20000,
            Tolerances(scale_down=0.1, scale_up=0.01),
            4,
            20666,
        ),
        (
            "TestPlainMetricReplicaCalcMissingMetricsNoChangeEq",
            5,
            pods(3),
            levels(20000, 19000, 21000),
            20000,
            Tolerances(),
            5,
            20000,
        ),
        (
            "TestReplicaCalcDuringRollingUpdateWithMaxSurgeCM",
            2,
            pods(3),
            levels(10000, 10000),
            17000,
            Tolerances(),
            2,
            10000,
        ),
    ],
)
def test_upstream_cases(
    name: str,
    current: int,
    pod_list: list[Pod],
    metrics: dict[str, int],
    target: int,
    tolerances: Tolerances,
    expected: int,
    usage: int,
) -> None:
    proposal = pods_metric_replicas(current, target, pod_list, metrics, tolerances)
    assert (proposal.replicas, proposal.usage_milli) == (expected, usage), name


def test_exactly_at_the_tolerance_edge_does_not_scale() -> None:
    # 22/20 is a ratio of 1.1: inside the default 10 % tolerance, as upstream computes it.
    assert pods_metric_replicas(1, 20000, pods(1), levels(22000)).replicas == 1
    assert pods_metric_replicas(5, 20000, pods(5), levels(*[18000] * 5)).replicas == 5
    assert pods_metric_replicas(1, 20000, pods(1), levels(22001)).replicas == 2


def test_missing_pods_count_as_target_on_scale_down_and_zero_on_scale_up() -> None:
    # Scale-down: the pod without a sample is assumed at the target, damping the step (4 -> 2, not 4 -> 1).
    assert pods_metric_replicas(4, 20000, pods(4), levels(5000, 5000, 5000)).replicas == 2
    # Scale-up: it is assumed idle; here that flips the direction, so nothing changes (not 2 -> 3).
    assert pods_metric_replicas(2, 10000, pods(3), levels(12000, 12000)).replicas == 2


def test_exactly_at_the_target_with_pods_missing_keeps_the_replicas() -> None:
    """calcPlainMetricReplicas fills missing pods only below (target) or above (0) a ratio of 1.0;
    at exactly 1.0 it fills nothing and keeps the replicas. 5 pods, 3 at exactly 20, 2 missing."""
    proposal = pods_metric_replicas(5, 20000, pods(5), levels(20000, 20000, 20000))
    assert (proposal.replicas, proposal.usage_milli, proposal.usage_ratio) == (5, 20000, 1.0)


def test_a_sample_of_a_pod_the_lister_does_not_list_still_counts() -> None:
    """Upstream removes only ignored and unready pods' samples from the metrics it averages."""
    assert pods_metric_replicas(2, 10000, pods(2), {"p-0": 10000, "p-1": 10000, "gone": 40000}).replicas == 4


def test_no_pods_is_no_scaling() -> None:
    with pytest.raises(NoMetricsError, match="no pods returned by selector"):
        pods_metric_replicas(2, 20000, [], levels(1000))


def test_the_average_truncates_toward_zero_as_go_does() -> None:
    assert usage_ratio({"a": -3000, "b": 0, "c": 0, "d": 0}, 1000)[1] == -750
    assert usage_ratio({"a": -3, "b": 0}, 1000)[1] == -1  # Go: -3 / 2 == -1, where Python's // gives -2


def test_pending_pods_are_unready_and_deleting_or_failed_pods_ignored() -> None:
    pending = [Pod("p-0"), Pod("p-1"), Pod("p-2", "Pending")]
    assert pods_metric_replicas(3, 15000, pending, levels(50000, 10000)).replicas == 4
    gone = [Pod("p-0"), Pod("p-1", deleting=True), Pod("p-2", "Failed")]
    assert pods_metric_replicas(3, 10000, gone, levels(30000, 90000, 90000)).replicas == 3


def test_no_metrics_means_no_scaling() -> None:
    with pytest.raises(NoMetricsError):
        pods_metric_replicas(2, 20000, pods(2), {})


def test_the_largest_proposal_wins_and_invalid_metrics_block_scale_down() -> None:
    assert largest_proposal(3, [2, 5, 4]) == 5
    assert largest_proposal(3, [None, None]) is None  # every metric invalid: <unknown>, no scaling
    assert largest_proposal(3, [None, 2]) is None  # would scale down with a metric missing: no
    assert largest_proposal(3, [None, 6]) == 6  # scaling up on what is known is allowed


def test_v2_defaults_scale_up_at_most_4_pods_or_double_per_15s() -> None:
    hpa = Autoscaler(min_replicas=1, max_replicas=100)
    assert hpa.decide(0, current=1, proposal=20) == 5  # max(1 + 4 pods, 1 x 200%) = 5
    assert hpa.decide(5, current=5, proposal=20) == 5  # still inside the same 15 s period
    assert hpa.decide(16, current=5, proposal=20) == 10  # next period: max(5 + 4, 5 x 2)


def test_v2_defaults_scale_down_only_after_the_5_minute_window() -> None:
    hpa = Autoscaler(min_replicas=1, max_replicas=10)
    assert hpa.decide(0, current=6, proposal=6) == 6
    assert hpa.decide(15, current=6, proposal=2) == 6  # the 6 of 15 s ago still stands
    assert hpa.decide(299, current=6, proposal=2) == 6
    assert hpa.decide(301, current=6, proposal=2) == 2  # 300 s on, every recommendation says 2


def test_legacy_clamp_without_behavior() -> None:
    hpa = Autoscaler(min_replicas=1, max_replicas=10, scale_up=None, scale_down=None)
    assert hpa.decide(0, current=1, proposal=9) == 4  # min(maxReplicas, max(2 x 1, 4))
    assert hpa.decide(15, current=4, proposal=9) == 8
    assert hpa.decide(30, current=8, proposal=1) == 9  # the window holds the recent 9


@pytest.mark.parametrize(
    ("text", "milli"),
    [
        ("12", 12000),
        ("12000m", 12000),
        ("1.5k", 1500000),
        ("22500m", 22500),
        ("1Ki", 1024000),
        ("0.0001", 1),
        ("1e3", 1000000),
    ],
)
def test_quantities_read_as_milli_values(text: str, milli: int) -> None:
    assert parse_milli(text) == milli


def explain(payload: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.adapter", "hpa-explain"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
    )


def test_hpa_explain_answers_the_issue_example() -> None:
    payload = {
        "currentReplicas": 5,
        "target": "20",
        "tolerance": {"scaleUp": 0.1, "scaleDown": 0.1},
        "pods": [{"name": f"p-{i}", "phase": "Running", "ready": True, "deleting": False} for i in range(5)],
        "metrics": {f"p-{i}": "12" if i % 2 else "12000m" for i in range(5)},
    }
    result = explain(payload)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["desiredReplicas"], answer["usageRatio"], answer["averageValue"]) == (3, 0.6, "12")
    assert answer["reason"]


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        ({"currentReplicas": 0, "target": "20", "pods": [{"name": "a"}]}, "currentReplicas"),
        ({"currentReplicas": 1, "target": "twenty", "pods": [{"name": "a"}]}, "target"),
        ({"currentReplicas": 1, "target": "20", "pods": []}, "pods"),
        ({"currentReplicas": 1, "target": "20", "pods": [{"name": "a"}], "metrics": {"b": "1"}}, "no pod named"),
        ({"currentReplicas": 1, "target": "20", "pods": [{"name": "a", "phase": "Exploded"}]}, "phase"),
        ({"currentReplicas": 1, "target": "20", "pods": [{"name": "a"}], "tolerance": {"up": 1}}, "tolerance"),
        ([1, 2], "JSON object"),
    ],
)
def test_hpa_explain_bad_input_exits_2_with_one_line(payload: object, complaint: str) -> None:
    result = explain(payload)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("hpa-explain: error:") and complaint in line


def test_hpa_explain_at_exactly_the_target_with_pods_missing() -> None:
    payload = {
        "currentReplicas": 5,
        "target": "20",
        "pods": [{"name": f"p-{i}"} for i in range(5)],
        "metrics": {"p-0": "20", "p-1": "20", "p-2": "20"},
    }
    result = explain(payload)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["desiredReplicas"] == 5


def test_hpa_explain_not_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter.adapter", "hpa-explain"], input="{nope", capture_output=True, text=True
    )
    assert result.returncode == 2 and "not JSON" in result.stderr
