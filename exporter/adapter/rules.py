"""Which metrics the adapter serves and the PromQL behind each: a small rules file, defaults built in.

In the spirit of prometheus-adapter's rules, but only what this project needs::

    rules:                      # custom metrics, served for pods (and namespaces as aggregates)
    - name: duty_cycle_current  # the metric name the HPA asks for
      seriesQuery: duty_cycle_current   # the series in Prometheus it is computed from
      metricsQuery: avg by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})
      resources:                # series labels naming the object; the first present wins, so
        namespace: [namespace, exported_namespace]   # scrape configs that renamed them on a
        pod: [pod, exported_pod]                      # collision still work
    external:                   # external metrics: one value per namespace and label selector
    - name: gpu_duty_cycle
      seriesQuery: duty_cycle_current
      metricsQuery: avg(<<.Series>>{<<.LabelMatchers>>})

``<<.Series>>`` is the series name, ``<<.LabelMatchers>>`` the matchers for the request's objects
(and the external request's label selector), ``<<.GroupBy>>`` the object labels. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from exporter.adapter.selector import Selector

DEFAULT_RESOURCES: Mapping[str, tuple[str, ...]] = {
    "namespace": ("namespace", "exported_namespace"),
    "pod": ("pod", "exported_pod"),
}
AVERAGE = "avg by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})"
TOTAL = "sum by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})"


class RulesError(ValueError):
    """The rules file is unusable; the message says where."""


@dataclass(frozen=True)
class Rule:
    name: str
    series_query: str
    metrics_query: str
    resources: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))


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
            "gpu_sm_active_ratio) and on (node, gpu, uuid) (count by (node, gpu, uuid) (<<.Series>>) == 1))",
        ),
    ),
    external=(
        Rule("gpu_duty_cycle", "duty_cycle_current", "avg(<<.Series>>{<<.LabelMatchers>>})"),
        Rule("gpu_memory_used_bytes", "memory_used_bytes_current", "sum(<<.Series>>{<<.LabelMatchers>>})"),
    ),
)

_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def load_rules(text: str, origin: str) -> Rules:
    """Parses a rules file; ``origin`` names it in errors."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RulesError(f"{origin}: not valid YAML: {getattr(error, 'problem', error)}") from error
    if not isinstance(raw, dict) or set(raw) - {"rules", "external"}:
        raise RulesError(f"{origin}: want a mapping with 'rules' and/or 'external'")
    return Rules(
        custom=tuple(_rule(r, f"{origin}: rules[{i}]") for i, r in enumerate(raw.get("rules") or ())),
        external=tuple(_rule(r, f"{origin}: external[{i}]") for i, r in enumerate(raw.get("external") or ())),
    )


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: want a mapping")
    unknown = set(raw) - {"name", "seriesQuery", "metricsQuery", "resources"}
    if unknown:
        raise RulesError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    series = str(raw.get("seriesQuery", ""))
    name = str(raw.get("name", series))
    if not _METRIC_NAME.match(str(series)) or not _METRIC_NAME.match(str(name)):
        raise RulesError(f"{where}: name and seriesQuery must be metric names")
    query = str(raw.get("metricsQuery", AVERAGE))
    if "<<.Series>>" not in query or "<<.LabelMatchers>>" not in query:
        raise RulesError(f"{where}: metricsQuery must use <<.Series>> and <<.LabelMatchers>>")
    resources = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in (raw.get("resources") or {}).items()}
    if set(resources) - {"namespace", "pod"}:
        raise RulesError(f"{where}: resources maps only namespace and pod")
    return Rule(name, series, query, {**DEFAULT_RESOURCES, **resources})


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _regex_alternatives(values: Sequence[str]) -> str:
    return "|".join(re.escape(v) for v in sorted(values))


def pods_query(rule: Rule, namespace: str) -> str:
    """One query for every pod of a namespace, whatever the number a request selects: the caller
    keeps the pods it wants. Matching the namespace alone is cheaper for Prometheus than a regex of
    pod names (500 pods: 14 ms instead of 30 ms median on Prometheus 2.42). Every naming of the
    namespace/pod labels the rule allows is tried, and renamed ones are mapped back, so the result
    is grouped by (namespace, pod) whichever the scrape config used."""
    alternatives = []
    for ns_label, pod_label in zip(rule.resources["namespace"], rule.resources["pod"], strict=False):
        query = _timed(rule, f'{ns_label}={_quote(namespace)},{pod_label}!=""', f"{ns_label},{pod_label}")
        if (ns_label, pod_label) != ("namespace", "pod"):
            query = (
                f'label_replace(label_replace({query}, "namespace", "$1", "{ns_label}", "(.*)"), '
                f'"pod", "$1", "{pod_label}", "(.*)")'
            )
        alternatives.append(query)
    return " or ".join(alternatives)


def namespace_query(rule: Rule, namespace: str) -> str:
    """The rule's aggregate over all the namespace's pods (the Namespace object's metric)."""
    ns_label = rule.resources["namespace"][0]
    return _timed(rule, f'{ns_label}={_quote(namespace)},{rule.resources["pod"][0]}!=""', ns_label)


def external_query(rule: Rule, namespace: str, selector: Selector) -> str:
    """The rule over the namespace's series matching a metric label selector."""
    matchers = [f"{rule.resources['namespace'][0]}={_quote(namespace)}"]
    for requirement in selector.requirements:
        values = sorted(requirement.values)
        if requirement.operator == "in":
            matchers.append(f"{requirement.key}=~{_quote(_regex_alternatives(values))}")
        elif requirement.operator == "notin":
            matchers.append(f"{requirement.key}!~{_quote(_regex_alternatives(values))}")
        elif requirement.operator == "exists":
            matchers.append(f'{requirement.key}!=""')
        else:
            matchers.append(f'{requirement.key}=""')
    return _timed(rule, ",".join(matchers), "")


FIELD = "gpu_adapter_field"  # tells the value of each group from the time of its newest sample


def _timed(rule: Rule, matchers: str, group_by: str) -> str:
    """The rule's value and, in the same query, the time of the newest sample behind it: the
    answer's timestamp is when the GPU was measured, not when the question was asked."""
    value = _render(rule, matchers, group_by)
    grouping = f" by ({group_by})" if group_by else ""
    newest = f"max{grouping} (timestamp({rule.series_query}{{{matchers}}}))"
    return (
        f'label_replace({value}, "{FIELD}", "value", "", "") or label_replace({newest}, "{FIELD}", "timestamp", "", "")'
    )


def _render(rule: Rule, matchers: str, group_by: str) -> str:
    return (
        rule.metrics_query.replace("<<.Series>>", rule.series_query)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )
