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
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan"}


async def connect(settings: Settings, application_name: str = "relay") -> asyncpg.Connection:
    """A new connection with the relay's session settings.

    Raises OSError, TimeoutError or asyncpg errors when the database cannot be reached.
    """
    return await asyncpg.connect(
        settings.libpq_database_url,
        timeout=CONNECT_TIMEOUT,
        command_timeout=COMMAND_TIMEOUT,
        server_settings={**SERVER_SETTINGS, "application_name": application_name},
    )
