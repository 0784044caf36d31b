"""The HorizontalPodAutoscaler's arithmetic for Pods metrics, as kube-controller-manager does it.

Follows kubernetes pkg/controller/podautoscaler: ``replica_calculator.go`` (calcPlainMetricReplicas,
groupPods, metricsclient.GetMetricUsageRatio) for one sync's proposal, and ``horizontal.go``
(normalizeDesiredReplicas, normalizeDesiredReplicasWithBehaviors and their stabilisation and rate
limits) for what the controller then does with it. Values are milli-units, integer arithmetic
where upstream uses it. Pure: time is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_TOLERANCE = 0.1


class NoMetricsError(ValueError):
    """Upstream's "did not receive metrics for targeted pods": the HPA does not scale (<unknown>)."""


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
    """metricsclient.GetMetricUsageRatio: integer average, then the ratio to the target."""
    average = sum(metrics.values()) // len(metrics)
    return average / target_milli, average


def pods_metric_replicas(
    current_replicas: int,
    target_milli: int,
    pods: Sequence[Pod],
    metrics_milli: Mapping[str, int],
    tolerances: Tolerances = Tolerances(),
) -> Proposal:
    """One sync's proposal for a Pods metric with an AverageValue target."""
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
    known = {p.name for p in pods}
    metrics = {n: v for n, v in metrics_milli.items() if n in known and n not in ignored and n not in unready}
    if not metrics:
        raise NoMetricsError("did not receive metrics for targeted pods (pods might be unready)")
    ratio, usage = usage_ratio(metrics, target_milli)
    scale_up_with_unready = bool(unready) and ratio > 1.0
    if not scale_up_with_unready and not missing:
        if tolerances.within(ratio):
            return Proposal(current_replicas, usage, ratio, "within tolerance: keep the current replicas")
        return Proposal(math.ceil(ratio * ready), usage, ratio, "usage ratio times ready pods")
    if missing:
        # Scale-down: missing pods count as at the target; scale-up: as using nothing.
        fill = target_milli if ratio < 1.0 else 0
        metrics.update(dict.fromkeys(missing, fill))
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


def largest_proposal(current_replicas: int, proposals: Sequence[int | None]) -> int | None:
    """computeReplicasForMetrics: the largest proposal across the HPA's metrics (None for a metric
    that could not be computed). No scaling (None) when every metric is invalid, or when some are
    and the others would scale down: missing data must never shrink a busy service."""
    valid = [p for p in proposals if p is not None]
    if not valid:
        return None
    largest = max(valid)
    if len(valid) < len(proposals) and largest < current_replicas:
        return None
    return largest


@dataclass(frozen=True)
class Policy:
    kind: str  # "Pods" or "Percent"
    value: int
    period_s: float


@dataclass(frozen=True)
class ScalingRules:
    stabilization_s: float
    policies: tuple[Policy, ...]
    select: str = "Max"  # "Max", "Min" or "Disabled"


# autoscaling/v2 defaults (pkg/apis/autoscaling/v2/defaults.go).
DEFAULT_SCALE_UP = ScalingRules(0, (Policy("Pods", 4, 15), Policy("Percent", 100, 15)))
DEFAULT_SCALE_DOWN = ScalingRules(300, (Policy("Percent", 100, 15),))


@dataclass
class Autoscaler:
    """The controller's memory between syncs: recommendations and scale events, as horizontal.go keeps
    them. ``behavior=None`` is the legacy path (no behavior field): a 5 minute downscale
    stabilisation window and the clamp min(maxReplicas, max(2 x current, 4))."""

    min_replicas: int
    max_replicas: int
    scale_up: ScalingRules | None = DEFAULT_SCALE_UP
    scale_down: ScalingRules | None = DEFAULT_SCALE_DOWN
    legacy_stabilization_s: float = 300
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, replica change)

    @property
    def legacy(self) -> bool:
        return self.scale_up is None or self.scale_down is None

    def decide(self, now: float, current: int, proposal: int) -> int:
        """The replicas the controller sets after a sync that proposed ``proposal``."""
        if self.legacy:
            desired = self._stabilize_legacy(now, proposal)
            limit = max(2 * current, 4)
            desired = max(self.min_replicas, min(desired, self.max_replicas, limit))
        else:
            desired = self._stabilize(now, current, proposal)
            desired = self._rate_limit(now, current, desired)
        if desired != current:
            self.events.append((now, desired - current))
        return desired

    def _stabilize_legacy(self, now: float, proposal: int) -> int:
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t <= self.legacy_stabilization_s]
        self.recommendations.append((now, proposal))
        return max(r for _, r in self.recommendations)

    def _stabilize(self, now: float, current: int, proposal: int) -> int:
        assert self.scale_up is not None and self.scale_down is not None
        keep = max(self.scale_up.stabilization_s, self.scale_down.stabilization_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t <= keep]
        self.recommendations.append((now, proposal))
        up = min(r for t, r in self.recommendations if now - t <= self.scale_up.stabilization_s)
        down = max(r for t, r in self.recommendations if now - t <= self.scale_down.stabilization_s)
        # Scale up only as far as every recent recommendation allows, and down likewise.
        if current < up:
            return up
        if current > down:
            return down
        return current

    def _rate_limit(self, now: float, current: int, desired: int) -> int:
        """convertDesiredReplicasWithBehaviorRate: the policies bound the step, never reversing it."""
        assert self.scale_up is not None and self.scale_down is not None
        if desired > current:
            ceiling = min(self.max_replicas, max(current, self._limit(now, current, self.scale_up, up=True)))
            return min(desired, ceiling)
        if desired < current:
            floor = max(self.min_replicas, min(current, self._limit(now, current, self.scale_down, up=False)))
            return max(desired, floor)
        return desired

    def _limit(self, now: float, current: int, rules: ScalingRules, up: bool) -> int:
        """calculateScaleUpLimitWithScalingRules / calculateScaleDownLimitWithBehaviors."""
        if rules.select == "Disabled":
            return current
        limits = []
        for policy in rules.policies:
            # Replicas at the start of the policy's period: undo every change made within it.
            start = current - sum(delta for t, delta in self.events if now - t < policy.period_s)
            if policy.kind == "Pods":
                limits.append(start + policy.value if up else start - policy.value)
            elif up:
                limits.append(math.ceil(start * (1 + policy.value / 100)))
            else:
                limits.append(int(start * (1 - policy.value / 100)))
        pick = max if (rules.select == "Max") == up else min
        return pick(limits)
