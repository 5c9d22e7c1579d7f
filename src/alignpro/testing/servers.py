"""Servers started as subprocesses on loopback, for the tests and the benchmarks alike.

    server = Server("gateway", args, f"http://127.0.0.1:{port}/health", log_path=tmp / "gw.log").start()
    ...
    server.stop()

One helper for the tests, the vLLM launcher (:mod:`alignpro.testing.vllm`) and the benchmarks, so that how a server is started, waited for and stopped is the same everywhere, and a fix
to it reaches all of them.

:class:`Server` starts a command with its output in a log file, waits until its health URL answers 200 (or not at
all, with ``health_url=None``), and stops it by its process id: SIGTERM, SIGKILL after a grace period, then
SIGKILL to whatever is left of its process group. A server that exits or does not come up in time is a
``RuntimeError`` with the end of its log, never a skip. :func:`cpu_seconds` is the CPU time of a process tree,
read from /proc, for the benchmarks' cost per request.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_pids(pid: int) -> list[int]:
    """The pids of the live children of ``pid`` (from /proc; empty if it is gone)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and all its descendants that are alive (seconds)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        todo += child_pids(p)
    return total


class Server:
    """A server subprocess with its log file, waited for on ``health_url``, stopped by its pid.

    ``env`` is added to this process's environment, less the variables named in ``unset``. ``log_path`` gets
    stdout and stderr (None: discarded). ``grace`` is how long :meth:`stop` waits after SIGTERM by default.
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        health_url: str | None,
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        unset: Iterable[str] = (),
        grace: float = 30.0,
    ) -> None:
        self.name = name
        self.args = args
        self.health_url = health_url
        self.env = dict(env or {})
        self.log_path = log_path
        self.cwd = cwd
        self.unset = tuple(unset)
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0  # seconds from spawn to a healthy health_url

    @property
    def url(self) -> str:
        """Scheme, host and port of the health URL, e.g. ``http://127.0.0.1:8000`` (no path)."""
        if self.health_url is None:
            raise ValueError(f"{self.name} has no health URL, hence no URL")
        u = urlsplit(self.health_url)
        return f"{u.scheme}://{u.netloc}"

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None, self.url
        return port

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> Server:
        """Spawn the server and wait until its health URL answers 200; a RuntimeError if it exits first or
        ``timeout`` seconds pass (then it is stopped)."""
        t0 = time.monotonic()
        env = {**{k: v for k, v in os.environ.items() if k not in self.unset}, **self.env}
        with contextlib.ExitStack() as stack:
            # Appended to, not truncated: a server restarted on the same port (same log name) keeps the first
            # run's log for the test that reads it.
            log = stack.enter_context(open(self.log_path, "ab")) if self.log_path else subprocess.DEVNULL
            self.proc = subprocess.Popen(
                self.args,
                env=env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group, led by this pid: stop() can reach the children it spawned (vLLM's
                # engine core, nginx's workers) and nothing else.
                start_new_session=True,
            )
        if self.health_url is None:
            return self
        deadline = t0 + timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with status {self.proc.returncode} before answering "
                        f"{self.health_url}; log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.health_url).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not answer {self.health_url} within {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.25)
        self.started_s = time.monotonic() - t0
        return self

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 6000) -> str:
        if self.log_path is None:
            return "(no log)"
        return self.log_text()[-n:] or "(empty log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        """CPU seconds of the server and its live descendants so far."""
        return cpu_seconds(self.pid)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the pid, SIGKILL it after ``grace`` seconds (default: the constructor's); then kill what is
        left of its group."""
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # The group id is the server's own pid (start_new_session): children it left behind, e.g. a vLLM
        # engine core whose parent was SIGKILLed, are in it and nothing else is.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gateway_server(
    workdir: Path,
    config: str | None = None,
    *,
    env: dict[str, str] | None = None,
    port: int | None = None,
    name: str = "gateway",
) -> Server:
    """``alignpro serve`` (not started) on a free loopback port, with ``config`` (YAML text) as its
    ``--config`` if given, else the default settings; ``env`` is added to its environment."""
    port = port or free_port()
    args = [sys.executable, "-m", "alignpro.cli.main", "serve", "--port", str(port)]
    if config is not None:
        path = workdir / f"{name}-{port}.yaml"
        path.write_text(config)
        args += ["--config", str(path)]
    # ALIGNPRO_* from the caller's environment would override the file; the tests mean what the file says.
    unset = tuple(k for k in os.environ if k.startswith("ALIGNPRO_") and k != "ALIGNPRO_HOME")
    return Server(
        name,
        args,
        f"http://127.0.0.1:{port}/health",
        env={"PYTHONUNBUFFERED": "1", **(env or {})},  # tests read the log while the server runs
        log_path=workdir / f"{name}-{port}.log",
        unset=unset,
    )


def start_gateway(
    tmp: Path,
    config: str | None = None,
    env: dict[str, str] | None = None,
    *,
    timeout: float = 180.0,
) -> tuple[Server, str]:
    """``alignpro serve`` on a free port (:func:`gateway_server`), started; returns the server and its base URL
    (no /v1)."""
    server = gateway_server(tmp, config, env=env).start(timeout=timeout)
    return server, server.url
