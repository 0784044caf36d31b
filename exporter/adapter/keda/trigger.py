"""A KEDA external trigger's metadata, checked: which Pods metric, over which pods, against what target.

KEDA sends every call the ScaledObject's namespace and its trigger's ``metadata`` map, every value a
string (and keys of its own, such as ``scalerAddress``, which are ignored here). A bad value is a
:class:`MetadataError` naming its key, which the scaler answers as INVALID_ARGUMENT. Pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from exporter.adapter.selector import Selector, SelectorError, parse_selector

METRIC_NAME = "metricName"
POD_SELECTOR = "podSelector"
TARGET = "targetAverageValue"
ACTIVATION = "activationThreshold"
# A ScaledObject reads its own namespace's pods only: a key that looks like it could name another is refused.
NAMESPACE_KEYS = frozenset({"namespace", "podNamespace"})

INT64_MAX = 2**63 - 1  # the proto's targetSize and metricValue are int64
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class MetadataError(ValueError):
    """The trigger cannot be served; the message starts with the metadata key at fault."""


@dataclass(frozen=True)
class Trigger:
    namespace: str
    metric: str  # a Pods metric of the adapter's rules
    pod_selector: Selector
    pod_selector_text: str
    target: float  # per pod, as an HPA's AverageValue target
    activation: float  # active while the pods' average is above it

    @property
    def key(self) -> str:
        """Identical triggers (every ScaledObject of one Deployment, each KEDA poll) share one answer."""
        return "\0".join(("keda", self.namespace, self.metric, self.pod_selector_text))


def parse_trigger(namespace: str, metadata: Mapping[str, str], pod_metrics: frozenset[str]) -> Trigger:
    """The trigger of a ScaledObject in ``namespace``; ``pod_metrics`` are the Pods metrics served."""
    if not _DNS_LABEL.fullmatch(namespace):
        raise MetadataError(f"namespace: want the ScaledObject's namespace (a DNS label), got {namespace!r}")
    elsewhere = sorted(NAMESPACE_KEYS & set(metadata))
    if elsewhere:
        raise MetadataError(f"{elsewhere[0]}: a ScaledObject reads only its own namespace's pods; remove this key")
    metric = _required(metadata, METRIC_NAME)
    if metric not in pod_metrics:
        raise MetadataError(f"{METRIC_NAME}: {metric!r} is not a Pods metric of the adapter's rules")
    selector_text = _required(metadata, POD_SELECTOR)
    try:
        selector = parse_selector(selector_text)
    except SelectorError as error:
        raise MetadataError(f"{POD_SELECTOR}: {error}") from error
    target = _number(TARGET, _required(metadata, TARGET))
    if target <= 0:
        raise MetadataError(f"{TARGET}: want a number above 0, got {metadata[TARGET]!r}")
    activation = _number(ACTIVATION, metadata.get(ACTIVATION, "0"))
    if activation < 0:
        raise MetadataError(f"{ACTIVATION}: want a number of at least 0, got {metadata[ACTIVATION]!r}")
    return Trigger(namespace, metric, selector, selector_text, target, activation)


def _required(metadata: Mapping[str, str], key: str) -> str:
    value = metadata.get(key, "").strip()
    if not value:
        raise MetadataError(f"{key}: required in the trigger's metadata")
    return value


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MetadataError(f"{key}: want a number, got {text!r}") from None
    if not math.isfinite(value) or math.ceil(value) > INT64_MAX:
        raise MetadataError(f"{key}: want a finite number of at most {INT64_MAX} (int64), got {text!r}")
    return value


def int64(value: float, rounding: Callable[[float], int] = round) -> int:
    """``value`` rounded, clamped to the int64 a proto field carries (a sum of large values may pass it)."""
    if value >= INT64_MAX:
        return INT64_MAX
    if value <= -INT64_MAX - 1:
        return -INT64_MAX - 1
    return rounding(value)
