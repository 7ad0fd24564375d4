"""An open-loop HTTP load at a steady rate, meant to run in its own process.

Request i is sent at start + i / rate whatever the earlier ones took (a slow server shows up as
latency and as requests in flight, not as a lower offered rate), over a pool of keep-alive
connections that grows as needed up to --connections. Prints one JSON line per request:
its status, the id in the answer's body, and when the answer arrived (epoch seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass

from bench.loadgen import read_response, request_bytes


@dataclass
class Answer:
    status: int | str
    id: str | None
    answered_at: float
    latency_s: float


# A connection idle this long is closed, not reused: uvicorn closes keep-alive connections idle for
# 5 s (its default), and a request written as it does so is lost. The client expiring its idle
# connections first is the usual cure; without it such a request counted as a refused transfer.
IDLE_REUSE_S = 2.0


class _Connections:
    def __init__(self, host: str, port: int, limit: int) -> None:
        self._host, self._port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self._slots = asyncio.Semaphore(limit)

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self._idle:
            reader, writer, idle_since = self._idle.pop()
            if time.monotonic() - idle_since < IDLE_REUSE_S:
                return reader, writer
            writer.close()
        return await asyncio.open_connection(self._host, self._port)

    async def send(self, payload: bytes, limit_s: float) -> tuple[int, bytes]:
        async with self._slots:
            reader, writer = await self._connection()
            try:
                writer.write(payload)
                answer = await asyncio.wait_for(read_response(reader), limit_s)
            except BaseException:
                writer.close()
                raise
            self._idle.append((reader, writer, time.monotonic()))
            return answer


async def run(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    headers: tuple[str, ...],
    rate: float,
    duration: float,
    connections: int,
    limit_s: float,
) -> list[Answer]:
    pool = _Connections(host, port, connections)
    answers: list[Answer] = []

    async def one(body: bytes) -> None:
        started = time.perf_counter()
        try:
            status, raw = await pool.send(request_bytes(host, path, body, headers), limit_s)
        except (OSError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            answers.append(Answer(type(exc).__name__, None, time.time(), time.perf_counter() - started))
            return
        found = json.loads(raw).get("id") if 200 <= status < 300 else None
        answers.append(Answer(status, found, time.time(), time.perf_counter() - started))

    started = time.monotonic()
    tasks = []
    for index in range(int(rate * duration)):
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(bodies[index % len(bodies)])))
    await asyncio.gather(*tasks)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/v1/transactions/transfer")
    parser.add_argument("--bodies", required=True, help="file with one JSON request body per line")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    with open(args.bodies, "rb") as handle:
        bodies = [line.strip() for line in handle if line.strip()]
    headers = tuple(args.header)
    answers = asyncio.run(
        run(args.host, args.port, args.path, bodies, headers, args.rate, args.duration, args.connections, args.timeout)
    )
    for answer in answers:
        sys.stdout.write(json.dumps(answer.__dict__) + "\n")


if __name__ == "__main__":
    main()
