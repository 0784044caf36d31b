"""The adapter's pure parts: quantities, label selectors, rules files and label names. The PromQL built
from the rules is run on a real Prometheus in tests/adapter/test_queries.py."""

from __future__ import annotations

import time

import pytest

from exporter.adapter.quantity import format_quantity
from exporter.adapter.rules import RulesError, load_rules, prometheus_label
from exporter.adapter.selector import MAX_SELECTOR_BYTES, SelectorError, parse_selector


@pytest.mark.parametrize(
    ("value", "quantity"),
    [
        (22, "22"),
        (22.5, "22500m"),
        (0, "0"),
        (0.001, "1m"),
        (0.0004, "0"),
        (2000, "2k"),
        (1500, "1500"),
        (8e9, "8G"),
        (85899345920, "85899345920"),
        (-22.5, "-22500m"),
        (12.0, "12"),
        (99.9996, "100"),
        (3e6, "3M"),
        (250000.0, "250k"),
    ],
)
def test_quantities_as_kubernetes_writes_them(value: float, quantity: str) -> None:
    assert format_quantity(value) == quantity


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_never_quantities(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        format_quantity(value)


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("app=bert-intent-detection", {"app": "bert-intent-detection", "x": "y"}, True),
        ("app==bert-intent-detection", {"app": "other"}, False),
        ("app!=bert", {}, True),
        ("tier in (web, api),!canary", {"tier": "api"}, True),
        ("tier in (web, api),!canary", {"tier": "api", "canary": "true"}, False),
        ("tier notin (web)", {}, True),
        ("team", {"team": ""}, True),
        ("team", {}, False),
        ("app.kubernetes.io/name=bert,env=prod", {"app.kubernetes.io/name": "bert", "env": "prod"}, True),
        ("", {"anything": "x"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert parse_selector(selector).matches(labels) is matches


@pytest.mark.parametrize("selector", ["a b", "x in (a", "a,,b", ",", "tier in (has space)", "=value", "a=b=c"])
def test_bad_selectors_are_refused(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(selector)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("rules: [\n", "not valid YAML"),
        ("rulez: []\n", "want a mapping"),
        ("rules:\n- seriesQuery: 'up{job=\"x\"}'\n", "rules[0].seriesQuery: 'up{job=\"x\"}' is not a metric name"),
        ("rules:\n- seriesQuery: x\n  metricsQuery: avg(x)\n", "<<.Series>>"),
        ("rules:\n- seriesQuery: x\n  color: red\n", "unknown field(s) color"),
        ("rules:\n- seriesQuery: x\n  resources: {node: [node]}\n", "only namespace and pod"),
        # What used to load and then fail every request, or fail with a traceback:
        ("rules: 5\n", "rules: want a list of rules, got int"),
        ("external: {a: 1}\n", "external: want a list of rules"),
        ("rules: []\n", "defines no metric"),
        ("rules:\n- seriesQuery: x\n  resources: {namespace: []}\n", "rules[0] (x).resources.namespace: want at least"),
        (
            "rules:\n- seriesQuery: x\n  resources: {pod: [k8s-pod]}\n",
            "rules[0] (x).resources.pod: 'k8s-pod' is not a Prometheus label name",
        ),
        (
            "rules:\n- seriesQuery: x\n  resources: {namespace: [ns]}\n",
            "rules[0] (x).resources: namespace and pod want the same number of label names",
        ),
        ("rules:\n- seriesQuery: x\n  name: 5\n", "rules[0].name: want a non-empty string"),
        (
            "rules:\n- seriesQuery: x\n  metricsQuery: avg(<<.Series>>{<<.LabelMatchers>>})\n",
            "rules[0] (x).metricsQuery: must use <<.GroupBy>>",
        ),
        (
            "rules:\n- seriesQuery: x\n  metricsQuery: avg by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>}\n",
            "rules[0] (x).metricsQuery: unbalanced",
        ),
        (
            "external:\n- seriesQuery: x\n  metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.Pod>>)'\n",
            "external[0] (x).metricsQuery: unknown placeholder <<.Pod>>",
        ),
        ("external:\n- seriesQuery: x\n- seriesQuery: x\n", "external: the metric x is defined twice"),
    ],
)
def test_bad_rules_files_are_named(text: str, complaint: str) -> None:
    with pytest.raises(RulesError, match=r"rules\.yaml") as error:
        load_rules(text, "rules.yaml")
    assert complaint in str(error.value)


def test_an_external_rule_may_leave_out_the_grouping() -> None:
    rules = load_rules("external:\n- seriesQuery: x\n  metricsQuery: max(<<.Series>>{<<.LabelMatchers>>})\n", "r")
    assert [r.name for r in rules.external] == ["x"] and rules.custom == ()


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("app", "app"),
        ("app.kubernetes.io/name", "app_kubernetes_io_name"),
        ("example.com/team-name", "example_com_team_name"),
        ("9lives", "_lives"),  # a leading digit, as Prometheus's SanitizeFullLabelName
        ("tier_2", "tier_2"),
    ],
)
def test_label_keys_become_prometheus_label_names(key: str, label: str) -> None:
    assert prometheus_label(key) == label


def test_a_run_of_blanks_is_refused_in_linear_time() -> None:
    """Python's re holds the GIL: a selector matched in quadratic time (30 000 blanks took 22 s)
    stalls every thread of the adapter, its probes included."""
    started = time.monotonic()
    for selector in ("a" + " " * 30_000 + "x", "a in (" + " " * 30_000, "!" + " " * 30_000 + "=", "a" * 30_000):
        with pytest.raises(SelectorError):
            parse_selector(selector, max_bytes=10**6)
    assert time.monotonic() - started < 5  # linear: milliseconds; quadratic: minutes


@pytest.mark.parametrize(
    ("selector", "limit"),
    [("a" * (MAX_SELECTOR_BYTES + 1), f"{MAX_SELECTOR_BYTES} characters"), (",".join(["a"] * 51), "50 requirements")],
)
def test_a_selector_over_the_bounds_is_refused_naming_the_bound(selector: str, limit: str) -> None:
    with pytest.raises(SelectorError, match=limit):
        parse_selector(selector)
    assert len(parse_selector(",".join(["a"] * 50)).requirements) == 50
