"""Whom the adapter trusts, over real TLS: the front proxy's CA read until it is read and replaced
when it rotates, readiness that waits for it, authentication as k8s.io/apiserver's union
authenticator does it (a certificate that does not authenticate leaves the bearer token to decide),
and the user's UID and extra, from the front proxy's headers or a TokenReview, reaching the
SubjectAccessReview.

kube-apiserver is played by sim/apiserver.py (TokenReview, SubjectAccessReview, the
``extension-apiserver-authentication`` ConfigMap, pods), speaking the real API's JSON.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.adapter.auth import Authenticator, Authorizer, RequestHeaderConfig, User
from exporter.adapter.frontproxy import FrontProxyTrust
from exporter.adapter.server import AdapterServer, Services
from exporter.backoff import Backoff
from sim.apiserver import FakeApiServer
from sim.certs import Pki, make_pki
from sim.processes import adapter_args, free_port, spawn_adapter

DISCOVERY = "/apis/custom.metrics.k8s.io/v1beta1"
CONFIG_MAP = ("kube-system", "extension-apiserver-authentication")


def published(pki: Pki, allowed: str = "prometheus") -> dict[str, str]:
    """The ConfigMap's data as kube-apiserver writes it (lists as JSON strings)."""
    return {
        "requestheader-client-ca-file": pki.ca.read_text(),
        "requestheader-allowed-names": json.dumps([allowed]),
        "requestheader-username-headers": json.dumps(["X-Remote-User"]),
        "requestheader-group-headers": json.dumps(["X-Remote-Group"]),
    }


def until(check: Callable[[], bool], timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class Adapter:
    def __init__(self, directory: Path, api: FakeApiServer, pki: Pki, *extra: str) -> None:
        self.port = free_port()
        self.pki = pki
        self.log = directory / f"adapter-{self.port}.log"
        kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
        nowhere = f"http://127.0.0.1:{free_port()}"  # discovery needs no Prometheus
        self.process = spawn_adapter(
            self.port, *adapter_args(pki, kubeconfig, nowhere, front_proxy_ca=False), *extra, output=self.log
        )
        self.process.wait_for_port(self.port)

    def get(self, path: str, cert: bool = True, **headers: str) -> requests.Response:
        return requests.get(
            f"https://127.0.0.1:{self.port}{path}",
            headers={k.replace("_", "-"): v for k, v in headers.items()},
            verify=str(self.pki.ca),
            cert=(str(self.pki.client_cert), str(self.pki.client_key)) if cert else None,
            timeout=10,
        )

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    server.tokens["bob-token"] = ("bob", ["system:authenticated"])
    yield server
    server.stop()


def test_the_front_proxy_ca_is_read_once_it_can_be_and_readiness_waits_for_it(
    tmp_path: Path, api: FakeApiServer
) -> None:
    pki = make_pki(tmp_path / "pki")
    adapter = Adapter(tmp_path, api, pki)  # the ConfigMap cannot be read yet (404)
    try:
        assert until(lambda: "front proxy" in adapter.get("/readyz", cert=False).text), adapter.log.read_text()
        assert adapter.get("/readyz", cert=False).status_code == 503
        assert adapter.get(DISCOVERY, X_Remote_User="hpa").status_code == 401
        assert adapter.get(DISCOVERY, cert=False, Authorization="Bearer bob-token").status_code == 200
        api.config_maps[CONFIG_MAP] = published(pki)
        assert until(lambda: adapter.get(DISCOVERY, X_Remote_User="hpa").status_code == 200), adapter.log.read_text()
        assert adapter.get("/readyz", cert=False).status_code == 200
        log = adapter.log.read_text()
        assert log.count("reading the front proxy's CA failing") == 1  # once per change of state, not per retry
        assert log.count("reading the front proxy's CA recovered") == 1
    finally:
        adapter.stop()


def test_a_published_header_list_that_is_no_list_of_header_names_is_not_used(
    tmp_path: Path, api: FakeApiServer
) -> None:
    pki = make_pki(tmp_path / "pki")
    # A JSON string, not a list: read as a list, "X" would make every X-... header extra.
    api.config_maps[CONFIG_MAP] = published(pki) | {"requestheader-extra-headers-prefix": json.dumps("X")}
    adapter = Adapter(tmp_path, api, pki)
    try:
        assert until(lambda: "front proxy" in adapter.get("/readyz", cert=False).text), adapter.log.read_text()
        assert adapter.get(DISCOVERY, X_Remote_User="hpa").status_code == 401
        assert "requestheader-extra-headers-prefix" in adapter.log.read_text()
        api.config_maps[CONFIG_MAP] = published(pki) | {
            "requestheader-extra-headers-prefix": json.dumps(["X-Remote-Extra-"])
        }
        assert until(lambda: adapter.get(DISCOVERY, X_Remote_User="hpa").status_code == 200), adapter.log.read_text()
    finally:
        adapter.stop()


def test_a_certificate_that_does_not_authenticate_leaves_the_token_to_decide(
    tmp_path: Path, api: FakeApiServer
) -> None:
    pki = make_pki(tmp_path / "pki")  # its client certificate's CN is "prometheus"
    adapter = Adapter(
        tmp_path,
        api,
        pki,
        "--requestheader-client-ca-file",
        str(pki.ca),
        "--requestheader-allowed-names",
        "front-proxy",
    )
    try:
        assert adapter.get(DISCOVERY, X_Remote_User="hpa").status_code == 401  # CN not allowed, no token
        assert adapter.get(DISCOVERY, X_Remote_User="hpa", Authorization="Bearer bob-token").status_code == 200
        review = api.access_reviews[-1]
        assert review["user"] == "bob"  # the token's user, never the header's
        assert adapter.get(DISCOVERY, cert=False, Authorization="bearer bob-token").status_code == 200
        assert adapter.get(DISCOVERY, cert=False, Authorization="BEARER bob-token").status_code == 200
    finally:
        adapter.stop()


SCOPES = "example.com/scopes"  # an extra key holding a "/": the front proxy sends it %-escaped


def scoped(uid: str) -> Callable[[dict[str, Any]], bool]:
    """An authorizer (a webhook's, say) that allows only this UID, and only with the ``gpu-metrics``
    scope in its extra."""
    return lambda spec: spec.get("uid") == uid and spec.get("extra", {}).get(SCOPES) == ["gpu-metrics"]


@pytest.mark.parametrize("source", ["flags", "ConfigMap"])
def test_the_front_proxys_uid_and_extra_decide_the_access_review(
    tmp_path: Path, api: FakeApiServer, source: str
) -> None:
    pki = make_pki(tmp_path / "pki")
    uid_headers, extra_prefixes = ["X-Remote-Uid"], ["X-Remote-Extra-", "X-Front-Extra-"]
    if source == "flags":
        settings = [
            "--requestheader-client-ca-file",
            str(pki.ca),
            "--requestheader-uid-headers",
            ",".join(uid_headers),
            "--requestheader-extra-headers-prefix",
            ",".join(extra_prefixes),
        ]
    else:
        settings = []
        api.config_maps[CONFIG_MAP] = published(pki) | {
            "requestheader-uid-headers": json.dumps(uid_headers),
            "requestheader-extra-headers-prefix": json.dumps(extra_prefixes),
        }
    api.allow = scoped("hpa-uid")
    adapter = Adapter(tmp_path, api, pki, *settings)

    def status(headers: dict[str, str]) -> int:
        """As kube-apiserver's proxy sends it: the user, a group and ``headers``."""
        return adapter.get(DISCOVERY, True, **{"X-Remote-User": "hpa", "X-Remote-Group": "g", **headers}).status_code

    try:
        assert status({"X-Remote-Uid": "hpa-uid", "X-Remote-Extra-Example.com%2FScopes": "gpu-metrics"}) == 200
        review = api.access_reviews[-1]
        assert (review["user"], review["uid"], review["groups"]) == ("hpa", "hpa-uid", ["g"])
        assert review["extra"] == {SCOPES: ["gpu-metrics"]}
        # The prefix in any case, the key lowercased before it is unescaped: the same extra.
        assert status({"X-Remote-Uid": "hpa-uid", "x-remote-EXTRA-example.COM%2fscopes": "gpu-metrics"}) == 200
        # Another extra or UID for the same user and groups: asked again, never the decision cached above.
        assert status({"X-Remote-Uid": "hpa-uid", "X-Remote-Extra-Example.com%2FScopes": "all-metrics"}) == 403
        assert status({"X-Remote-Uid": "other-uid", "X-Remote-Extra-Example.com%2FScopes": "gpu-metrics"}) == 403
        assert status({"X-Remote-Extra-Example.com%2FScopes": "gpu-metrics"}) == 403
        # Values gathered prefix by prefix, in the prefixes' order; a malformed escape kept as it came.
        gathered = {
            "X-Remote-Uid": "hpa-uid",
            "X-Front-Extra-Example.com%2FScopes": "more",
            "X-Remote-Extra-Example.com%2FScopes": "gpu-metrics",
            "X-Remote-Extra-Bad%zzKey": "kept",
        }
        assert status(gathered) == 403
        assert api.access_reviews[-1]["extra"] == {SCOPES: ["gpu-metrics", "more"], "bad%zzkey": ["kept"]}
    finally:
        adapter.stop()


def test_a_tokens_uid_and_extra_decide_the_access_review(tmp_path: Path, api: FakeApiServer) -> None:
    groups = ["system:authenticated"]
    api.tokens["scoped-token"] = ("carol", groups, "carol-uid", {SCOPES: ["gpu-metrics"]})
    api.tokens["other-scope-token"] = ("carol", groups, "carol-uid", {SCOPES: ["all-metrics"]})
    api.tokens["other-uid-token"] = ("carol", groups, "carol-2", {SCOPES: ["gpu-metrics"]})
    api.allow = scoped("carol-uid")
    adapter = Adapter(tmp_path, api, make_pki(tmp_path / "pki"))
    try:
        assert adapter.get(DISCOVERY, cert=False, Authorization="Bearer scoped-token").status_code == 200
        review = api.access_reviews[-1]
        assert (review["user"], review["uid"], review["extra"]) == ("carol", "carol-uid", {SCOPES: ["gpu-metrics"]})
        # The same name and groups with another extra or UID: asked again, never the decision cached above.
        assert adapter.get(DISCOVERY, cert=False, Authorization="Bearer other-scope-token").status_code == 403
        assert adapter.get(DISCOVERY, cert=False, Authorization="Bearer other-uid-token").status_code == 403
    finally:
        adapter.stop()


def test_one_kubeconfig_serves_the_reviews_the_configmap_and_the_pod_watch_alike(tmp_path: Path) -> None:
    """The reviews' client, the ConfigMap's and the pod watch read one kubeconfig with one loader: its
    CA (inline), client certificate and token reach the API server from all three."""
    pki = make_pki(tmp_path / "pki")
    api = FakeApiServer(tls=pki, token="adapter-token").start()  # GETs without the token are 401
    api.tokens["bob-token"] = ("bob", ["system:authenticated"])
    api.config_maps[CONFIG_MAP] = published(pki)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token="adapter-token", client_cert=True, inline=True)
    port = free_port()
    log = tmp_path / "adapter.log"
    nowhere = f"http://127.0.0.1:{free_port()}"
    process = spawn_adapter(port, *adapter_args(pki, kubeconfig, nowhere, front_proxy_ca=False), output=log)
    url = f"https://127.0.0.1:{port}"

    def get(path: str, **headers: str) -> requests.Response:
        return requests.get(url + path, headers=headers, verify=str(pki.ca), timeout=10)

    try:
        process.wait_for_port(port)
        # Ready: the pod watch has synced and the ConfigMap (the front proxy's CA) has been read.
        assert until(lambda: get("/readyz").status_code == 200), log.read_text()
        # A bearer token: a TokenReview, then a SubjectAccessReview, both over TLS to the same server.
        assert get(DISCOVERY, Authorization="Bearer bob-token").status_code == 200, log.read_text()
        assert api.access_reviews[-1]["user"] == "bob"
        paths = {call.path for call in api.calls if call.method == "GET"}
        assert {"/api/v1/pods", "/api/v1/namespaces/kube-system/configmaps/extension-apiserver-authentication"} <= paths
        gets = [call for call in api.calls if call.method == "GET"]
        assert {(call.authorization, call.client_cn) for call in gets} == {("Bearer adapter-token", "prometheus")}
    finally:
        process.stop()
        api.stop()


def status_line(connection: ssl.SSLSocket, request: bytes) -> bytes:
    """The status line of the answer to one request (b"" when the connection is closed instead)."""
    connection.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        data = connection.recv(65536)
        if not data:
            return head
        head += data
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += connection.recv(65536)
    return head.split(b"\r\n", 1)[0]


class _Allow:
    def review_token(self, token: str) -> User | None:
        return None

    def review_access(self, user: User, attributes: Any) -> bool:
        return True


class _NoMetrics:
    def list_all_metrics(self) -> list[Any]:
        return []

    def list_all_external_metrics(self) -> list[str]:
        return []


def test_a_rotated_front_proxy_ca_is_trusted_for_new_connections(tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    services = Services(
        custom=_NoMetrics(),  # type: ignore[arg-type]
        external=_NoMetrics(),  # type: ignore[arg-type]
        authenticator=Authenticator(_Allow()),
        authorizer=Authorizer(_Allow()),
        always_allow_paths=frozenset({"/readyz"}),
        not_ready=lambda: "",
    )
    # Both serving pairs are signed by their own CA: serve with the old one's throughout.
    server = AdapterServer(("127.0.0.1", 0), str(old.server_cert), str(old.server_key), services)
    server.start()
    published_ca = [old.ca]
    trust = FrontProxyTrust(
        lambda: RequestHeaderConfig(published_ca[0].read_text()),
        server.trust,
        refresh_s=0.2,
        backoff=Backoff(initial_s=0.1, cap_s=0.2),
    )
    trust.start()

    def status(pki: Pki) -> int | str:
        try:
            return requests.get(
                f"https://127.0.0.1:{server.server_address[1]}/apis",
                headers={"X-Remote-User": "kube-apiserver"},
                verify=str(old.ca),
                cert=(str(pki.client_cert), str(pki.client_key)),
                timeout=5,
            ).status_code
        except requests.exceptions.SSLError:
            return "refused in the TLS handshake"

    try:
        assert status(old) == 200
        assert status(new) == "refused in the TLS handshake"
        published_ca[0] = new.ca  # kube-apiserver's front-proxy CA rotates
        assert until(lambda: status(new) == 200, timeout_s=10)
        assert status(old) == "refused in the TLS handshake"
    finally:
        trust.stop()
        server.shutdown()
        server.server_close()


class _Recording(_Allow):
    def __init__(self) -> None:
        self.users: list[str] = []

    def review_access(self, user: User, attributes: Any) -> bool:
        self.users.append(user.name)
        return True


def test_a_kept_alive_connection_is_not_trusted_past_a_ca_rotation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """k8s.io/apiserver checks the front proxy's chain against the current CA on every request: a
    connection verified under a CA since replaced must not go on naming users in X-Remote-User. It
    is closed unanswered, so that the client retries on a new connection (it once got a 500, and the
    adapter logged a traceback)."""
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    ca_file = tmp_path / "requestheader-ca.crt"
    ca_file.write_bytes(old.ca.read_bytes())
    authorizer = _Recording()
    services = Services(
        custom=_NoMetrics(),  # type: ignore[arg-type]
        external=_NoMetrics(),  # type: ignore[arg-type]
        authenticator=Authenticator(_Allow()),
        authorizer=Authorizer(authorizer, ttl_s=0),  # every request reviewed: the user it names is seen
        always_allow_paths=frozenset({"/readyz"}),
        not_ready=lambda: "",
    )
    server = AdapterServer(("127.0.0.1", 0), str(old.server_cert), str(old.server_key), services)
    server.start()
    user_headers = ["X-Remote-User"]
    trust = FrontProxyTrust(
        lambda: RequestHeaderConfig(ca_file.read_text(), username_headers=tuple(user_headers)),
        server.trust,
        refresh_s=0.2,
        backoff=Backoff(initial_s=0.1, cap_s=0.2),
    )
    trust.start()
    context = ssl.create_default_context(cafile=str(old.ca))
    context.load_cert_chain(old.client_cert, old.client_key)
    request = b"GET /apis HTTP/1.1\r\nHost: adapter\r\nX-Remote-User: bob\r\n\r\n"

    def answer(connection: ssl.SSLSocket) -> bytes:
        return status_line(connection, request)

    raw = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
    try:
        with context.wrap_socket(raw, server_hostname="localhost") as kept_alive:
            assert answer(kept_alive) == b"HTTP/1.1 200 OK"
            # New header names under the same CA: the connection stays trusted.
            user_headers.append("X-Proxy-User")
            assert until(lambda: len(getattr(services.authenticator.front_proxy, "username_headers", ())) == 2, 10)
            assert answer(kept_alive) == b"HTTP/1.1 200 OK"
            assert authorizer.users == ["bob", "bob"]
            ca_file.write_bytes(new.ca.read_bytes())  # the front proxy's CA rotates
            rotated = new.ca.read_text()
            assert until(lambda: getattr(services.authenticator.front_proxy, "client_ca_pem", "") == rotated, 10)
            try:
                after = answer(kept_alive)
            except OSError:  # reset: closed as well
                after = b""
            assert after == b""
            assert authorizer.users == ["bob", "bob"]  # never authorized as bob again on that connection
        # A new connection is verified under the current CA: the new certificate names users again.
        fresh = ssl.create_default_context(cafile=str(old.ca))
        fresh.load_cert_chain(new.client_cert, new.client_key)
        raw = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=5)
        with fresh.wrap_socket(raw, server_hostname="localhost") as connection:
            assert answer(connection) == b"HTTP/1.1 200 OK"
        assert authorizer.users == ["bob", "bob", "bob"]
        assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    finally:
        trust.stop()
        server.shutdown()
        server.server_close()


def test_failures_back_off_with_jitter_up_to_a_bound() -> None:
    calls = []

    def unreadable() -> RequestHeaderConfig:
        calls.append(time.monotonic())
        raise OSError("configmaps is forbidden")

    trust = FrontProxyTrust(unreadable, lambda _: None, refresh_s=60, backoff=Backoff(initial_s=1, cap_s=30, jitter=0))
    waits = [trust.loop.run_once() for _ in range(7)]
    assert waits == [1, 2, 4, 8, 16, 30, 30]  # doubling, then capped: never a tight loop
    assert not trust.loaded.is_set() and len(calls) == 7
