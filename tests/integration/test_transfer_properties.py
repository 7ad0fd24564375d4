"""Invariants over any sequence of transfers, valid or not, against the real database."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from core.errors import DomainError
from core.ledger import TransferRequest
from core.settings import Settings
from tests.conftest import make_ledger

GHOST = -1  # stands for an account that does not exist

steps = st.lists(
    st.tuples(
        st.integers(GHOST, 3),
        st.integers(GHOST, 3),
        st.decimals(min_value=Decimal("0.01"), max_value=Decimal("80"), places=2),
    ),
    min_size=1,
    max_size=12,
)
balances = st.lists(st.decimals(min_value=Decimal(0), max_value=Decimal(100), places=2), min_size=4, max_size=4)


async def _run(database_url: str, opening: list[Decimal], sequence: list[tuple[int, int, Decimal]]) -> None:
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("TRUNCATE task_runs, audit_log, outbox, transactions, accounts CASCADE"))
        service = make_ledger(engine, Settings(_env_file=None, database_url=database_url))
        ids = [(await service.open_account(f"p{i}@example.com", "EUR", b)).id for i, b in enumerate(opening)]
        succeeded, failed = [], 0
        for source, target, amount in sequence:
            request = TransferRequest(
                ids[source] if source != GHOST else uuid.uuid4(),
                ids[target] if target != GHOST else uuid.uuid4(),
                amount,
            )
            try:
                succeeded.append((await service.transfer(request)).transaction.id)
            except DomainError:
                failed += 1
        async with engine.connect() as connection:
            total = (await connection.execute(text("SELECT sum(balance) FROM accounts"))).scalar_one()
            lowest = (await connection.execute(text("SELECT min(balance) FROM accounts"))).scalar_one()
            per_transfer: dict[uuid.UUID, int] = dict(
                (
                    await connection.execute(
                        text("SELECT transaction_id, count(*) FROM outbox GROUP BY transaction_id")
                    )
                ).all()
            )
            names = (
                (
                    await connection.execute(
                        text("SELECT array_agg(task_name ORDER BY task_name) FROM outbox GROUP BY transaction_id")
                    )
                )
                .scalars()
                .all()
            )
            transactions = (await connection.execute(text("SELECT count(*) FROM transactions"))).scalar_one()
    finally:
        await engine.dispose()
    assert total == sum(opening)
    assert lowest >= 0
    assert transactions == len(succeeded)
    assert per_transfer == dict.fromkeys(succeeded, 2)
    assert all(n == ["audit_log_transaction", "send_transaction_email"] for n in names)
    assert len(succeeded) + failed == len(sequence)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opening=balances, sequence=steps)
def test_money_is_conserved_and_outbox_rows_match_commits(
    settings: Settings, opening: list[Decimal], sequence: list[tuple[int, int, Decimal]]
) -> None:
    asyncio.run(_run(settings.async_database_url, opening, sequence))
