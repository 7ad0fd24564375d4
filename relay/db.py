"""The relay's PostgreSQL connections (raw asyncpg: the hot path runs three statements per batch)."""

from __future__ import annotations

import asyncpg

from core.settings import Settings

CONNECT_TIMEOUT = 5.0
# Bounds a statement on a database that stopped answering, so the relay reconnects instead of hanging.
COMMAND_TIMEOUT = 30.0

# asyncpg prepares and caches statements; after a few runs PostgreSQL may switch the claim to a
# generic plan that ignores the partial index on pending rows (measured: p50 5 ms -> 600 ms).
# Forcing custom plans keeps the planner looking at the actual parameters every time.
#
# No bitmap scans: a row that leaves the pending state leaves a dead entry in the partial index
# until a vacuum, and a bitmap scan visits every such entry on every claim without ever marking it
# dead. Measured: with 24,000 completed rows not yet vacuumed, the claim took about 1 ms of the
# database's CPU each time, the relay polls every RELAY_BUSY_POLL while rows keep coming, and the
# pipeline fell behind at 150 transfers/s. A plain index scan marks the entries it finds dead, so
# the next claims skip them (0.2 ms). The relay's other statements read rows by id or scan the
# published rows' index, which index scans serve as well.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan", "enable_bitmapscan": "off"}
# TCP keepalives on the server's side of the connection (seconds, probes): a relay whose machine
# vanished (a partition, a VM gone) loses its session, its transaction and its row locks after
# about idle + interval x count = 25 s, instead of the kernel's two hours. They do not notice a
# frozen process, whose kernel still answers: idle_in_transaction_session_timeout does that.
KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}


def server_settings(settings: Settings, application_name: str) -> dict[str, str]:
    """The relay's session settings.

    idle_in_transaction_session_timeout (RELAY_IDLE_TRANSACTION_TIMEOUT): a relay frozen between
    its publish and its commit (a paused VM, a long GC pause, SIGSTOP) has its session ended by
    PostgreSQL, which rolls the batch back and releases its rows; the published messages are then
    duplicates the workers recognise by task id. The woken relay's next statement fails with a
    connection error, and it reconnects. A healthy batch is idle in its transaction only while it
    waits for the broker, which RELAY_PUBLISH_TIMEOUT bounds (the setting must exceed it).
    """
    idle_ms = round(settings.relay_idle_transaction_timeout_s * 1000)
    return {
        **SERVER_SETTINGS,
        **KEEPALIVES,
        "idle_in_transaction_session_timeout": str(idle_ms),
        "application_name": application_name,
    }


async def connect(settings: Settings, application_name: str = "relay") -> asyncpg.Connection:
    """A new connection with the relay's session settings (see server_settings()).

    Raises OSError, TimeoutError or asyncpg errors when the database cannot be reached.
    """
    return await asyncpg.connect(
        settings.libpq_database_url,
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        server_settings=server_settings(settings, application_name),
    )
