"""API keys: who may call the gateway, and which model aliases each key may use.

Keys come from ``api_keys`` (``ALIGNPRO_API_KEYS='["sk-a", "sk-b:smollm2"]'``) and from ``api_keys_file``
(``ALIGNPRO_API_KEYS_FILE``), one entry a line, ``#`` comments and blank lines ignored. An entry is ``KEY`` (any
alias) or ``KEY:ALIAS1,ALIAS2`` (only those aliases), so a key cannot contain ``:``. With no key at all the
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

from alignpro.errors import AuthenticationError, ConfigError, PermissionDeniedError


@dataclass(frozen=True)
class Principal:
    """An authenticated caller (or the anonymous caller of an open gateway)."""

    id: str  # "key-<12 hex of the digest>" or "anonymous"; safe to log and to use as a rate-limit bucket
    aliases: frozenset[str] | None = None  # None: every alias

    def may_use(self, alias: str) -> bool:
        return self.aliases is None or alias in self.aliases

    def check(self, alias: str) -> None:
        if not self.may_use(alias):
            raise PermissionDeniedError(f"this API key may not use the model '{alias}'", param="model")


ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


def parse_entry(entry: str) -> tuple[str, frozenset[str] | None]:
    """``KEY`` or ``KEY:ALIAS1,ALIAS2`` -> (key, allowed aliases or None)."""
    key, sep, rest = entry.strip().partition(":")
    key = key.strip()
    if not key:
        raise ConfigError("an API key entry is empty")
    if not sep:
        return key, None
    aliases = frozenset(a.strip() for a in rest.split(",") if a.strip())
    return key, aliases


def read_keys_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file {path}: {exc.strerror}") from None
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyStore:
    def __init__(self, entries: Iterable[str]) -> None:
        self._entries: list[_Entry] = []
        for entry in entries:
            key, aliases = parse_entry(entry)
            digest = _digest(key)
            self._entries.append(_Entry(digest, Principal(f"key-{digest.hex()[:12]}", aliases)))

    @classmethod
    def from_settings(cls, api_keys: Iterable[str], keys_file: Path | None) -> KeyStore:
        entries = list(api_keys)
        if keys_file is not None:
            entries += read_keys_file(keys_file)
        return cls(entries)

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
