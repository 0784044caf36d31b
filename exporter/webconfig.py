"""Optional TLS and basic auth for the HTTP endpoints, from a Prometheus exporter-toolkit web config.

The file format is the one every Prometheus exporter reads (``--web.config.file``), so users' files
work unchanged::

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt hash

Options that only make sense for Go's TLS stack (cipher_suites, curve_preferences,
prefer_server_cipher_suites) and http_server_config are accepted for compatibility and left to
Python's defaults. Relative paths are relative to the config file, as in exporter-toolkit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml


class WebConfigError(ValueError):
    """The web config cannot be used; the message says what is wrong."""


_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "": ssl.CERT_NONE,
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "cipher_suites",
    "curve_preferences",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
}
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against bcrypt hashes, caching verified pairs.

    bcrypt is slow on purpose (tens of milliseconds); a scraper sends the same credentials every
    time, so a verified (user, password) pair is remembered by its SHA-256 instead of re-hashed.
    """

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {user: hashed.encode() for user, hashed in users.items()}
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self._users.get(user)
        if hashed is None:
            return False
        key = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(key, known) for known in self._verified):
                return True
        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._verified.add(key)
        return True


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None
    auth: BasicAuth | None


def load_web_config(path: str) -> WebConfig:
    """Reads and checks the file, loading certificates now so a mistake fails at start-up."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except OSError as error:
        raise WebConfigError(f"cannot read {path!r}: {error.strerror}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or error
        raise WebConfigError(f"{path!r} is not valid YAML{where}: {problem}") from error
    if not isinstance(raw, dict):
        raise WebConfigError(f"{path!r}: want a mapping of {', '.join(sorted(_TOP_KEYS))}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise WebConfigError(f"{path!r}: unknown field(s) {', '.join(sorted(unknown))}")
    tls = _tls_context(raw.get("tls_server_config"), file.parent) if raw.get("tls_server_config") else None
    users = raw.get("basic_auth_users") or {}
    if not isinstance(users, dict) or not all(isinstance(v, str) and v.startswith("$2") for v in users.values()):
        raise WebConfigError(f"{path!r}: basic_auth_users wants user: bcrypt-hash pairs")
    return WebConfig(tls=tls, auth=BasicAuth(users) if users else None)


def _tls_context(config: Any, base: Path) -> ssl.SSLContext:
    if not isinstance(config, dict):
        raise WebConfigError("tls_server_config wants a mapping")
    unknown = set(config) - _TLS_KEYS
    if unknown:
        raise WebConfigError(f"tls_server_config: unknown field(s) {', '.join(sorted(unknown))}")
    if not config.get("cert_file") or not config.get("key_file"):
        raise WebConfigError("tls_server_config needs both cert_file and key_file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(base / config["cert_file"], base / config["key_file"])
    except (OSError, ssl.SSLError) as error:
        raise WebConfigError(f"tls_server_config: cannot load cert_file/key_file: {error}") from error
    auth_type = config.get("client_auth_type", "")
    if auth_type not in _CLIENT_AUTH:
        raise WebConfigError(f"tls_server_config: unknown client_auth_type {auth_type!r}")
    context.verify_mode = _CLIENT_AUTH[auth_type]
    if config.get("client_ca_file"):
        try:
            context.load_verify_locations(base / config["client_ca_file"])
        except (OSError, ssl.SSLError) as error:
            raise WebConfigError(f"tls_server_config: cannot load client_ca_file: {error}") from error
    elif context.verify_mode != ssl.CERT_NONE:
        # Python's TLS verifies every client certificate it asks for, so each mode that asks needs a CA.
        raise WebConfigError(f"tls_server_config: client_auth_type {auth_type} needs client_ca_file")
    for key, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in config:
            if config[key] not in _TLS_VERSIONS:
                raise WebConfigError(f"tls_server_config: {key} wants one of {', '.join(_TLS_VERSIONS)}")
            setattr(context, attribute, _TLS_VERSIONS[config[key]])
    if "min_version" not in config:
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # exporter-toolkit's default
    return context
