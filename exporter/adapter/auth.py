"""Authentication and authorization as Kubernetes aggregated API servers do them (k8s.io/apiserver).

Who: the front proxy (kube-apiserver) presents a client certificate that chains to the
requestheader CA (checked in the TLS handshake) and whose CN is an allowed name; the user and
groups then come from its X-Remote-User / X-Remote-Group headers. Anyone else must bring a bearer
token, checked with a TokenReview. May they: a SubjectAccessReview for the request's attributes.
Both reviews are cached briefly, as the apiserver's delegating authenticator/authorizer do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()


class Reviewer(Protocol):
    """The Kubernetes API's TokenReview and SubjectAccessReview."""

    def review_token(self, token: str) -> User | None: ...

    def review_access(self, user: User, attributes: Mapping[str, Any]) -> bool: ...


class _TtlCache:
    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s, self._clock = ttl_s, clock
        self._entries: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self._ttl_s:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._entries) > 10_000:  # bound memory against many distinct tokens
                self._entries.clear()
            self._entries[key] = (now, value)
        return value


class Authenticator:
    def __init__(
        self,
        reviewer: Reviewer,
        allowed_names: Sequence[str] = (),
        username_headers: Sequence[str] = ("X-Remote-User",),
        group_headers: Sequence[str] = ("X-Remote-Group",),
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reviewer = reviewer
        self._allowed_names = set(allowed_names)
        self._username_headers = username_headers
        self._group_headers = group_headers
        self._tokens = _TtlCache(ttl_s, clock)

    def authenticate(self, peer_cert: Mapping[str, Any] | None, headers: Any) -> User | None:
        """``peer_cert`` is ssl's verified client certificate (None or empty without one);
        ``headers`` an http.client.HTTPMessage. None means 401."""
        if peer_cert:
            subject = dict(field for rdn in peer_cert.get("subject", ()) for field in rdn)
            if self._allowed_names and subject.get("commonName") not in self._allowed_names:
                return None
            name = next((headers.get(h) for h in self._username_headers if headers.get(h)), None)
            if not name:
                return None
            groups = tuple(g for h in self._group_headers for g in (headers.get_all(h) or ()))
            return User(name, groups)
        authorization = headers.get("Authorization", "")
        if authorization.startswith("Bearer ") and authorization[7:].strip():
            token = authorization[7:].strip()
            user: User | None = self._tokens.get(token, lambda: self._reviewer.review_token(token))
            return user
        return None


class Authorizer:
    def __init__(self, reviewer: Reviewer, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._reviewer = reviewer
        self._decisions = _TtlCache(ttl_s, clock)

    def allowed(self, user: User, attributes: Mapping[str, Any]) -> bool:
        key = (user, tuple(sorted((k, str(v)) for k, v in attributes.items())))
        allowed: bool = self._decisions.get(key, lambda: self._reviewer.review_access(user, attributes))
        return allowed
