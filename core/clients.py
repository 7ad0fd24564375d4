"""Who is calling: clients with API keys, and the operator.

A key is `secrets.token_urlsafe(32)` (32 random bytes), shown once when the client is created
and stored only as its SHA-256. A fast hash is the right one here: a slow password hash
(bcrypt, argon2) defends guessable secrets, and 256 random bits cannot be guessed, so it
would only make every request slower. Keys are looked up by their hash (one indexed read),
and verified hashes are cached in-process for AUTH_CACHE_SECONDS: a revocation takes effect
in the revoking process at once and in every other API process within that time.

The operator's key is ADMIN_API_KEY from the environment, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from core.errors import ClientNotFound
from core.unit_of_work import DriverUnitOfWork

KEY_BYTES: Final = 32
# The operator's scope for idempotency keys (clients are scoped by their own id).
OPERATOR_ID: Final = UUID(int=0)
_CACHE_LIMIT = 10_000


class Role(StrEnum):
    CLIENT = "client"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. `id` scopes its idempotency keys; for a client it owns accounts."""

    role: Role
    id: UUID
    name: str

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR


OPERATOR: Final = Principal(Role.OPERATOR, OPERATOR_ID, "operator")


@dataclass(frozen=True, slots=True)
class ClientView:
    id: UUID
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class NewClient:
    """A client just created, with its key: the only time the key is ever shown."""

    client: ClientView
    api_key: str


def new_api_key() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


_CLIENT_COLUMNS = "id, name, created_at, revoked_at"
_INSERT = f"INSERT INTO clients (id, name, key_hash) VALUES ($1, $2, $3) RETURNING {_CLIENT_COLUMNS}"
_LIST = f"SELECT {_CLIENT_COLUMNS} FROM clients ORDER BY created_at, id"
_REVOKE = f"""
UPDATE clients SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
RETURNING {_CLIENT_COLUMNS}, key_hash
"""
_BY_KEY_HASH = "SELECT id, name FROM clients WHERE key_hash = $1 AND revoked_at IS NULL"


class Clients:
    """Creating, listing and revoking clients, and telling who a key belongs to."""

    def __init__(self, engine: AsyncEngine, *, admin_api_key: str | None, cache_seconds: float) -> None:
        self._engine = engine
        self._admin_key = admin_api_key.encode() if admin_api_key else None
        self._cache_seconds = cache_seconds
        self._verified: dict[str, tuple[Principal, float]] = {}

    async def create(self, name: str) -> NewClient:
        api_key = new_api_key()
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_INSERT, uuid.uuid4(), name, key_hash(api_key))
            await uow.commit()
        assert row is not None  # INSERT ... RETURNING returns its row
        return NewClient(ClientView(**dict(row)), api_key)

    async def list(self) -> list[ClientView]:
        async with DriverUnitOfWork(self._engine) as uow:
            rows = await uow.connection.fetch(_LIST)
        return [ClientView(**dict(row)) for row in rows]

    async def revoke(self, client_id: UUID) -> ClientView:
        """Revoke the client's key (again is fine: the first revocation time stays). Raises ClientNotFound."""
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_REVOKE, client_id)
            await uow.commit()
        if row is None:
            raise ClientNotFound(f"client {client_id} does not exist")
        values = dict(row)
        self._verified.pop(values.pop("key_hash"), None)
        return ClientView(**values)

    async def authenticate(self, api_key: str) -> Principal | None:
        """The caller this key belongs to, or None for a wrong or revoked key."""
        presented = api_key.encode("utf-8", "surrogateescape")
        if self._admin_key is not None and hmac.compare_digest(presented, self._admin_key):
            return OPERATOR
        digest = hashlib.sha256(presented).hexdigest()
        now = time.monotonic()
        cached = self._verified.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        async with DriverUnitOfWork(self._engine) as uow:
            row = await uow.connection.fetchrow(_BY_KEY_HASH, digest)
        if row is None:
            self._verified.pop(digest, None)
            return None
        principal = Principal(Role.CLIENT, row["id"], row["name"])
        if self._cache_seconds > 0:
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()  # a crude bound: the cache refills from the next requests
            self._verified[digest] = (principal, now + self._cache_seconds)
        return principal
