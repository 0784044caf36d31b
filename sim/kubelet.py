"""A real gRPC server for the kubelet's pod-resources v1 API on a unix socket, serving what a
test says each pod holds: device-plugin devices, and Dynamic Resource Allocation claims in
``dynamic_resources`` as a 1.35 kubelet does (driver, pool and device names, the CDI device name
NVIDIA's driver gives, ``share_id`` when set). ``dynamic_resources=False`` plays a kubelet that
does not send them (older than 1.34, or the gate off). Built from the same .proto as the agent's
client."""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from exporter.sources.podresources import api_pb2, api_pb2_grpc


@dataclass(frozen=True)
class ClaimDevice:
    """One device of a claim: (driver, pool, device) as in the node's ResourceSlices."""

    driver: str
    pool: str
    device: str
    share_id: str | None = None


@dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    devices: tuple[ClaimDevice, ...]


@dataclass
class PodDevices:
    namespace: str
    name: str
    # container name -> [(resource name, [device ids])]
    containers: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    # container name -> the DRA claims it uses
    claims: dict[str, list[Claim]] = field(default_factory=dict)


def _dynamic_resources(claims: list[Claim]) -> list[api_pb2.DynamicResource]:
    return [
        api_pb2.DynamicResource(
            claim_name=claim.name,
            claim_namespace=claim.namespace,
            claim_resources=[
                api_pb2.ClaimResource(
                    cdi_devices=[api_pb2.CDIDevice(name=f"k8s.{d.driver}/claim={claim.name}-{d.device}")],
                    driver_name=d.driver,
                    pool_name=d.pool,
                    device_name=d.device,
                    share_id=d.share_id,
                )
                for d in claim.devices
            ],
        )
        for claim in claims
    ]


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    def List(  # noqa: N802
        self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
    ) -> api_pb2.ListPodResourcesResponse:
        kubelet = self.kubelet
        with kubelet.lock:
            kubelet.calls += 1
            exhausted = kubelet.exhausted
            delay = kubelet.delay_s
            pods = list(kubelet.pods)
            dynamic = kubelet.dynamic_resources
        if exhausted:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rejected request by rate limit")
        if delay:
            time.sleep(delay)
        return api_pb2.ListPodResourcesResponse(
            pod_resources=[
                api_pb2.PodResources(
                    name=pod.name,
                    namespace=pod.namespace,
                    containers=[
                        api_pb2.ContainerResources(
                            name=container,
                            devices=[
                                api_pb2.ContainerDevices(resource_name=resource, device_ids=ids)
                                for resource, ids in pod.containers.get(container, [])
                            ],
                            dynamic_resources=_dynamic_resources(pod.claims.get(container, []) if dynamic else []),
                        )
                        for container in dict.fromkeys([*pod.containers, *pod.claims])
                    ],
                )
                for pod in pods
            ]
        )


class FakeKubelet:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lock = threading.Lock()
        self.pods: list[PodDevices] = []
        self.calls = 0
        self.exhausted = False
        self.delay_s = 0.0
        self.dynamic_resources = True
        self._server: grpc.Server | None = None

    def set_pods(self, pods: list[PodDevices]) -> None:
        with self.lock:
            self.pods = list(pods)

    def start(self) -> FakeKubelet:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
