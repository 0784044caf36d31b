"""The simulated HPA controller's memory between syncs, after kubernetes
pkg/controller/podautoscaler/horizontal.go: the largest proposal across metrics
(computeReplicasForMetrics), stabilisation windows, the autoscaling/v2 default policies and the
legacy clamp. It drives the demo (sim/hpademo.py) and its tests; users get the one-sync
arithmetic (exporter.adapter.hpa) through ``gpu-metrics-adapter hpa-explain``. Pure: time is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter.adapter.hpa import Tolerances


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


def external_average_value_replicas(current_replicas: int, total_milli: int, target_milli: int) -> int:
    """GetExternalPerPodMetricReplicas (replica_calculator.go): one sync's proposal for an External
    metric with an AverageValue target, the HPA KEDA makes for a trigger of ``metricType: AverageValue``."""
    if Tolerances().within(total_milli / (target_milli * current_replicas)):
        return current_replicas
    return math.ceil(total_milli / target_milli)


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
