"""The kubelet edge: the only module that speaks gRPC. Lists device allocations over pod-resources v1:
the device plugins' (``devices``) and Dynamic Resource Allocation's (``dynamic_resources``).

A channel on the kubelet's unix socket for each List, closed after it: the List comes every few
seconds, a local dial costs little, and an open channel kept gRPC's threads waking while idle. A
restarted kubelet is simply reached by the next dial. The kubelet rate-limits this API and answers
RESOURCE_EXHAUSTED past it: the caller (``exporter.sources.podsources``) backs off on every failure.
"""

from __future__ import annotations

import logging
from collections import Counter

import grpc

from exporter.model import Allocation, ClaimAllocation
from exporter.sources.podresources import api_pb2, api_pb2_grpc
from exporter.supervise import StateLog

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 16 * 1024 * 1024  # large nodes exceed gRPC's 4 MiB default


class PodResourcesClient:
    def __init__(self, socket_path: str, timeout_s: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.up = False
        self.errors: Counter[str] = Counter()  # gRPC status code name -> count
        self._state = StateLog(log, f"kubelet pod-resources at {socket_path}")

    def list_allocations(self) -> list[Allocation] | None:
        """The kubelet's current device allocations (DRA ones as ``ClaimAllocation``), or None when it
        cannot be asked right now."""
        channel = grpc.insecure_channel(
            f"unix://{self.socket_path}", options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        )
        try:
            response = api_pb2_grpc.PodResourcesListerStub(channel).List(
                api_pb2.ListPodResourcesRequest(), timeout=self.timeout_s
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            self._fail(code.name, error.details() if isinstance(error, grpc.Call) else str(error))
            return None
        except Exception as error:  # outside gRPC's own errors (a bug, a resource limit): no answer either
            self._fail("UNEXPECTED", repr(error))
            return None
        finally:
            channel.close()
        if not self._state.recovered() and not self.up:
            log.info("kubelet pod-resources reachable at %s", self.socket_path)
        self.up = True
        allocations = [
            Allocation(
                namespace=pod.namespace,
                pod=pod.name,
                container=container.name,
                resource_name=devices.resource_name,
                device_id=device_id,
            )
            for pod in response.pod_resources
            for container in pod.containers
            for devices in container.devices
            for device_id in devices.device_ids
        ]
        # Dynamic Resource Allocation: empty from a kubelet before 1.34 (or with the gate off).
        allocations.extend(
            ClaimAllocation(
                namespace=pod.namespace,
                pod=pod.name,
                container=container.name,
                resource_name=device.driver_name,
                device_id=device.device_name,
                claim_namespace=claim.claim_namespace,
                claim=claim.claim_name,
                pool=device.pool_name,
                share_id=device.share_id if device.HasField("share_id") else None,
            )
            for pod in response.pod_resources
            for container in pod.containers
            for claim in container.dynamic_resources
            for device in claim.claim_resources
        )
        return allocations

    def _fail(self, code: str, detail: str | None) -> None:
        self.up = False
        self.errors[code] += 1
        # The state is the status code alone: its details vary from one attempt to the next.
        self._state.failed(
            code, f"{detail}; exporting without pod labels" if detail else "exporting without pod labels"
        )
