"""Authentication and authorization as Kubernetes aggregated API servers do them (k8s.io/apiserver).

Who: a union of two authenticators, tried in order, the first that authenticates wins (union.New):
the front proxy (kube-apiserver), whose client certificate chains to the requestheader CA (checked
in the TLS handshake) and has an allowed CN, names the user, UID, groups and extra in its headers
(X-Remote-User, the configured UID headers, X-Remote-Group, X-Remote-Extra-<key>), as
headerrequest's requestheader.go reads them; failing that, a bearer token, checked with a
TokenReview. May they: a SubjectAccessReview for the request's attributes, naming the whole user
(webhook authorizers decide on extra, e.g. token scopes). Both reviews are cached briefly, as the
apiserver's delegating authenticator/authorizer do, keyed by everything the review was asked; a
failed review is never cached.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from exporter.supervise import StateLog, describe

log = logging.getLogger(__name__)

Extra = tuple[tuple[str, tuple[str, ...]], ...]
"""A user's extra information (user.Info's map of key to values) as (key, values) pairs sorted by key:
hashable, so a User can key the decision cache, and equal for equal maps."""


def frozen_extra(extra: Mapping[str, Iterable[str]]) -> Extra:
    return tuple(sorted((key, tuple(values)) for key, values in extra.items()))


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    extra: Extra = ()


@dataclass(frozen=True)
class RequestHeaderConfig:
    """What kube-apiserver publishes about its front-proxy client certificates (or the flags say)."""

    client_ca_pem: str
    allowed_names: tuple[str, ...] = ()  # empty: any certificate the CA signed
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    uid_headers: tuple[str, ...] = ()  # none honoured unless named (kube-apiserver 1.32+ can send X-Remote-Uid)
    extra_header_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)


class Reviewer(Protocol):
    """The Kubernetes API's TokenReview and SubjectAccessReview."""

    def review_token(self, token: str) -> User | None: ...

    def review_access(self, user: User, attributes: Mapping[str, Any]) -> bool: ...


class _TtlCache:
    """Answers kept ``ttl_s``, at most ``max_entries`` of them: past the bound the least recently
    used goes, so a flood of distinct tokens costs the flood's own entries, never the HPA's."""

    def __init__(self, ttl_s: float, clock: Callable[[], float], max_entries: int = 10_000) -> None:
        self._ttl_s, self._clock, self._max_entries = ttl_s, clock, max_entries
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and now - hit[0] < self._ttl_s:
                self._entries.move_to_end(key)
                return hit[1]
        value = compute()
        with self._lock:
            self._entries[key] = (now, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return value


class ReviewUnavailableError(Exception):
    """A SubjectAccessReview could not be made: the request is answered 500, as k8s.io/apiserver does."""


def bearer_token(authorization: str) -> str | None:
    """The token of an ``Authorization`` header, parsed as k8s.io/apiserver's bearertoken
    authenticator does: the scheme in any case, the token the second space-separated field."""
    parts = authorization.strip().split(" ")
    if len(parts) < 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None
    return parts[1]


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token, what a header's name is


def header_names(values: object, what: str) -> tuple[str, ...]:
    """``values`` (a list, from flags or the ConfigMap's JSON) as header names or prefixes;
    ValueError naming ``what`` otherwise: a JSON string taken as a list would make each letter a
    name, and an empty prefix would turn every header into extra."""
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, str) and HEADER_NAME.fullmatch(v) for v in values
    ):
        raise ValueError(f"{what}: want a list of header names (HTTP tokens), got {values!r}")
    return tuple(values)


def _first_value(headers: Any, names: Iterable[str]) -> str:
    """The first non-empty value among the headers ``names``, as requestheader.go's headerValue."""
    return next((value for value in map(headers.get, names) if value), "")


_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _extra_from_headers(headers: Any, prefixes: Iterable[str]) -> Extra:
    """As requestheader.go's newExtra: prefix by prefix, in order, every header whose name starts with
    it (in any case) adds its values to the key named by the rest of its name, lowercased and
    %-unescaped (url.PathUnescape; a key with a malformed escape is kept as it came)."""
    extra: dict[str, list[str]] = {}
    for prefix in prefixes:
        for name, value in headers.items():
            if name.lower().startswith(prefix.lower()):
                key = name[len(prefix) :].lower()
                extra.setdefault(key if _MALFORMED_ESCAPE.search(key) else unquote(key), []).append(value)
    return frozen_extra(extra)


class Authenticator:
    def __init__(
        self,
        reviewer: Reviewer,
        front_proxy: RequestHeaderConfig | None = None,
        ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reviewer = reviewer
        self.front_proxy = front_proxy  # replaced whole when the published settings change
        self.tokens = _TtlCache(ttl_s, clock)
        self._failures = StateLog(log, "TokenReview", "bearer tokens answered 401 meanwhile")

    def authenticate(self, peer_cert: Mapping[str, Any] | None, headers: Any) -> User | None:
        """``peer_cert`` is ssl's verified client certificate (None or empty without one);
        ``headers`` an http.client.HTTPMessage. None means 401."""
        return self._from_front_proxy(peer_cert, headers) or self._from_token(headers)

    def _from_front_proxy(self, peer_cert: Mapping[str, Any] | None, headers: Any) -> User | None:
        config = self.front_proxy
        if not peer_cert or config is None:
            return None
        subject = dict(field for rdn in peer_cert.get("subject", ()) for field in rdn)
        if config.allowed_names and subject.get("commonName") not in config.allowed_names:
            return None
        name = _first_value(headers, config.username_headers)
        if not name:
            return None
        groups = tuple(g for h in config.group_headers for g in (headers.get_all(h) or ()) if g)
        uid = _first_value(headers, config.uid_headers)
        return User(name, groups, uid, _extra_from_headers(headers, config.extra_header_prefixes))

    def _from_token(self, headers: Any) -> User | None:
        token = bearer_token(headers.get("Authorization", ""))
        if token is None:
            return None
        try:
            user: User | None = self.tokens.get(token, lambda: self._reviewer.review_token(token))
        except Exception as error:  # the API edge: an unanswered review authenticates no one
            self._failures.failed(describe(error))
            return None
        self._failures.recovered()
        return user


class Authorizer:
    def __init__(self, reviewer: Reviewer, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._reviewer = reviewer
        self.decisions = _TtlCache(ttl_s, clock)
        self._failures = StateLog(log, "SubjectAccessReview", "requests answered 500 meanwhile")

    def allowed(self, user: User, attributes: Mapping[str, Any]) -> bool:
        key = (user, tuple(sorted((k, str(v)) for k, v in attributes.items())))
        try:
            allowed: bool = self.decisions.get(key, lambda: self._reviewer.review_access(user, attributes))
        except Exception as error:  # the API edge
            self._failures.failed(describe(error))
            raise ReviewUnavailableError() from error
        self._failures.recovered()
        return allowed
