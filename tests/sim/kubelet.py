"""A real gRPC server for the kubelet's pod-resources v1 API on a unix socket, serving what a
test says each pod holds. Built from the same .proto as the agent's client."""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from exporter.podresources import api_pb2, api_pb2_grpc


@dataclass
class PodDevices:
    namespace: str
    name: str
    # container name -> [(resource name, [device ids])]
    containers: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)


class _Servicer(api_pb2_grpc.PodResourcesListerServicer):
    def __init__(self, kubelet: FakeKubelet) -> None:
        self.kubelet = kubelet

    def List(self, request: api_pb2.ListPodResourcesRequest, context: grpc.ServicerContext):  # noqa: N802
        kubelet = self.kubelet
        with kubelet.lock:
            kubelet.calls += 1
            exhausted = kubelet.exhausted
            delay = kubelet.delay_s
            pods = list(kubelet.pods)
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
                                for resource, ids in devices
                            ],
                        )
                        for container, devices in pod.containers.items()
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
