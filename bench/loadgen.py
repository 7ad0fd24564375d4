"""An HTTP load generator meant to run in its own process: N keep-alive connections, closed loop.

Prints one JSON object: requests, errors, status counts, throughput and latency percentiles.
Written on raw asyncio streams so the generator costs far less CPU than the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def request_bytes(host: str, path: str, body: bytes, headers: tuple[str, ...] = ()) -> bytes:
    extra = "".join(f"{header}\r\n" for header in headers)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and its body."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _connection(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    stop_at: float,
    request_timeout: float,
    latencies: list[float],
    statuses: Counter[str],
    headers: tuple[str, ...] = (),
) -> None:
    rng = random.Random()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), request_timeout)
            assert reader is not None
            assert writer is not None
            writer.write(request_bytes(host, path, rng.choice(bodies), headers))
            status, _ = await asyncio.wait_for(read_response(reader), request_timeout)
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            statuses[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(min(0.05, max(0.0, stop_at - time.perf_counter())))
            continue
        latencies.append(time.perf_counter() - started)
        statuses[str(status)] += 1
    if writer is not None:
        writer.close()


async def run(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    connections: int,
    duration: float,
    request_timeout: float,
    headers: tuple[str, ...] = (),
) -> dict[str, object]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(
        *(
            _connection(host, port, path, bodies, stop_at, request_timeout, latencies, statuses, headers)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    latencies.sort()
    return {
        "connections": connections,
        "elapsed_s": elapsed,
        "requests": len(latencies),
        "ok": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": dict(statuses),
        "rps": ok / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/v1/transactions/transfer")
    parser.add_argument("--bodies", required=True, help="file with one JSON request body per line")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value' sent with every request")
    args = parser.parse_args()
    with open(args.bodies, "rb") as handle:
        bodies = [line.strip() for line in handle if line.strip()]
    result = asyncio.run(
        run(args.host, args.port, args.path, bodies, args.connections, args.duration, args.timeout, tuple(args.header))
    )
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
