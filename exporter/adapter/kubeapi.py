"""The adapter's Kubernetes API edge: TokenReview, SubjectAccessReview (sent the whole user: name,
UID, groups and extra, as k8s.io/apiserver's webhook authorizer does), and the front proxy's CA and
header names from the ``kube-system/extension-apiserver-authentication`` ConfigMap. Every call has a
deadline: a request thread never waits on the API for longer than ``REQUEST_TIMEOUT_S``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import urllib3
from kubernetes import client

from exporter.adapter.auth import RequestHeaderConfig, User, frozen_extra, header_names
from exporter.sources.kubeclient import Credentials, basic_authorization

REQUEST_TIMEOUT_S = 10


def api_client(credentials: Credentials) -> client.ApiClient:
    """The kubernetes package's client on the credentials the pod watch uses (kubeclient's loader), so
    one kubeconfig means the same server, TLS and identity to both, and is refused by both alike."""
    configuration = client.Configuration(host=credentials.where)
    token = credentials.token
    if token is not None:
        # Asked for before every request, so a rotated token file is used at once, as the watch does.
        configuration.api_key = {"authorization": ""}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        # The package annotates this documented hook as None.
        configuration.refresh_api_key_hook = lambda c: c.api_key.update(authorization=token())  # type: ignore[assignment]
    api = client.ApiClient(configuration)
    if token is None and credentials.basic_auth is not None:
        api.set_default_header("Authorization", basic_authorization(*credentials.basic_auth))
    tls = credentials.tls
    # The package builds its TLS from file paths; the loaded context (CA, client pair, insecure) is
    # handed to its connection pool whole instead.
    api.rest_client.pool_manager = urllib3.PoolManager(
        maxsize=configuration.connection_pool_maxsize,
        ssl_context=tls,
        cert_reqs=tls.verify_mode if tls is not None else None,
        server_hostname=credentials.server_hostname,
    )
    return api


class KubeReviewer:
    def __init__(self, authentication: client.ApiClient, authorization: client.ApiClient) -> None:
        self._authn = client.AuthenticationV1Api(authentication)
        self._authz = client.AuthorizationV1Api(authorization)

    def review_token(self, token: str) -> User | None:
        review = self._authn.create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)), _request_timeout=REQUEST_TIMEOUT_S
        )
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return None
        found = status.user
        return User(found.username or "", tuple(found.groups or ()), found.uid or "", frozen_extra(found.extra or {}))

    def review_access(self, user: User, attributes: Mapping[str, Any]) -> bool:
        spec = client.V1SubjectAccessReviewSpec(
            user=user.name,
            groups=list(user.groups),
            uid=user.uid or None,  # None: left out, as Go's omitempty does
            extra={key: list(values) for key, values in user.extra} or None,
        )
        if "path" in attributes:
            spec.non_resource_attributes = client.V1NonResourceAttributes(**attributes)
        else:
            spec.resource_attributes = client.V1ResourceAttributes(**attributes)
        review = self._authz.create_subject_access_review(
            client.V1SubjectAccessReview(spec=spec), _request_timeout=REQUEST_TIMEOUT_S
        )
        return bool(review.status and review.status.allowed)


def read_requestheader_config(api: client.ApiClient) -> RequestHeaderConfig:
    """What kube-apiserver publishes about its front-proxy client certificates. UID headers or extra
    prefixes left out of the ConfigMap honour none, as upstream's RequestHeaderAuthRequestController
    reads them (kube-apiserver before 1.32 publishes no UID headers)."""
    config_map = client.CoreV1Api(api).read_namespaced_config_map(
        "extension-apiserver-authentication", "kube-system", _request_timeout=REQUEST_TIMEOUT_S
    )
    data: dict[str, str] = config_map.data or {}

    where = "kube-system/extension-apiserver-authentication"

    def listed(key: str, default: tuple[str, ...]) -> object:
        return json.loads(data[key]) if data.get(key) else default

    def headers(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        return header_names(listed(key, default), f"{where} {key}")

    if not data.get("requestheader-client-ca-file"):
        raise ValueError(f"{where} has no requestheader-client-ca-file")
    allowed = listed("requestheader-allowed-names", ())
    if not isinstance(allowed, (list, tuple)) or not all(isinstance(name, str) for name in allowed):
        raise ValueError(f"{where} requestheader-allowed-names: want a list of names, got {allowed!r}")
    return RequestHeaderConfig(
        client_ca_pem=data["requestheader-client-ca-file"],
        allowed_names=tuple(allowed),
        username_headers=headers("requestheader-username-headers", ("X-Remote-User",)),
        group_headers=headers("requestheader-group-headers", ("X-Remote-Group",)),
        uid_headers=headers("requestheader-uid-headers", ()),
        extra_header_prefixes=headers("requestheader-extra-headers-prefix", ()),
    )


def read_api_services(api: client.ApiClient) -> dict[str, tuple[str, str] | None]:
    """Every registered APIService's name and the Service (namespace, name) it sends requests to
    (None for a group kube-apiserver serves itself)."""
    found = client.ApiregistrationV1Api(api).list_api_service(_request_timeout=REQUEST_TIMEOUT_S)
    services: dict[str, tuple[str, str] | None] = {}
    for item in found.items:
        name = item.metadata.name if item.metadata else None
        service = item.spec.service if item.spec else None
        if name:
            services[name] = (service.namespace or "", service.name or "") if service else None
    return services
