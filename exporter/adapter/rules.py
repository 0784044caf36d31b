"""Which metrics the adapter serves and the PromQL behind each: a small rules file, defaults built in.

In the spirit of prometheus-adapter's rules, but only what this project needs::

    rules:                      # custom metrics, served for pods (and namespaces as aggregates)
    - name: duty_cycle_current  # the metric name the HPA asks for
      seriesQuery: duty_cycle_current   # the series in Prometheus it is computed from
      metricsQuery: avg by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})
      resources:                # series labels naming the object, in pairs; a series carrying a
        namespace: [namespace, exported_namespace]   # later pair is that pair's, so a scrape without
        pod: [pod, exported_pod]                      # honor_labels (which renames the agent's labels
                                                      # on a collision) is attributed to the right pod
    external:                   # external metrics: one value per namespace and label selector
    - name: gpu_duty_cycle
      seriesQuery: duty_cycle_current
      metricsQuery: avg(<<.Series>>{<<.LabelMatchers>>})

``<<.Series>>`` is the series name, ``<<.LabelMatchers>>`` the matchers for the request's objects
(and the external request's label selector), ``<<.GroupBy>>`` the object labels, ``<<.Window>>`` the
range ``--metrics-window`` sets (the built-in rules average each gauge over it with
``avg_over_time``, as the HPA's CPU metric is an average over metrics-server's window; a rule
without it serves an instant value, dated a one-second window). Everything is
checked when the file is loaded, so a rule that would fail at request time stops the adapter at
start instead. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from exporter.adapter.selector import Requirement

DEFAULT_RESOURCES: Mapping[str, tuple[str, ...]] = {
    "namespace": ("namespace", "exported_namespace"),
    "pod": ("pod", "exported_pod"),
}
WINDOW = "<<.Window>>"
# Each series' average over the window, for the series still current: one gone stale (its pod or
# agent gone) has samples in the window but is gone, as an instant selection would have it.
WINDOWED = f"avg_over_time(<<.Series>>{{<<.LabelMatchers>>}}[{WINDOW}]) and <<.Series>>{{<<.LabelMatchers>>}}"
AVERAGE = f"avg by (<<.GroupBy>>) ({WINDOWED})"
TOTAL = f"sum by (<<.GroupBy>>) ({WINDOWED})"
# As metrics-server's --metric-resolution in its upstream manifests: the window of the HPA's CPU metric.
DEFAULT_WINDOW_S = 15
_PLACEHOLDERS = {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>", WINDOW}


class RulesError(ValueError):
    """The rules file is unusable; the message names the rule and the field."""


@dataclass(frozen=True)
class Rule:
    name: str
    series_query: str
    metrics_query: str
    resources: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))

    @property
    def windowed(self) -> bool:
        """Whether the rule averages over ``--metrics-window`` (else it serves an instant value)."""
        return WINDOW in self.metrics_query

    def render(self, matchers: str, group_by: str, window_s: int) -> str:
        return (
            self.metrics_query.replace("<<.Series>>", self.series_query)
            .replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", group_by)
            .replace(WINDOW, f"{window_s}s")
        )


@dataclass(frozen=True)
class Rules:
    custom: tuple[Rule, ...]
    external: tuple[Rule, ...]

    def custom_rule(self, name: str) -> Rule | None:
        return next((r for r in self.custom if r.name == name), None)

    def external_rule(self, name: str) -> Rule | None:
        return next((r for r in self.external if r.name == name), None)


DEFAULT_RULES = Rules(
    custom=(
        # Per pod: the average utilisation and temperature over the pod's GPUs, the total memory and power.
        Rule("duty_cycle_current", "duty_cycle_current", AVERAGE),
        Rule("memory_used_bytes_current", "memory_used_bytes_current", TOTAL),
        Rule("temperature_celsius_current", "temperature_celsius_current", AVERAGE),
        Rule("power_usage_milliwatts_current", "power_usage_milliwatts_current", TOTAL),
        # Per pod: the average SM activity (GPM, percent) over the GPUs it holds alone, joined to pods
        # through gpu_pod_info; absent on a shared GPU, where the device's activity is not the pod's.
        Rule(
            "sm_active_current",
            "gpu_pod_info",
            "100 * avg by (<<.GroupBy>>) ((<<.Series>>{<<.LabelMatchers>>} * on (node, gpu, uuid) group_left "
            "avg_over_time(gpu_sm_active_ratio[<<.Window>>])) and on (node, gpu, uuid) "
            "(count by (node, gpu, uuid) (<<.Series>>) == 1))",
        ),
    ),
    external=(
        Rule("gpu_duty_cycle", "duty_cycle_current", f"avg({WINDOWED})"),
        Rule("gpu_memory_used_bytes", "memory_used_bytes_current", f"sum({WINDOWED})"),
    ),
)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def load_rules(text: str, origin: str) -> Rules:
    """Parses and checks a rules file; ``origin`` names it in errors."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RulesError(f"{origin}: not valid YAML: {getattr(error, 'problem', None) or error}") from error
    if not isinstance(raw, dict) or set(raw) - {"rules", "external"}:
        raise RulesError(f"{origin}: want a mapping with 'rules' and/or 'external'")
    lists = {}
    for section in ("rules", "external"):
        items = raw.get(section)
        if items is not None and not isinstance(items, list):
            raise RulesError(f"{origin}: {section}: want a list of rules, got {type(items).__name__}")
        lists[section] = [_rule(r, f"{origin}: {section}[{i}]", section == "rules") for i, r in enumerate(items or ())]
        names = [r.name for r in lists[section]]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise RulesError(f"{origin}: {section}: the metric {duplicate} is defined twice")
    if not lists["rules"] and not lists["external"]:
        raise RulesError(f"{origin}: defines no metric (want at least one rule under 'rules' or 'external')")
    return Rules(custom=tuple(lists["rules"]), external=tuple(lists["external"]))


def _string(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value:
        raise RulesError(f"{where}.{key}: want a non-empty string")
    return value


def _rule(raw: Any, where: str, custom: bool) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: want a mapping")
    unknown = set(raw) - {"name", "seriesQuery", "metricsQuery", "resources"}
    if unknown:
        raise RulesError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    series = _string(raw, "seriesQuery", where)
    if not _METRIC_NAME.fullmatch(series):
        raise RulesError(f"{where}.seriesQuery: {series!r} is not a metric name")
    name = _string(raw, "name", where, series)
    if not _METRIC_NAME.fullmatch(name):
        raise RulesError(f"{where}.name: {name!r} is not a metric name")
    where = f"{where} ({name})"
    query = _string(raw, "metricsQuery", where, AVERAGE)
    _check_template(query, f"{where}.metricsQuery", needs_group_by=custom)
    return Rule(name, series, query, _resources(raw.get("resources"), f"{where}.resources"))


def _check_template(query: str, where: str, needs_group_by: bool) -> None:
    unknown = set(re.findall(r"<<[^>]*>>", query)) - _PLACEHOLDERS
    if unknown:
        raise RulesError(f"{where}: unknown placeholder {sorted(unknown)[0]}")
    needed = ["<<.Series>>", "<<.LabelMatchers>>"] + (["<<.GroupBy>>"] if needs_group_by else [])
    missing = [p for p in needed if p not in query]
    if missing:
        why = " (a custom metric is grouped by namespace and pod)" if "<<.GroupBy>>" in missing else ""
        raise RulesError(f"{where}: must use {' and '.join(missing)}{why}")
    rendered = Rule("x", "x", query).render('namespace="a"', "namespace,pod", 1)
    if _unbalanced(rendered):
        raise RulesError(f"{where}: unbalanced brackets or quotes in {query!r}")


def _unbalanced(promql: str) -> bool:
    """Brackets and quotes must pair up: a cheap check that catches the usual typo at start (a full
    PromQL parse happens in Prometheus, at the first request)."""
    closing = {")": "(", "}": "{", "]": "["}
    stack: list[str] = []
    quote = ""
    escaped = False
    for char in promql:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "({[":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return True
    return bool(stack or quote)


def _resources(raw: Any, where: str) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return dict(DEFAULT_RESOURCES)
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: want a mapping of namespace and pod to label names")
    unknown = set(raw) - {"namespace", "pod"}
    if unknown:
        raise RulesError(f"{where}: maps only namespace and pod, not {', '.join(sorted(map(str, unknown)))}")
    resources = dict(DEFAULT_RESOURCES)
    for key, value in raw.items():
        labels = value if isinstance(value, list) else [value]
        if not labels:
            raise RulesError(f"{where}.{key}: want at least one label name")
        for label in labels:
            if not isinstance(label, str) or not _LABEL_NAME.fullmatch(label):
                raise RulesError(f"{where}.{key}: {label!r} is not a Prometheus label name")
        resources[key] = tuple(labels)
    if len(resources["namespace"]) != len(resources["pod"]):
        raise RulesError(
            f"{where}: namespace and pod want the same number of label names (they pair up in order), "
            f"got {len(resources['namespace'])} and {len(resources['pod'])}"
        )
    return resources


def prometheus_label(key: str) -> str:
    """A Kubernetes label key as a Prometheus label name, the way Prometheus sanitises names
    (strutil.SanitizeFullLabelName; kube-state-metrics and Kubernetes service discovery do the same
    after a prefix): every character outside ``[a-zA-Z0-9_]``, and a leading digit, becomes ``_``.
    ``app.kubernetes.io/name`` -> ``app_kubernetes_io_name``."""
    return (
        "".join(
            c if ("a" <= c <= "z" or "A" <= c <= "Z" or c == "_" or ("0" <= c <= "9" and i > 0)) else "_"
            for i, c in enumerate(key)
        )
        or "_"
    )


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _regex_alternatives(values: Sequence[str]) -> str:
    return "|".join(re.escape(v) for v in sorted(values))


def selector_matchers(requirements: Sequence[Requirement]) -> list[str]:
    """Label matchers for a Kubernetes label selector's requirements, keys sanitised as Prometheus
    sanitises them (label values the selector grammar admits need no sanitising, only quoting)."""
    matchers = []
    for requirement in requirements:
        label = prometheus_label(requirement.key)
        values = sorted(requirement.values)
        if requirement.operator == "in":
            matchers.append(f"{label}=~{quote(_regex_alternatives(values))}")
        elif requirement.operator == "notin":
            matchers.append(f"{label}!~{quote(_regex_alternatives(values))}")
        elif requirement.operator == "exists":
            matchers.append(f'{label}!=""')
        else:
            matchers.append(f'{label}=""')
    return matchers
