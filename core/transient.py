"""Which database errors mean "unreachable for now": one classification for every process.

The API answers them with 503, the relay reconnects, the worker retries the task. Anything
else (a bug, a constraint violation) is not transient: retrying it only delays the failure.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
from sqlalchemy import exc as sa_exc

# After one of these the connection itself cannot be used again: discard it.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,  # includes CannotConnectNowError (the server is starting)
    asyncpg.InterfaceError,  # "connection is closed", "another operation is in progress"
    asyncpg.InternalClientError,  # FATAL read but the close not yet: the driver's state is broken
    asyncpg.OperatorInterventionError,  # admin shutdown, pg_terminate_backend
    asyncpg.IdleInTransactionSessionTimeoutError,
    OSError,  # refused/reset connections, DNS
    TimeoutError,  # connect or command timeout
)

# The connection may be fine, but this statement met a passing condition: try it again later.
_PASSING_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.TooManyConnectionsError,
    asyncpg.QueryCanceledError,  # statement_timeout
    asyncpg.LockNotAvailableError,  # lock_timeout
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection free in time
)

TRANSIENT_ERRORS: tuple[type[Exception], ...] = CONNECTION_ERRORS + _PASSING_ERRORS


def is_transient(
    error: BaseException,
    *,
    also: tuple[type[BaseException], ...] = (),
    permanent: Callable[[BaseException], bool] = lambda _: False,
) -> bool:
    """True when the error, or one it was raised from, is in TRANSIENT_ERRORS (or `also`).

    `permanent` lets a caller veto a cause that looks transient (a definite SMTP refusal is an
    OSError too). The first cause that is either permanent or transient decides.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if permanent(current):
            return False
        if isinstance(current, TRANSIENT_ERRORS + also):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False
