"""KEDA's ExternalScaler service, answered from the provider the HPA path uses.

The value KEDA gets is made for a trigger of ``metricType: AverageValue`` (KEDA's default), where
the HPA wants ceil(value / target) replicas: it is the pods' average times the number of pods the
selector picks, so the HPA wants the replicas the same metric as a Pods metric with that average
target would have it want (a pod not reporting yet counts at the average, neither as 0 nor as gone).
No pod reporting is an error, never 0: KEDA then keeps the replicas as they are.

Every call ends in an answer or a status: bad metadata is INVALID_ARGUMENT naming the key, a backend
that cannot answer is UNAVAILABLE, anything unexpected is logged and INTERNAL.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar, cast

import grpc

from exporter.adapter.keda import externalscaler_pb2 as pb
from exporter.adapter.keda import externalscaler_pb2_grpc as pb_grpc
from exporter.adapter.keda.trigger import (
    METRIC_NAME,
    POD_SELECTOR,
    MetadataError,
    Trigger,
    int64,
    parse_trigger,
)
from exporter.adapter.provider import (
    BadRequestError,
    CustomMetricsProvider,
    MetricInfo,
    MetricNotFoundError,
    ProviderError,
    UnavailableError,
)
from exporter.adapter.selector import Selector
from exporter.adapter.sharing import SharedAnswers, WaitTimeoutError

log = logging.getLogger(__name__)

STREAM_PERIOD_S = 5.0  # how often a StreamIsActive stream re-reads the value; it sends only changes
SHARED_TRIGGERS = 10_000  # answers shared for a second, at most this many triggers

T = TypeVar("T")
_CERTIFICATE_NAMES = ("x509_common_name", "x509_subject_alternative_name")  # gRPC's auth context keys
PodNames = Callable[[str, Selector], "list[str] | None"]


class _NoDataError(Exception):
    """No pod of the trigger's selector has a value: KEDA must keep the replicas, not see 0."""


class GpuScaler(pb_grpc.ExternalScalerServicer):
    """``pod_names`` is the pod index the provider reads (namespace, selector -> names, None until
    synced); ``deadline_s`` bounds how long a call waits for an identical one in flight (the one in
    flight is bounded by the Prometheus client's own timeout). With ``allowed_names``, a client
    certificate must carry one of them as its CN or a subject alternative name: the client CA may
    sign certificates for others than KEDA, and any caller may name any namespace."""

    def __init__(
        self,
        provider: CustomMetricsProvider,
        pod_names: PodNames,
        deadline_s: float,
        max_streams: int,
        stream_period_s: float = STREAM_PERIOD_S,
        allowed_names: frozenset[str] = frozenset(),
    ) -> None:
        self._provider = provider
        self._allowed_names = allowed_names
        self._pod_names = pod_names
        self._shared = SharedAnswers(SHARED_TRIGGERS, lambda _: 1, wait_s=deadline_s)
        self._streams = threading.BoundedSemaphore(max_streams)
        self._max_streams = max_streams
        self._stream_period_s = stream_period_s
        self.stopping = threading.Event()

    def GetMetricSpec(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext) -> pb.GetMetricSpecResponse:  # noqa: N802 (the proto's names)
        self._admit(context)
        trigger = _answer(context, "GetMetricSpec", lambda: self._trigger(request))
        spec = pb.MetricSpec(
            metricName=trigger.metric, targetSize=int64(trigger.target, math.ceil), targetSizeFloat=trigger.target
        )
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    def GetMetrics(self, request: pb.GetMetricsRequest, context: grpc.ServicerContext) -> pb.GetMetricsResponse:  # noqa: N802
        def total() -> tuple[Trigger, float]:
            trigger = self._trigger(request.scaledObjectRef)
            average, pods = self._reading(trigger)
            return trigger, average * pods

        self._admit(context)
        trigger, value = _answer(context, "GetMetrics", total)
        name = request.metricName or trigger.metric
        return pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName=name, metricValue=int64(value), metricValueFloat=_finite(value))]
        )

    def IsActive(self, request: pb.ScaledObjectRef, context: grpc.ServicerContext) -> pb.IsActiveResponse:  # noqa: N802
        self._admit(context)
        return pb.IsActiveResponse(result=_answer(context, "IsActive", lambda: self._active(request)))

    def StreamIsActive(  # noqa: N802
        self, request: pb.ScaledObjectRef, context: grpc.ServicerContext
    ) -> Iterator[pb.IsActiveResponse]:
        """Sends the state at once, then each change; an error ends the stream (KEDA reconnects)."""
        self._admit(context)
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {self._max_streams} streams are served")
        try:
            ended = threading.Event()
            context.add_callback(ended.set)
            last: bool | None = None
            while not ended.is_set() and not self.stopping.is_set():
                active = _answer(context, "StreamIsActive", lambda: self._active(request))
                if active != last:
                    yield pb.IsActiveResponse(result=active)
                    last = active
                ended.wait(self._stream_period_s)
        finally:
            self._streams.release()

    def _admit(self, context: grpc.ServicerContext) -> None:
        """Ends the call with PERMISSION_DENIED unless the client certificate carries an allowed name."""
        if not self._allowed_names:
            return
        auth = cast("Mapping[str, Sequence[bytes]]", context.auth_context())  # grpc-stubs say bytes: a list
        names = {n.decode() for key in _CERTIFICATE_NAMES for n in auth.get(key, ())}
        if not names & self._allowed_names:
            common_name = b"".join(auth.get("x509_common_name", ())).decode() or "none"
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the client certificate (CN {common_name}) has no name of --keda-scaler-allowed-names",
            )

    def _trigger(self, ref: pb.ScaledObjectRef) -> Trigger:
        pod_metrics = frozenset(m.metric for m in self._provider.list_all_metrics() if m.resource == "pods")
        return parse_trigger(ref.namespace, dict(ref.scalerMetadata), pod_metrics)

    def _active(self, ref: pb.ScaledObjectRef) -> bool:
        trigger = self._trigger(ref)
        average, _ = self._reading(trigger)
        return average > trigger.activation

    def _reading(self, trigger: Trigger) -> tuple[float, int]:
        """The average over the pods with a value, and how many pods the selector picks (at least as
        many as have a value). An identical trigger's reading within a second is shared."""

        def read() -> tuple[float, int]:
            info = MetricInfo("pods", trigger.metric, True)
            values = self._provider.get_metric_by_selector(trigger.namespace, trigger.pod_selector, info)
            if not values:
                raise _NoDataError(
                    f"no pod of {POD_SELECTOR} {trigger.pod_selector_text!r} in the namespace {trigger.namespace} "
                    f"has a value of {trigger.metric}"
                )
            names = self._pod_names(trigger.namespace, trigger.pod_selector) or []
            return sum(v.value for v in values) / len(values), max(len(names), len(values))

        reading: tuple[float, int] = self._shared.get(trigger.key, read)
        return reading


def _finite(value: float) -> float:
    """A sum past the float range clamped, as KEDA converts the float to int64 milli-units."""
    return value if math.isfinite(value) else float(int64(value))


def _answer(context: grpc.ServicerContext, call: str, compute: Callable[[], T]) -> T:
    """``compute()``'s result, or the call ended with the status its failure deserves (abort raises)."""
    try:
        return compute()
    except MetadataError as error:
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    except MetricNotFoundError:
        code, message = grpc.StatusCode.INVALID_ARGUMENT, f"{METRIC_NAME}: not served by the adapter's rules"
    except BadRequestError as error:
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    except _NoDataError as error:
        code, message = grpc.StatusCode.NOT_FOUND, str(error)
    except UnavailableError as error:
        code, message = grpc.StatusCode.UNAVAILABLE, str(error)
    except WaitTimeoutError:
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the metrics backend did not answer in time"
    except ProviderError as error:
        code, message = grpc.StatusCode.INTERNAL, str(error)
    except Exception:  # a bug: answer, log, keep serving
        log.exception("KEDA %s failed", call)
        code, message = grpc.StatusCode.INTERNAL, "an error on the server prevented the call from succeeding"
    context.abort(code, message)
