"""``alignpro serve --workers N``: N gateway processes serving one port, under a supervisor.

How servers do it: uvicorn's and gunicorn's supervisors bind one listening socket in the parent and hand it to
every worker; nginx (``listen ... reuseport``) and Envoy give each worker a socket of its own in an
``SO_REUSEPORT`` group, so that the kernel spreads new connections over the workers instead of waking all of
them for each (with one shared socket the first worker to wake takes a whole burst: asyncio and uvloop accept
up to 100 connections per wake-up). :class:`Supervisor` does the latter, with the parent holding the sockets:

* the parent binds one ``SO_REUSEPORT`` socket per worker slot on the port and keeps it open; each worker is a
  fresh interpreter (multiprocessing's *spawn*, as uvicorn's supervisor: nothing the parent imported is copied
  half-initialised) that builds its own app and runs :class:`~alignpro.server.shutdown.GracefulServer` on its
  slot's socket;
* a worker that dies is replaced on the same socket, so the connections the kernel queued there wait for the
  new one instead of being reset. A worker that fails at startup (exit status 3, uvicorn's ``STARTUP_FAILURE``:
  an engine or Redis setting that cannot work) stops the parent with that status, and so do more than
  :data:`MAX_DEATHS` deaths a minute (a crash loop: systemd or Kubernetes restart the whole server);
* SIGTERM or SIGINT: the parent closes its copies of the sockets and sends SIGTERM to every worker, which
  drains as a single-process server does (``/ready`` 503, in-flight requests finish within
  ``shutdown_grace_s``); once all of them stopped listening the port refuses connections. The parent waits
  ``shutdown_grace_s`` + 10 s, SIGKILLs what is left, and exits 0. A second signal is passed on (a second
  SIGINT makes uvicorn cancel what is still running);
* no orphans: a worker checks every second that its parent is the supervisor that started it (gunicorn's
  check) and drains and exits when it is not (the supervisor was SIGKILLed).

Each worker has its own memory: rate limits and the rewrite cache are shared only through ``redis_url``
(:mod:`alignpro.server.shared`), and ``max_connections``, ``max_concurrent_per_key`` and ``/metrics`` are per
worker. In-process (``local``) engines are refused with more than one worker (settings.py says why).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType

from uvicorn.config import STARTUP_FAILURE

from alignpro.server.shutdown import Drain, GracefulServer, Supervised
from alignpro.settings import Settings

log = logging.getLogger(__name__)

MAX_DEATHS = 5  # worker deaths within DEATH_WINDOW_S that stop the supervisor
DEATH_WINDOW_S = 60.0
BACKLOG = 2048  # uvicorn's default listen backlog


def bind_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` listening sockets in one ``SO_REUSEPORT`` group on ``host:port`` (port 0: one port the OS picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            # Listening now: connections that come while the workers start wait in the queue.
            sock.listen(BACKLOG)
            sock.set_inheritable(True)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def run_worker(settings: Settings, sock: socket.socket, supervised: Supervised) -> None:
    """A worker process: the single-process server of :func:`alignpro.server.app.serve`, on ``sock``."""
    from alignpro.server.app import configure_logging, uvicorn_config

    configure_logging(settings)
    drain = Drain()
    GracefulServer(uvicorn_config(settings, drain), drain, supervised).run(sockets=[sock])


@dataclass
class Worker:
    proc: BaseProcess
    ready: Connection  # the read end of the worker's "serving" message
    serving: bool = False

    def started(self) -> bool:
        """Whether the worker has served (said so); EOF without the message: it died before."""
        if not self.serving and self.ready.poll():
            with contextlib.suppress(EOFError):
                self.serving = self.ready.recv_bytes() == b"serving"
        return self.serving


class Supervisor:
    """The parent of ``settings.workers`` worker processes (see the module's docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.sockets: list[socket.socket] = []
        self.workers: list[Worker] = []
        self.deaths: list[float] = []
        self.stopping = False

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (0), a worker's startup failure (3) or a crash loop (1)."""
        s = self.settings
        try:
            self.sockets = bind_sockets(s.host, s.port, s.workers)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", s.host, s.port, exc)
            return STARTUP_FAILURE
        port = self.sockets[0].getsockname()[1]
        log.info("supervisor [%d]: %d workers on http://%s:%d", os.getpid(), s.workers, s.host, port)
        if s.redis_url:
            log.info("rate limits and the rewrite cache are shared by the workers through Redis")
        else:
            log.warning(
                "rate limits and the rewrite cache are per worker (%d workers, no redis_url): a key's limit is "
                "multiplied by up to %d and each worker rewrites for itself",
                s.workers,
                s.workers,
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.workers = [self._spawn(sock) for sock in self.sockets]
            return self._watch()
        finally:
            self._stop()

    def _spawn(self, sock: socket.socket) -> Worker:
        ready, tell = self.context.Pipe(duplex=False)
        proc = self.context.Process(
            target=run_worker,
            args=(self.settings, sock, Supervised(os.getpid(), tell)),
            name="alignpro-worker",
        )
        proc.start()
        tell.close()  # the worker has its copy; the read end sees EOF once the worker is gone
        log.info("worker [%s] started", proc.pid)
        return Worker(proc, ready)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.stopping:  # a second signal goes to the workers as it is
            self._signal_workers(sig)
        self.stopping = True

    def _signal_workers(self, sig: int) -> None:
        for proc in self._procs():
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _procs(self) -> list[BaseProcess]:
        return [w.proc for w in self.workers]

    def _watch(self) -> int:
        """Replace workers that die until told to stop; the exit status."""
        while not self.stopping:
            multiprocessing.connection.wait([p.sentinel for p in self._procs()], timeout=0.25)
            for i, worker in enumerate(self.workers):
                proc = worker.proc
                if proc.exitcode is None or self.stopping:
                    continue
                if proc.exitcode == STARTUP_FAILURE or not worker.started():
                    log.error(
                        "worker [%s] failed to start (status %s): stopping the server",
                        proc.pid,
                        proc.exitcode,
                    )
                    return STARTUP_FAILURE
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < DEATH_WINDOW_S] + [now]
                if len(self.deaths) > MAX_DEATHS:
                    log.error(
                        "%d worker deaths within %.0f s: stopping the server",
                        len(self.deaths),
                        DEATH_WINDOW_S,
                    )
                    return 1
                log.warning("worker [%s] exited with status %s: starting another", proc.pid, proc.exitcode)
                self.workers[i] = self._spawn(self.sockets[i])
        return 0

    def _stop(self) -> None:
        """Close the sockets, drain the workers (SIGTERM), kill what outlives the grace period."""
        self.stopping = True
        for sock in self.sockets:
            sock.close()
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 10
        for proc in self._procs():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs():
            if proc.exitcode is None:
                log.error("worker [%s] did not stop in time: killed", proc.pid)
                proc.kill()
                proc.join()
        log.info("supervisor [%d]: all workers stopped", os.getpid())
