"""The adapter's Kubernetes API edge: TokenReview, SubjectAccessReview, and the front proxy's
CA from the ``kube-system/extension-apiserver-authentication`` ConfigMap."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from exporter.adapter.auth import User


class KubeReviewer:
    def __init__(self, authentication: client.ApiClient, authorization: client.ApiClient) -> None:
        self._authn = client.AuthenticationV1Api(authentication)
        self._authz = client.AuthorizationV1Api(authorization)

    def review_token(self, token: str) -> User | None:
        review = self._authn.create_token_review(client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)))
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return None
        return User(status.user.username or "", tuple(status.user.groups or ()))

    def review_access(self, user: User, attributes: Mapping[str, Any]) -> bool:
        spec = client.V1SubjectAccessReviewSpec(user=user.name, groups=list(user.groups))
        if "path" in attributes:
            spec.non_resource_attributes = client.V1NonResourceAttributes(**attributes)
        else:
            spec.resource_attributes = client.V1ResourceAttributes(**attributes)
        review = self._authz.create_subject_access_review(client.V1SubjectAccessReview(spec=spec))
        return bool(review.status and review.status.allowed)


@dataclass(frozen=True)
class RequestHeaderConfig:
    client_ca_pem: str
    allowed_names: tuple[str, ...]
    username_headers: tuple[str, ...]
    group_headers: tuple[str, ...]


def read_requestheader_config(api: client.ApiClient) -> RequestHeaderConfig:
    """What kube-apiserver publishes about its front-proxy client certificates."""
    config_map = client.CoreV1Api(api).read_namespaced_config_map("extension-apiserver-authentication", "kube-system")
    data: dict[str, str] = config_map.data or {}

    def listed(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(json.loads(data[key])) if data.get(key) else default

    if not data.get("requestheader-client-ca-file"):
        raise ValueError("kube-system/extension-apiserver-authentication has no requestheader-client-ca-file")
    return RequestHeaderConfig(
        client_ca_pem=data["requestheader-client-ca-file"],
        allowed_names=listed("requestheader-allowed-names", ()),
        username_headers=listed("requestheader-username-headers", ("X-Remote-User",)),
        group_headers=listed("requestheader-group-headers", ("X-Remote-Group",)),
    )
