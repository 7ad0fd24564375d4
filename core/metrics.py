"""Prometheus plumbing every process shares: a registry of its own and the /metrics server on its port.

Each process (API, relay, worker) builds one `new_registry()`, registers its metrics on it and serves
it with `start_metrics_server` on its `*_METRICS_PORT`. A registry per process (not prometheus-client's
global one) lets tests build any number of apps in one interpreter without duplicate-metric errors.
The metric names themselves are listed, with their meaning, in monitoring/metrics.yml.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

logger = logging.getLogger(__name__)

# Every interface: Prometheus scrapes from another container (Compose) or another machine.
METRICS_HOST = "0.0.0.0"  # noqa: S104 - metrics carry no secrets, and the scraper is elsewhere


def new_registry() -> CollectorRegistry:
    """An empty registry with the process, platform and garbage-collector metrics already on it.

    It also turns off, for the whole process, the `*_created` series prometheus-client adds beside every
    counter and histogram: Prometheus does not use them, and `transfers_created` would read like an outcome.
    """
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    """A running /metrics endpoint (a daemon thread). `close()` stops it and frees the port."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, port: int, *, variable: str) -> MetricsServer | None:
    """Serve `registry` at http://<host>:<port>/metrics in a daemon thread; None when port is 0 (off).

    `variable` names the setting the port came from (API_METRICS_PORT...), for the error message.
    Raises RuntimeError when the port is taken: a process told to serve metrics that cannot must not
    pretend it does.
    """
    if port == 0:
        return None
    try:
        server, thread = start_http_server(port, addr=METRICS_HOST, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            message = f"{variable}={port}: the port is in use; choose another, or 0 to turn metrics off"
            raise RuntimeError(message) from exc
        raise
    logger.info("metrics served on port %d (/metrics)", port)
    return MetricsServer(port, server, thread)
