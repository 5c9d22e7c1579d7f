"""A real ``redis-server`` on a free loopback port, for the tests and benchmarks of shared state.

    with redis_server(tmp_path) as url:     # "redis://127.0.0.1:<port>/0"
        ...

Debian's ``redis-server`` package (``make test`` installs it when it is missing) or the binary named by
``$REDIS_SERVER``. Not found is a ``RuntimeError`` saying how to install it, never a skip. Nothing is persisted.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignpro.testing.servers import Server, free_port


def redis_server_binary() -> str:
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not path:
        raise RuntimeError(
            "redis-server is not installed: `apt-get install -y redis-server` (make test does it), "
            "or point REDIS_SERVER at a redis-server binary"
        )
    return path


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, port: int | None = None, timeout: float = 20.0) -> tuple[Server, str]:
    """``redis-server`` on ``port`` (a free one by default), started and answering PING; and its URL."""
    port = port or free_port()
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    server = Server("redis", args, None, log_path=workdir / f"redis-{port}.log", cwd=workdir).start()
    deadline = time.monotonic() + timeout
    while not ping(port):
        if not server.alive() or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server did not answer on port {port}:\n{server.log_tail()}")
        time.sleep(0.05)
    return server, f"redis://127.0.0.1:{port}/0"


@contextmanager
def redis_server(workdir: Path, port: int | None = None) -> Iterator[str]:
    """A started ``redis-server``; its URL."""
    server, url = start_redis(workdir, port)
    try:
        yield url
    finally:
        server.stop()
