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
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
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


@dataclass
class Supervised:
    """A worker's link to the supervisor of ``alignpro serve --workers`` (:mod:`alignpro.server.workers`)."""

    parent: int  # the supervisor's pid
    ready: Connection  # written to once the worker serves: a worker that dies before is a startup failure
    said_ready: bool = False


class GracefulServer(uvicorn.Server):
    """A uvicorn server that starts draining the app as soon as it is told to exit.

    A worker (``supervised``) says when it serves, and checks once a second that the supervisor is still its
    parent: when it is not, it drains and exits, so that no orphan keeps serving the port.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, supervised: Supervised | None = None) -> None:
        super().__init__(config)
        self.drain = drain
        self.supervised = supervised

    async def on_tick(self, counter: int) -> bool:
        # Called by the main loop only, hence once startup is done.
        sup = self.supervised
        if sup is not None and counter % 10 == 0:
            if not sup.said_ready:
                sup.ready.send_bytes(b"serving")
                sup.said_ready = True
            if os.getppid() != sup.parent and not self.should_exit:
                log.warning("the supervisor [%d] is gone: draining and exiting", sup.parent)
                self.drain.begin()
                self.should_exit = True
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)
