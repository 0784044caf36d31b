"""The HorizontalPodAutoscaler's arithmetic for one sync of a Pods metric, as kube-controller-manager
does it, for ``gpu-metrics-adapter hpa-explain``.

Follows kubernetes pkg/controller/podautoscaler/replica_calculator.go (calcPlainMetricReplicas,
groupPods, removeMetricsForPods, Tolerances.isWithin) and metrics/utilization.go
(GetMetricUsageRatio), branch by branch. Values are milli-units, integer arithmetic where upstream
uses it. What the controller does with a proposal over time (stabilisation, rate limits) lives with
the simulated HPA in sim/autoscaler.py. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_TOLERANCE = 0.1


class NoMetricsError(ValueError):
    """Upstream returns an error: the HPA does not scale on this metric (kubectl shows <unknown>)."""


@dataclass(frozen=True)
class Pod:
    name: str
    phase: str = "Running"
    ready: bool = True  # not consulted for Pods metrics upstream (only CPU looks at readiness)
    deleting: bool = False


@dataclass(frozen=True)
class Tolerances:
    scale_down: float = DEFAULT_TOLERANCE
    scale_up: float = DEFAULT_TOLERANCE

    def within(self, ratio: float) -> bool:
        """Upstream's Tolerances.isWithin, in the same floating-point form: 22/20 (ratio 1.1) is within
        a 0.1 tolerance, where ``ratio - 1 <= 0.1`` would not be (0.10000000000000009)."""
        return (1.0 - self.scale_down) <= ratio <= (1.0 + self.scale_up)


@dataclass(frozen=True)
class Proposal:
    replicas: int
    usage_milli: int  # the average the HPA shows as current (e.g. 22/20)
    usage_ratio: float
    reason: str


def usage_ratio(metrics: Mapping[str, int], target_milli: int) -> tuple[float, int]:
    """GetMetricUsageRatio: the int64 average (Go's division truncates toward zero), then its ratio
    to the target."""
    total = sum(metrics.values())
    average = abs(total) // len(metrics) * (1 if total >= 0 else -1)
    return average / target_milli, average


def pods_metric_replicas(
    current_replicas: int,
    target_milli: int,
    pods: Sequence[Pod],
    metrics_milli: Mapping[str, int],
    tolerances: Tolerances = Tolerances(),
) -> Proposal:
    """calcPlainMetricReplicas: one sync's proposal for a Pods metric with an AverageValue target."""
    if not pods:
        raise NoMetricsError("no pods returned by selector while calculating replica count")
    # groupPods
    ready, unready, missing, ignored = 0, set(), set(), set()
    for pod in pods:
        if pod.deleting or pod.phase == "Failed":
            ignored.add(pod.name)
        elif pod.phase == "Pending":
            unready.add(pod.name)
        elif pod.name not in metrics_milli:
            missing.add(pod.name)
        else:
            ready += 1
    # removeMetricsForPods(ignored), removeMetricsForPods(unready)
    metrics = {n: v for n, v in metrics_milli.items() if n not in ignored and n not in unready}
    if not metrics:
        raise NoMetricsError("did not receive metrics for targeted pods (pods might be unready)")
    ratio, usage = usage_ratio(metrics, target_milli)
    scale_up_with_unready = bool(unready) and ratio > 1.0
    if not scale_up_with_unready and not missing:
        if tolerances.within(ratio):
            return Proposal(current_replicas, usage, ratio, "within tolerance: keep the current replicas")
        return Proposal(math.ceil(ratio * ready), usage, ratio, "usage ratio times ready pods")
    if missing:
        # Scale-down: a pod without a sample counts as exactly at the target; scale-up: as using
        # nothing. At a ratio of exactly 1.0 neither: nothing is filled in.
        if ratio < 1.0:
            metrics.update(dict.fromkeys(missing, target_milli))
        elif ratio > 1.0:
            metrics.update(dict.fromkeys(missing, 0))
    if scale_up_with_unready:
        metrics.update(dict.fromkeys(unready, 0))
    new_ratio, _ = usage_ratio(metrics, target_milli)
    if tolerances.within(new_ratio) or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return Proposal(
            current_replicas,
            usage,
            ratio,
            "with missing or unready pods filled in, within tolerance or the direction flips: keep",
        )
    replicas = math.ceil(new_ratio * len(metrics))
    if (new_ratio < 1.0 and replicas > current_replicas) or (new_ratio > 1.0 and replicas < current_replicas):
        return Proposal(current_replicas, usage, ratio, "the pod count would flip the direction: keep")
    return Proposal(replicas, usage, ratio, "recomputed with missing and unready pods filled in")
