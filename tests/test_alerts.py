"""The GPU alerts (daemonset/prometheus/gpu-alerts.yaml): promtool checks the rules and runs their
unit tests (tests/alerts/gpu-alerts.test.yaml), where each alert fires on its series and stays
quiet otherwise; the PrometheusRule of the operator overlay holds the same rules; every series the
rules read is one the agent (or kube-state-metrics) exports; every alert links a runbook section
that exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import requests
import yaml

from exporter.adapter.selfmetrics import SelfMetrics
from exporter.catalogue import FAMILIES
from tests.conftest import Node, find
from tests.test_dashboards import metric_names

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "daemonset" / "prometheus" / "gpu-alerts.yaml"
OPERATOR_RULES = ROOT / "daemonset" / "overlays" / "prometheus-operator" / "gpu-alerts.yaml"
UNIT_TESTS = ROOT / "tests" / "alerts" / "gpu-alerts.test.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
RUNBOOKS_URL = "https://github.com/gpu-pod-exporter/gpu-pod-exporter/blob/main/docs/runbooks.md"
# kube-state-metrics' series (a named external exporter) that the DaemonSet coverage alert and the
# cost rules' pod ownership read.
KUBE_STATE_METRICS = {
    "kube_node_status_capacity",
    "kube_daemonset_status_number_available",
    "kube_pod_owner",
    "kube_replicaset_owner",
}
ADAPTER_GROUP = "gpu-metrics-adapter"  # the adapter's alerts, on its own metrics
COST_RULES = ROOT / "daemonset" / "prometheus" / "gpu-cost-rules.yaml"
OPERATOR_COST_RULES = ROOT / "daemonset" / "overlays" / "prometheus-operator" / "gpu-cost-rules.yaml"
COST_UNIT_TESTS = ROOT / "tests" / "alerts" / "gpu-cost-rules.test.yaml"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is needed (Debian package prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 15 rules found" in done.stdout


@pytest.mark.parametrize("unit_tests", [UNIT_TESTS, COST_UNIT_TESTS], ids=["alerts", "cost"])
def test_promtool_unit_tests_pass(unit_tests: Path) -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", unit_tests.name], cwd=unit_tests.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = set(alerts(yaml.safe_load(RULES.read_text())["groups"]))
    assert fired == names
    assert quiet == names


@pytest.mark.parametrize(("rules", "shipped"), [(RULES, OPERATOR_RULES), (COST_RULES, OPERATOR_COST_RULES)])
def test_the_operator_overlay_ships_the_same_rules(rules: Path, shipped: Path) -> None:
    rule = yaml.safe_load(shipped.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(rules.read_text())["groups"]


def test_promtool_checks_the_cost_rules_and_each_is_tested() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(COST_RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = {rule["record"] for group in yaml.safe_load(COST_RULES.read_text())["groups"] for rule in group["rules"]}
    tested = {
        name
        for case in yaml.safe_load(COST_UNIT_TESTS.read_text())["tests"]
        for check in case["promql_expr_test"]
        for name in metric_names(promql_parser.parse(check["expr"]))
    }
    assert tested == recorded - {
        "namespace_workload_pod:gpu_allocated_gpu_seconds:increase1h",
        "namespace_workload_pod:gpu_busy_gpu_seconds:increase1h",
    }  # those two are read by the per-namespace and per-workload rules, tested through them


def test_the_issues_alerts_are_there_with_their_severities() -> None:
    rules = alerts(yaml.safe_load(RULES.read_text())["groups"])
    severity = {name: rule["labels"]["severity"] for name, rule in rules.items()}
    assert severity == {
        "GpuXidCritical": "critical",
        "GpuXidWarning": "warning",
        "GpuEccUncorrectable": "critical",
        "GpuRowRemapFailed": "critical",
        "GpuRowRemapPending": "warning",
        "GpuClocksSlowedDown": "warning",
        "GpuMemoryNearlyFull": "warning",
        "GpuExporterDown": "warning",
        "GpuExporterStale": "warning",
        "GpuExporterDeviceStuck": "warning",
        "GpuExporterNvmlDown": "critical",
        "GpuExporterPodResourcesDown": "warning",
        "GpuExporterMissingOnGpuNodes": "warning",
        "GpuUnhealthy": "critical",
        "GpuMetricsAdapterPrometheusUnreachable": "warning",
    }
    assert '"48|62|64|74|79|95|119|120"' in rules["GpuXidCritical"]["expr"]
    assert rules["GpuClocksSlowedDown"]["for"] == "5m"


def test_the_rules_read_only_series_the_agent_exports(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    # The process collector answers before the first poll; the age gauges come with the first snapshot.
    agent.wait_for(lambda s: bool(find(s, "duty_cycle_current")), what="a finished poll")
    text = requests.get(agent.url + "/metrics", timeout=5).text
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exported |= {family.name for family in FAMILIES} | {"up"}  # Xid series appear on the first event
    exported |= KUBE_STATE_METRICS
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for name, rule in alerts([g for g in groups if g["name"] != ADAPTER_GROUP]).items():
        read = metric_names(promql_parser.parse(rule["expr"]))
        assert read and read <= exported, (name, read - exported)
    cost = [rule for group in yaml.safe_load(COST_RULES.read_text())["groups"] for rule in group["rules"]]
    exported |= {rule["record"] for rule in cost}
    for rule in cost:
        read = metric_names(promql_parser.parse(rule["expr"]))
        assert read and read <= exported, (rule["record"], read - exported)


def test_the_adapters_rules_read_only_series_the_adapter_exports() -> None:
    metrics = SelfMetrics()
    metrics.gauges.prometheus_up = lambda: False
    text = metrics.exposition()[0].decode()
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    (group,) = [g for g in yaml.safe_load(RULES.read_text())["groups"] if g["name"] == ADAPTER_GROUP]
    for name, rule in alerts([group]).items():
        read = metric_names(promql_parser.parse(rule["expr"]))
        assert read and read <= exported, (name, read - exported)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    anchors = {github_anchor(line.lstrip("#")) for line in RUNBOOKS.read_text().splitlines() if line.startswith("#")}
    for name, rule in alerts(yaml.safe_load(RULES.read_text())["groups"]).items():
        url = rule["annotations"].get("runbook_url", "")
        page, _, anchor = url.partition("#")
        assert page == RUNBOOKS_URL and anchor in anchors, (name, url)
