"""Authentication and authorization decisions, and the adapter's self-signed serving pair."""

from __future__ import annotations

import logging
import socket
import ssl
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from exporter.adapter.auth import Authenticator, Authorizer, RequestHeaderConfig, ReviewUnavailableError, User
from sim.processes import free_port, spawn_adapter
from tests.adapter.test_settings import run_adapter

FRONT_PROXY = {"subject": ((("commonName", "front-proxy-client"),),)}
ALLOWED = RequestHeaderConfig("CA PEM", allowed_names=("front-proxy-client",))


class Reviewer:
    def __init__(self) -> None:
        self.token_reviews = 0
        self.access_reviews = 0

    def review_token(self, token: str) -> User | None:
        self.token_reviews += 1
        if token == "api-down":
            raise ConnectionError("kube-apiserver unreachable")
        return User("alice", ("team",)) if token == "good" else None

    def review_access(self, user: User, attributes: Any) -> bool:
        self.access_reviews += 1
        if user.name == "api-down":
            raise ConnectionError("kube-apiserver unreachable")
        return user.name == "alice"


def headers(**values: str | list[str]) -> Message:
    message = Message()
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            message[name.replace("_", "-")] = item
    return message


def test_front_proxy_user_and_groups_from_its_headers() -> None:
    auth = Authenticator(Reviewer(), ALLOWED)
    user = auth.authenticate(FRONT_PROXY, headers(X_Remote_User="hpa", X_Remote_Group=["a", "b"]))
    assert user == User("hpa", ("a", "b"))


def test_front_proxy_with_a_name_not_allowed_is_refused() -> None:
    auth = Authenticator(Reviewer(), ALLOWED)
    other = {"subject": ((("commonName", "someone-else"),),)}
    assert auth.authenticate(other, headers(X_Remote_User="hpa")) is None


def test_custom_header_names() -> None:
    auth = Authenticator(Reviewer(), RequestHeaderConfig("CA PEM", (), ("X-User",), ("X-Groups",)))
    assert auth.authenticate(FRONT_PROXY, headers(X_User="bob", X_Groups="g")) == User("bob", ("g",))
    assert auth.authenticate(FRONT_PROXY, headers(X_Remote_User="bob")) is None


def test_bearer_tokens_are_reviewed_once_per_ttl() -> None:
    reviewer = Reviewer()
    now = [0.0]
    auth = Authenticator(reviewer, ttl_s=10, clock=lambda: now[0])
    assert auth.authenticate(None, headers(Authorization="Bearer good")) == User("alice", ("team",))
    assert auth.authenticate(None, headers(Authorization="Bearer good")) == User("alice", ("team",))
    assert reviewer.token_reviews == 1
    now[0] = 11
    auth.authenticate(None, headers(Authorization="Bearer good"))
    assert reviewer.token_reviews == 2
    assert auth.authenticate(None, headers(Authorization="Bearer bad")) is None
    assert auth.authenticate(None, headers(Authorization="Basic eDp5")) is None
    assert auth.authenticate(None, headers()) is None


def test_a_flood_of_distinct_tokens_does_not_evict_a_token_in_use() -> None:
    """The cache is bounded (10 000 entries) by dropping the least recently used, not by clearing it:
    a client inventing tokens must not cost the HPA a TokenReview per request."""
    reviewer = Reviewer()
    auth = Authenticator(reviewer, ttl_s=3600)
    for flood in range(30_000):
        if flood % 1000 == 0:
            assert auth.authenticate(None, headers(Authorization="Bearer good")) == User("alice", ("team",))
        auth.authenticate(None, headers(Authorization=f"Bearer invented-{flood}"))
    assert reviewer.token_reviews == 30_000 + 1  # each invented token once, the one in use once
    auth.authenticate(None, headers(Authorization="Bearer invented-0"))  # long evicted: reviewed again
    assert reviewer.token_reviews == 30_000 + 2


@pytest.mark.parametrize(
    ("authorization", "user"),
    [
        ("Bearer good", "alice"),
        ("bearer good", "alice"),  # the scheme is case-insensitive, as in k8s.io/apiserver
        ("BEARER good", "alice"),
        ("  Bearer good  ", "alice"),
        ("Bearer good trailing-field", "alice"),  # the token is the second field
        ("Bearer  good", None),  # an empty second field is no token
        ("Bearer", None),
        ("Basic eDp5", None),
        ("Bearer bad", None),
    ],
)
def test_bearer_header_parsed_as_upstream(authorization: str, user: str | None) -> None:
    found = Authenticator(Reviewer()).authenticate(None, headers(Authorization=authorization))
    assert (found.name if found else None) == user


def test_union_a_certificate_that_does_not_authenticate_falls_through_to_the_token() -> None:
    auth = Authenticator(Reviewer(), ALLOWED)
    other = {"subject": ((("commonName", "someone-else"),),)}
    # A CN not in the allowed names, with a valid bearer token: authenticated by the token.
    assert auth.authenticate(other, headers(X_Remote_User="mallory", Authorization="Bearer good")) == User(
        "alice", ("team",)
    )
    # The front proxy's certificate without a user header: the token decides, too.
    assert auth.authenticate(FRONT_PROXY, headers(Authorization="Bearer good")) == User("alice", ("team",))
    # Both authenticate: the front proxy comes first, as in the apiserver's union.
    assert auth.authenticate(FRONT_PROXY, headers(X_Remote_User="hpa", Authorization="Bearer good")) == User("hpa")
    # Until the front proxy's CA is known, a certificate authenticates no one.
    assert Authenticator(Reviewer()).authenticate(FRONT_PROXY, headers(X_Remote_User="hpa")) is None


def test_a_failed_token_review_is_401_not_cached_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="exporter.adapter.auth")
    reviewer = Reviewer()
    auth = Authenticator(reviewer, ttl_s=10, clock=lambda: 0.0)
    for _ in range(5):
        assert auth.authenticate(None, headers(Authorization="Bearer api-down")) is None
    assert reviewer.token_reviews == 5
    assert auth.authenticate(None, headers(Authorization="Bearer good")) == User("alice", ("team",))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("TokenReview" in m and "failing" in m for m in messages) == 1
    assert sum("TokenReview recovered" in m for m in messages) == 1


def test_a_failed_access_review_is_an_error_not_a_denial_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    authorizer = Authorizer(Reviewer())
    for _ in range(3):
        with pytest.raises(ReviewUnavailableError):
            authorizer.allowed(User("api-down"), {"verb": "get"})
    assert sum("SubjectAccessReview" in r.getMessage() for r in caplog.records) == 1


ATTRIBUTES = {
    "group": "custom.metrics.k8s.io",
    "version": "v1beta2",
    "resource": "pods",
    "subresource": "duty_cycle_current",
    "name": "bert-0",
    "namespace": "default",
    "verb": "get",
}
ALICE = User("alice", ("team",), "alice-uid", (("scopes", ("gpu-metrics",)),))
VARIANTS = [  # each differs from (ALICE, ATTRIBUTES) in one thing a SubjectAccessReview decides on
    *((ALICE, ATTRIBUTES | {key: f"other-{value}"}) for key, value in ATTRIBUTES.items()),
    (ALICE, {"path": "/apis/custom.metrics.k8s.io", "verb": "get"}),
    (User("mallory", ALICE.groups, ALICE.uid, ALICE.extra), ATTRIBUTES),
    (User(ALICE.name, ("team", "admins"), ALICE.uid, ALICE.extra), ATTRIBUTES),
    (User(ALICE.name, ALICE.groups, "other-uid", ALICE.extra), ATTRIBUTES),
    (User(ALICE.name, ALICE.groups, ALICE.uid, (("scopes", ("all-metrics",)),)), ATTRIBUTES),
    (User(ALICE.name, ALICE.groups, ALICE.uid), ATTRIBUTES),
]


@pytest.mark.parametrize(("user", "attributes"), VARIANTS)
def test_access_decisions_are_cached_per_attributes(user: User, attributes: dict[str, str]) -> None:
    """The same user and attributes are reviewed once per TTL; a request differing in any one of
    them is reviewed again, never answered with another's decision."""
    reviewer = Reviewer()
    authorizer = Authorizer(reviewer, ttl_s=10, clock=lambda: 0.0)
    assert authorizer.allowed(ALICE, ATTRIBUTES)
    assert authorizer.allowed(ALICE, dict(ATTRIBUTES))
    assert reviewer.access_reviews == 1
    authorizer.allowed(user, attributes)
    assert reviewer.access_reviews == 2
    authorizer.allowed(user, dict(attributes))
    assert reviewer.access_reviews == 2


def test_without_a_certificate_the_adapter_serves_a_self_signed_pair(tmp_path: Path) -> None:
    port = free_port()
    kubeconfig = tmp_path / "kubeconfig"  # points nowhere: the adapter still starts, with tokens only
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:1'}\n"
        "users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n"
    )
    process = spawn_adapter(port, "--cert-dir", str(tmp_path / "certs"), "--kubeconfig", str(kubeconfig))
    try:
        process.wait_for_port(port)
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "apiserver.crt"))
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200")
        assert (tmp_path / "certs" / "apiserver.key").stat().st_mode & 0o777 == 0o600
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--requestheader-uid-headers", "X-Remote-Uid,X Remote Uid"),
        ("--requestheader-extra-headers-prefix", "X-Remote-Extra:"),
        ("--requestheader-username-headers", '"X-Remote-User"'),
    ],
)
def test_a_header_flag_naming_no_possible_header_is_one_line(tmp_path: Path, flag: str, value: str) -> None:
    """No request could carry such a header: the setting is refused at start, not silently never matched."""
    result = run_adapter(tmp_path, flag, value)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"gpu-metrics-adapter: error: {flag}: want header names"), line
