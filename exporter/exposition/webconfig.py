"""Optional TLS and basic auth for the HTTP endpoints, from a Prometheus exporter-toolkit web config.

The file format is the one every Prometheus exporter reads (``--web.config.file``), so users' files
work unchanged::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
      client_ca_file: ca.crt
      client_allowed_sans: [prometheus.monitoring.svc]  # optional: only these client certificates
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt hash

Behaviour follows exporter-toolkit's: ``client_allowed_sans`` admits a client certificate only when
one of its DNS, IP, email or URI names is listed (and needs a client certificate to be required);
an unknown user is checked against a dummy hash so that answers take as long as for a known one;
verified credentials are remembered by a hash of them. ``cipher_suites`` takes Go's names (those
of Go's ``tls.CipherSuites()``) and limits TLS 1.2 to them; TLS 1.3's suites are fixed, as in Go.
``RequestClientCert`` and ``RequireAnyClientCert`` ask for a certificate and do not verify it: Python's
TLS verifies every certificate it asks for, so they are refused at start rather than served
differently. Options that only make sense for Go's TLS stack (curve_preferences,
prefer_server_cipher_suites, http_server_config.http2) are accepted for compatibility and left to
Python's defaults; http_server_config.headers is refused rather than ignored. Relative paths are
relative to the config file, as in exporter-toolkit.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import ipaddress
import re
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml


class WebConfigError(ValueError):
    """The web config cannot be used; the message (one line) says which field and why."""


_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "": ssl.CERT_NONE,
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's modes that ask for a certificate without verifying it, and the verified mode to use instead.
_UNVERIFIED_CLIENT_AUTH = {
    "RequestClientCert": "VerifyClientCertIfGiven",
    "RequireAnyClientCert": "RequireAndVerifyClientCert",
    "RequireClientCert": "RequireAndVerifyClientCert",  # exporter-toolkit's older name for RequireAnyClientCert
}
# Go's TLS 1.2 cipher suites (tls.CipherSuites(), which exporter-toolkit accepts) by OpenSSL's names.
_TLS12_CIPHERS = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}
# Accepted and, as in Go, without effect: TLS 1.3's suites are not configurable.
_TLS13_CIPHERS = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})
_STRING, _STRINGS, _BOOL = "a string", "a list of strings", "true or false"
_TLS_FIELDS = {
    "cert_file": _STRING,
    "key_file": _STRING,
    "client_auth_type": _STRING,
    "client_ca_file": _STRING,
    "min_version": _STRING,
    "max_version": _STRING,
    "cipher_suites": _STRINGS,
    "curve_preferences": _STRINGS,
    "prefer_server_cipher_suites": _BOOL,
    "client_allowed_sans": _STRINGS,
}
_HTTP_FIELDS = {"http2": _BOOL, "headers": "a mapping"}
_TOP_FIELDS = {"tls_server_config", "basic_auth_users", "http_server_config"}
# What bcrypt libraries write ($2a$, $2b$, $2y$, $2x$), as exporter-toolkit's bcrypt.Cost checks it.
_BCRYPT_HASH = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
# Each bcrypt check costs 2**cost rounds, and start-up computes a dummy hash of the same cost:
# ~0.06 s at cost 10 (exporter-toolkit's documented example), ~4 s at 16, ~35 hours at 31 (the
# format's maximum, which hung start-up). Above 16 every uncached scrape would outlast its timeout.
_BCRYPT_MAX_COST = 16
# bcrypt reads only the first 72 bytes of a password; bcrypt >= 4.1 raises on longer ones.
_BCRYPT_MAX_PASSWORD = 72


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes.

    bcrypt is slow on purpose (tens of milliseconds), so as in exporter-toolkit: a user that is not
    configured is checked against a dummy hash of the same cost (otherwise its quick 401 would tell
    which user names exist); one check runs at a time (a flood of guesses costs one core, not all);
    and credentials that passed are remembered by a SHA-256 of user, hash and password, the most
    recent ``cache_size`` of them, so a scraper sending the same credentials does not pay bcrypt
    every time. Beyond exporter-toolkit: while one check runs and ``max_waiting`` more wait, a
    further uncached request is refused at once rather than queued, so a flood of guesses holds at
    most ``1 + max_waiting`` of the server's workers and cached scrapes keep being answered (a new
    scraper may be refused during such a flood, and gets in at a later scrape).
    """

    def __init__(self, users: Mapping[str, str], cache_size: int = 256, max_waiting: int = 2) -> None:
        self._users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        costs = collections.Counter(hashed[4:6] for hashed in users.values())
        self._dummy = bcrypt.hashpw(b"not anyone's password", bcrypt.gensalt(int(costs.most_common(1)[0][0])))
        self._cache_size = cache_size
        self._verified: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()
        self._max_waiting = max_waiting
        self._checking = 0  # checks running or waiting for the one running; under _lock

    def allows(self, header: str | None) -> bool:
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        if len(password) > _BCRYPT_MAX_PASSWORD:
            return False  # never a configured password, whoever the user
        hashed = self._users.get(user)
        key = _digest(user, hashed or b"", password)
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
            if self._checking > self._max_waiting:
                return False  # the same for every user: refusing tells nothing about who exists
            self._checking += 1
        try:
            with self._bcrypt:
                try:
                    matches = bcrypt.checkpw(password, hashed or self._dummy)
                except ValueError:  # a password bcrypt will not take (it holds a NUL byte)
                    matches = False
        finally:
            with self._lock:
                self._checking -= 1
        if not matches or hashed is None:
            return False
        with self._lock:
            self._verified[key] = None
            if len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        return True


def _basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """User and password of a Basic Authorization header, the scheme in any case (RFC 7617), as
    Go's ``Request.BasicAuth`` reads them; None when it is not one."""
    if header is None or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:], validate=True)
    except ValueError:  # binascii.Error, or characters outside ASCII
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def _digest(*parts: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None
    auth: BasicAuth | None
    allowed_sans: frozenset[str] | None = None  # client certificates must carry one of these names

    def allows_peer(self, certificate: Mapping[str, Any]) -> bool:
        """Whether a verified client certificate (``SSLSocket.getpeercert()``) may connect."""
        if self.allowed_sans is None:
            return True
        return not self.allowed_sans.isdisjoint(_san_values(certificate))


def _san_values(certificate: Mapping[str, Any]) -> list[str]:
    """The certificate's DNS, email, IP and URI names, written as Go writes them."""
    values = []
    for kind, value in certificate.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI"):
            values.append(value)
        elif kind == "IP Address":
            values.append(_ip_text(value.strip()))
    return values


def _ip_text(value: str) -> str:
    """An address as Go's ``net.IP.String`` writes it (Python writes IPv6 in full, upper case)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def load_web_config(path: str) -> WebConfig:
    """Reads and checks the file, loading certificates now so a mistake fails at start-up."""
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as error:
        raise WebConfigError(f"cannot read {path!r}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise WebConfigError(
            f"{path!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
        ) from error
    try:
        raw = yaml.safe_load(text)
    except RecursionError as error:
        raise WebConfigError(f"{path!r}: YAML nested too deeply") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise WebConfigError(f"{path!r} is not valid YAML{where}: {problem}") from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WebConfigError(f"{path!r}: want a mapping of {', '.join(sorted(_TOP_FIELDS))}, not {_kind(raw)}")
    unknown = set(raw) - _TOP_FIELDS
    if unknown:
        raise WebConfigError(f"{path!r}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    http = _mapping(raw, "http_server_config")
    _check_fields(http, _HTTP_FIELDS, "http_server_config")
    if http.get("headers"):
        raise WebConfigError("http_server_config.headers is not supported by this exporter")
    tls_config = _mapping(raw, "tls_server_config")
    tls, allowed_sans = _tls_context(tls_config, file.parent) if tls_config else (None, None)
    users = _mapping(raw, "basic_auth_users")
    for user, hashed in users.items():
        if not isinstance(user, str):
            raise WebConfigError(f"basic_auth_users: user names are strings, {user!r} is {_kind(user)}")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.fullmatch(hashed) or not 4 <= int(hashed[4:6]) <= 31:
            raise WebConfigError(f"basic_auth_users.{user} wants a bcrypt hash ($2y$10$...), not {_kind(hashed)}")
        if int(hashed[4:6]) > _BCRYPT_MAX_COST:
            raise WebConfigError(
                f"basic_auth_users.{user}: bcrypt cost {int(hashed[4:6])} is above {_BCRYPT_MAX_COST} "
                "(each check, and start-up, would take seconds to hours); hash the password again with cost 10, say"
            )
    return WebConfig(tls=tls, auth=BasicAuth(users) if users else None, allowed_sans=allowed_sans)


def _kind(value: Any) -> str:
    """How a YAML value reads to the user, for an error message."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else type(value).__name__


def _mapping(config: dict[Any, Any], key: str) -> dict[Any, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{key} wants a mapping, not {_kind(value)}")
    return value


def _check_fields(config: dict[Any, Any], fields: Mapping[str, str], section: str) -> None:
    unknown = set(config) - set(fields)
    if unknown:
        raise WebConfigError(f"{section}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    for key, value in config.items():
        want = fields[key]
        fits = {
            _STRING: isinstance(value, str),
            _STRINGS: isinstance(value, list) and all(isinstance(item, str) for item in value),
            _BOOL: isinstance(value, bool),
            "a mapping": isinstance(value, dict),
        }[want]
        if value is not None and not fits:
            raise WebConfigError(f"{section}.{key} wants {want}, not {_kind(value)}")


def _tls_context(config: dict[Any, Any], base: Path) -> tuple[ssl.SSLContext, frozenset[str] | None]:
    _check_fields(config, _TLS_FIELDS, "tls_server_config")
    if not config.get("cert_file") or not config.get("key_file"):
        raise WebConfigError("tls_server_config needs both cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(base / config["cert_file"], base / config["key_file"])
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError; a path with a NUL byte a ValueError
        raise WebConfigError(f"tls_server_config: cannot load cert_file/key_file: {error}") from error
    auth_type = config.get("client_auth_type") or ""
    if auth_type in _UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(
            f"tls_server_config.client_auth_type {auth_type} (a client certificate asked for, not verified) is not "
            f"supported: Python's TLS verifies every certificate it asks for; use {_UNVERIFIED_CLIENT_AUTH[auth_type]} "
            "with client_ca_file"
        )
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config.client_auth_type: unknown {auth_type!r}")
    context.verify_mode = _CLIENT_AUTH[auth_type]
    if config.get("client_ca_file"):
        if context.verify_mode == ssl.CERT_NONE:
            raise WebConfigError(
                "tls_server_config: client_ca_file is set but client_auth_type asks for no certificate"
            )
        try:
            context.load_verify_locations(base / config["client_ca_file"])
        except (OSError, ValueError) as error:
            raise WebConfigError(f"tls_server_config: cannot load client_ca_file: {error}") from error
    elif context.verify_mode != ssl.CERT_NONE:
        # Python's TLS verifies every client certificate it asks for, so each mode that asks needs a CA.
        raise WebConfigError(f"tls_server_config: client_auth_type {auth_type} needs client_ca_file")
    allowed_sans = config.get("client_allowed_sans")
    if allowed_sans is not None and context.verify_mode != ssl.CERT_REQUIRED:
        # As exporter-toolkit: with a certificate optional there may be nothing to match.
        raise WebConfigError("tls_server_config.client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")
    for key, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if config.get(key) is not None:
            if config[key] not in _TLS_VERSIONS:
                raise WebConfigError(f"tls_server_config.{key} wants one of {', '.join(_TLS_VERSIONS)}")
            setattr(context, attribute, _TLS_VERSIONS[config[key]])
    if config.get("min_version") is None:
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default
    if config.get("cipher_suites"):
        _set_ciphers(context, config["cipher_suites"])
    if config.get("max_version") is not None and context.maximum_version < context.minimum_version:
        # OpenSSL takes the pair, then fails every handshake.
        raise WebConfigError(
            f"tls_server_config: max_version {config['max_version']} is below min_version "
            f"{config.get('min_version') or 'TLS12 (the default)'}: no handshake could succeed"
        )
    sans = None if allowed_sans is None else frozenset(_ip_text(name) for name in allowed_sans)
    return context, sans


def _set_ciphers(context: ssl.SSLContext, names: list[str]) -> None:
    """Limits TLS 1.2 to the listed suites, in their order; listing none of TLS 1.2's leaves TLS 1.3
    alone, as Go then negotiates no TLS 1.2 suite."""
    unknown = [name for name in names if name not in _TLS12_CIPHERS and name not in _TLS13_CIPHERS]
    if unknown:
        raise WebConfigError(
            f"tls_server_config.cipher_suites: unknown {', '.join(unknown)} (want Go's names, e.g. "
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
        )
    tls12 = [_TLS12_CIPHERS[name] for name in names if name in _TLS12_CIPHERS]
    if tls12:
        try:
            context.set_ciphers(":".join(tls12))
        except ssl.SSLError as error:  # none of them built into this OpenSSL
            raise WebConfigError(f"tls_server_config.cipher_suites: none can be used here: {error}") from error
        return
    capped = context.maximum_version not in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3)
    if capped:
        raise WebConfigError(
            "tls_server_config.cipher_suites lists only TLS 1.3 suites, and max_version is below TLS13: "
            "no handshake could succeed"
        )
    context.minimum_version = ssl.TLSVersion.TLSv1_3
