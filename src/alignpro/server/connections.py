"""What a connection may cost before it is a request: header deadlines for uvicorn, and a clean access log.

uvicorn bounds idle keep-alive connections, not a client that connects and then sends its request line and
headers a byte at a time (slowloris): 20 such connections, with no key, were all still open after 95 s.
:func:`guarded_protocol` is uvicorn's httptools protocol with one timer more: from the moment a connection opens
(or a further request on it starts) its headers must be complete within ``header_timeout_s``, else the connection
is closed. The body has its own deadline where the routes read it (``body_timeout_s``, a 408), and
``max_connections`` caps open connections (uvicorn's ``limit_concurrency``: 503 above it).

:class:`RedactQuery` keeps query strings out of uvicorn's access log: a client that puts its key in the URL
(``?api_key=...``) would otherwise have it written to the log in clear.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _GuardedProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a further request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


def guarded_protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class, closing connections whose headers take over ``header_timeout_s``."""
    return type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"header_timeout_s": header_timeout_s})


class RedactQuery(logging.Filter):
    """Drops the query string from uvicorn access-log records (``client, method, path, version, status``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args: Any = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query redacted]", *args[3:])
        return True
