"""API keys: who may call the gateway, and what each key may do.

Keys come from ``api_keys`` (``ALIGNPRO_API_KEYS=sk-a``, ``sk-a,sk-b``, or a JSON list) and from
``api_keys_file`` (``ALIGNPRO_API_KEYS_FILE``): a text file of ``KEY`` or ``KEY:ALIAS1,ALIAS2`` lines (``#``
comments and blank lines ignored), or a ``.yaml``/``.json`` list of key objects with a policy each
(:class:`~alignpro.settings.ApiKeyConfig`: allowed aliases, mode override, reveal, limits). With no key at all the
gateway is open (a loopback development setup); with any key, every route but ``/health`` needs one.

Only SHA-256 digests of the keys are kept in memory. A presented key is hashed and compared with every stored
digest using :func:`hmac.compare_digest`, so neither the comparison nor the scan stops early on a match. A key
is never logged nor echoed in an error: a caller is named by :attr:`Principal.id`, a short prefix of the digest.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from alignpro.errors import AuthenticationError, ConfigError, PermissionDeniedError
from alignpro.settings import ApiKeyConfig, describe_errors, parse_api_keys


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or the anonymous caller of an open gateway) and its key's policy; a policy field
    that is None takes the gateway-wide setting."""

    id: str  # "key-<12 hex of the digest>" or "anonymous"; safe to log and to use as a rate-limit bucket
    aliases: frozenset[str] | None = None  # None: every alias
    allow_mode_override: bool | None = None
    reveal_rewrite: bool | None = None
    rate_limit_rpm: float | None = None
    rate_limit_tpm: float | None = None
    max_concurrent: int | None = None
    admin: bool = False

    def may_use(self, alias: str) -> bool:
        return self.aliases is None or alias in self.aliases

    def check(self, alias: str) -> None:
        if not self.may_use(alias):
            raise PermissionDeniedError(f"this API key may not use the model '{alias}'", param="model")


ANONYMOUS = Principal("anonymous")

_KEYS = TypeAdapter(list[ApiKeyConfig])


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


def read_keys_file(path: Path) -> list[ApiKeyConfig]:
    """The keys of ``path``: KEY[:ALIASES] lines, or a YAML/JSON list of key objects (by its suffix)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    entries: Any
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            entries = yaml.safe_load(text) or []
        except yaml.YAMLError as exc:
            raise ConfigError(f"the API keys file {path} is not valid YAML/JSON: {exc}") from None
    else:
        entries = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    try:
        return _KEYS.validate_python(parse_api_keys(entries))
    except ValidationError as exc:
        raise ConfigError(f"the API keys file {path}: {describe_errors(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"the API keys file {path}: {exc}") from None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _principal(cfg: ApiKeyConfig, digest: bytes) -> Principal:
    return Principal(
        f"key-{digest.hex()[:12]}",
        aliases=None if cfg.aliases is None else frozenset(cfg.aliases),
        allow_mode_override=cfg.allow_mode_override,
        reveal_rewrite=cfg.reveal_rewrite,
        rate_limit_rpm=cfg.rate_limit_rpm,
        rate_limit_tpm=cfg.rate_limit_tpm,
        max_concurrent=cfg.max_concurrent,
        admin=cfg.admin,
    )


class KeyStore:
    def __init__(self, keys: Iterable[ApiKeyConfig]) -> None:
        self._entries: list[_Entry] = []
        for cfg in keys:
            digest = _digest(cfg.key.get_secret_value())
            self._entries.append(_Entry(digest, _principal(cfg, digest)))

    @classmethod
    def from_settings(cls, api_keys: Iterable[ApiKeyConfig], keys_file: Path | None) -> KeyStore:
        keys = list(api_keys)
        if keys_file is not None:
            keys += read_keys_file(keys_file)
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller of a request with this ``Authorization`` header; 401 when the key is missing or wrong."""
        if not self._entries:
            return ANONYMOUS
        token = ""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        digest = _digest(token)
        found: Principal | None = None
        for e in self._entries:  # every entry is compared: the time does not say which one matched
            if hmac.compare_digest(digest, e.digest) and found is None:
                found = e.principal
        if found is None or not token:
            raise AuthenticationError(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."
            )
        return found


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class HostAllowList:
    """The host names the gateway answers to, checked on ``Host`` and on ``Origin`` when a browser sends one.

    An open gateway (no API keys) on loopback is still reachable from a web page: DNS rebinding points the page's
    own domain at 127.0.0.1, and the request arrives with that domain as its Host. So with no keys only the
    loopback names are accepted unless the operator lists others; with keys (a page cannot know them) any.
    """

    def __init__(self, hosts: list[str] | None, keys_enabled: bool) -> None:
        if hosts is None:
            hosts = ["*"] if keys_enabled else list(LOOPBACK_HOSTS)
        self.any = "*" in hosts
        self.hosts = frozenset(h.lower().strip("[]") for h in hosts)

    def allows(self, host: str) -> bool:
        """``host`` as in a Host header (``name[:port]``, ``[v6]:port``)."""
        if self.any:
            return True
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        return name.lower() in self.hosts

    def check(self, host: str | None, origin: str | None) -> None:
        if self.any:
            return
        if host is None or not self.allows(host):
            raise PermissionDeniedError(
                f"this gateway does not answer to the host {host!r} (allowed_hosts)", code="host_not_allowed"
            )
        if origin is not None and origin != "null":
            netloc = origin.split("://", 1)[-1].split("/", 1)[0]
            if not self.allows(netloc):
                raise PermissionDeniedError(
                    f"requests from the web origin {origin!r} are not accepted", code="origin_not_allowed"
                )
        elif origin == "null":
            raise PermissionDeniedError(
                "requests from an opaque web origin are not accepted", code="origin_not_allowed"
            )
