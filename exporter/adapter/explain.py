"""``gpu-metrics-adapter hpa-explain``: "what would my HPA do with these numbers?".

Reads one JSON object on stdin, prints one on stdout, running one sync's replica calculation as
kube-controller-manager does (exporter.adapter.hpa, after upstream's replica_calculator.go; the
simulated HPA of the demo runs the same)::

    {"currentReplicas": 5, "target": "20", "tolerance": {"scaleUp": 0.1, "scaleDown": 0.1},
     "pods": [{"name": "p-0", "phase": "Running", "ready": true, "deleting": false}, ...],
     "metrics": {"p-0": "12", ...}}
    -> {"desiredReplicas": 3, "usageRatio": 0.6, "averageValue": "12", "reason": "..."}

A pod absent from ``metrics`` has no sample. Bad input: exit code 2 and one line naming it.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from exporter.adapter.hpa import DEFAULT_TOLERANCE, NoMetricsError, Pod, Tolerances, pods_metric_replicas
from exporter.adapter.quantity import format_quantity, parse_milli


class InputError(ValueError):
    """The input is not what hpa-explain reads; the message says which part."""


def explain(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InputError("want one JSON object")
    unknown = set(data) - {"currentReplicas", "target", "tolerance", "pods", "metrics"}
    if unknown:
        raise InputError(f"unknown field(s): {', '.join(sorted(unknown))}")
    current = data.get("currentReplicas")
    if not isinstance(current, int) or isinstance(current, bool) or current < 1:
        raise InputError("currentReplicas: want a whole number of at least 1")
    target = _milli(data.get("target"), "target")
    if target <= 0:
        raise InputError("target: must be above 0")
    tolerance = data.get("tolerance") or {}
    if not isinstance(tolerance, dict) or set(tolerance) - {"scaleUp", "scaleDown"}:
        raise InputError('tolerance: want {"scaleUp": number, "scaleDown": number}')
    tolerances = Tolerances(scale_down=_fraction(tolerance, "scaleDown"), scale_up=_fraction(tolerance, "scaleUp"))
    pods = _pods(data.get("pods"))
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise InputError("metrics: want an object of pod name -> quantity")
    names = {p.name for p in pods}
    strays = set(metrics) - names
    if strays:
        raise InputError(f"metrics: no pod named {sorted(strays)[0]!r}")
    values = {name: _milli(value, f"metrics.{name}") for name, value in metrics.items()}
    try:
        proposal = pods_metric_replicas(current, target, pods, values, tolerances)
    except NoMetricsError as error:
        return {
            "desiredReplicas": current,
            "usageRatio": None,
            "averageValue": None,
            "reason": f"no scaling: {error} (kubectl shows <unknown>)",
        }
    return {
        "desiredReplicas": proposal.replicas,
        "usageRatio": round(proposal.usage_ratio, 6),
        "averageValue": format_quantity(proposal.usage_milli / 1000),
        "reason": proposal.reason,
    }


def _milli(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f'{where}: want a quantity such as "20" or "12000m"')
    try:
        return parse_milli(str(value))
    except ValueError as error:
        raise InputError(f"{where}: {error}") from error


def _fraction(tolerance: dict[str, Any], key: str) -> float:
    value = tolerance.get(key, DEFAULT_TOLERANCE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InputError(f"tolerance.{key}: want a number of at least 0")
    return float(value)


def _pods(raw: Any) -> list[Pod]:
    if not isinstance(raw, list) or not raw:
        raise InputError("pods: want a non-empty list")
    pods = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise InputError(f"pods[{index}]: want an object with a name")
        phase = item.get("phase", "Running")
        if phase not in ("Pending", "Running", "Succeeded", "Failed", "Unknown"):
            raise InputError(f"pods[{index}].phase: unknown phase {phase!r}")
        pods.append(Pod(item["name"], phase, bool(item.get("ready", True)), bool(item.get("deleting", False))))
    if len({p.name for p in pods}) != len(pods):
        raise InputError("pods: names must be unique")
    return pods


def run(stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    try:
        data = json.loads(stdin.read())
    except json.JSONDecodeError as error:
        stderr.write(f"hpa-explain: error: input is not JSON: {error.msg} at line {error.lineno}\n")
        return 2
    try:
        result = explain(data)
    except InputError as error:
        stderr.write(f"hpa-explain: error: {error}\n")
        return 2
    stdout.write(json.dumps(result) + "\n")
    return 0


def main() -> int:
    return run(sys.stdin, sys.stdout, sys.stderr)
