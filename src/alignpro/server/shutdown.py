"""Graceful shutdown: on SIGTERM stop taking requests, let in-flight ones (streams included) finish.

uvicorn already stops listening on SIGTERM, closes idle keep-alive connections and waits up to
``timeout_graceful_shutdown`` (our ``shutdown_grace_s``, ``ALIGNPRO_SHUTDOWN_GRACE_S``) for running responses
before cancelling them. :class:`GracefulServer` adds the gateway's side: the moment the signal arrives,
:class:`Drain` flips, ``/ready`` answers 503 (a load balancer stops routing here) and a request that still
arrives on an open connection gets a 503 ``shutting_down`` with ``Connection: close`` instead of starting work
that the grace period might cut.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class Drain:
    """Whether the server is draining, and how many admitted requests are still running."""

    def __init__(self) -> None:
        self.draining = False
        self.since: float | None = None
        self.inflight = 0

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.since = time.monotonic()
            log.info("draining: refusing new requests, %d in flight", self.inflight)

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1


class GracefulServer(uvicorn.Server):
    """A uvicorn server that starts draining the app as soon as it is told to exit."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)
