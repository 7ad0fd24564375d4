"""Every statement of core.outbox.queries, run on rows in every state, makes only allowed transitions.

A trigger records each (old state, new state) an UPDATE produces. Each operation runs on a
fresh row per state; what it did must be a subset of OUTBOX_TRANSITIONS, and must include the
transition the operation exists for (so that a statement that silently does nothing fails too).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import asyncpg
import pytest

from core.outbox import queries
from core.outbox.states import ALL_OUTBOX_STATES, OUTBOX_TRANSITIONS, OutboxState

S = OutboxState
Rows = dict[OutboxState, uuid.UUID]

_RECORDER = """
CREATE TABLE IF NOT EXISTS seen_transitions (before text, after text);
CREATE OR REPLACE FUNCTION record_transition() RETURNS trigger AS $$
BEGIN
    INSERT INTO seen_transitions VALUES (OLD.state, NEW.state);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS record_transition ON outbox;
CREATE TRIGGER record_transition AFTER UPDATE ON outbox FOR EACH ROW EXECUTE FUNCTION record_transition();
"""
_FORGET = "DROP TRIGGER IF EXISTS record_transition ON outbox; DROP TABLE IF EXISTS seen_transitions"


@pytest.fixture
async def rows(db: asyncpg.Connection) -> AsyncIterator[Rows]:
    """One row in each state, due and overdue for everything: published and completed an hour ago."""
    await db.execute(_RECORDER)
    ids = {state: uuid.uuid4() for state in ALL_OUTBOX_STATES}
    for state, row_id in ids.items():
        await db.execute(
            "INSERT INTO outbox (id, task_name, kwargs, state, attempts, next_attempt_at, published_at, completed_at) "
            "VALUES ($1, 'audit_log_transaction', '{}', $2, 1, now() - interval '1 hour', "
            "now() - interval '1 hour', now() - interval '1 hour')",
            row_id,
            state,
        )
    yield ids
    await db.execute(_FORGET)


async def _claim_and_publish(db: asyncpg.Connection, rows: Rows) -> None:
    async with db.transaction():
        claimed = await queries.claim_pending(db, 100)
        await queries.mark_published(db, [row.id for row in claimed] + list(rows.values()))


def _fail_claimed(max_attempts: int) -> Callable[[asyncpg.Connection, Rows], Awaitable[None]]:
    async def run(db: asyncpg.Connection, rows: Rows) -> None:
        async with db.transaction():
            claimed = await queries.claim_pending(db, 100)
            every = [queries.OutboxRow(row_id, "audit_log_transaction", {}, 1) for row_id in rows.values()]
            failures = [queries.Failure(row, "broker down", 1.0) for row in [*claimed, *every]]
            await queries.record_failures(db, failures, max_attempts)

    return run


def _reconcile(
    max_republishes: int, *, record_effects: bool = False
) -> Callable[[asyncpg.Connection, Rows], Awaitable[None]]:
    async def run(db: asyncpg.Connection, rows: Rows) -> None:
        if record_effects:
            for row_id in rows.values():
                await queries.record_run_done(db, str(row_id), "audit_log_transaction", {})
        await queries.reconcile_published(
            db,
            deadline=1,
            limit=100,
            max_republishes=max_republishes,
            queue=queries.QueueObservation(empty=True, held=frozenset()),
            order_margin=1,
        )

    return run


async def _mark_poison_dead(db: asyncpg.Connection, rows: Rows) -> None:
    async with db.transaction():
        claimed = await queries.claim_pending(db, 100)
        await queries.mark_dead(db, [(row_id, "poison") for row_id in [r.id for r in claimed] + list(rows.values())])


async def _start_each(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        await queries.start_delivery(db, row_id, str(row_id), 60)


async def _start_and_claim_each(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        await queries.start_and_claim(db, row_id, str(row_id), "send_transaction_email", 60)


async def _record_audit_each(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        await queries.record_audit_once(db, str(row_id), "audit_log_transaction", {}, "t", {}, row_id)


async def _finish_each(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        token = await queries.claim_lease(db, str(row_id), "send_transaction_email", 60)
        assert token is not None
        await queries.finish_and_complete(db, str(row_id), token, {}, row_id)


async def _extend_each(db: asyncpg.Connection, rows: Rows) -> None:
    await _start_each(db, rows)
    await db.execute("TRUNCATE seen_transitions")
    for row_id in rows.values():
        await queries.extend_delivery(db, row_id, 120)


async def _complete_each(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        await queries.complete(db, row_id)


async def _fail_each(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        await queries.fail(db, row_id, "gave up")


async def _replay_ids(db: asyncpg.Connection, rows: Rows) -> None:
    await queries.replay(db, ids=list(rows.values()), reason="replayed")


async def _replay_states(db: asyncpg.Connection, rows: Rows) -> None:
    await queries.replay(db, states=list(ALL_OUTBOX_STATES), reason="replayed")


async def _replay_forced(db: asyncpg.Connection, rows: Rows) -> None:
    await queries.replay(db, ids=list(rows.values()), reason="replayed", spare_in_doubt=False)


OPERATIONS: dict[str, tuple[Callable[[asyncpg.Connection, Rows], Awaitable[None]], set[tuple[S, S]]]] = {
    "claim + mark_published": (_claim_and_publish, {(S.PENDING, S.PUBLISHED)}),
    "record_failures, attempts left": (_fail_claimed(100), {(S.PENDING, S.PENDING)}),
    "record_failures, attempts used up": (_fail_claimed(1), {(S.PENDING, S.DEAD)}),
    "mark_dead (poison rows)": (_mark_poison_dead, {(S.PENDING, S.DEAD)}),
    "reconcile_published, message gone": (_reconcile(5), {(S.PUBLISHED, S.PENDING)}),
    "reconcile_published, re-publishes used up": (_reconcile(0), {(S.PUBLISHED, S.DEAD)}),
    "reconcile_published, effect recorded": (_reconcile(5, record_effects=True), {(S.PUBLISHED, S.COMPLETED)}),
    "start_delivery": (_start_each, {(S.PENDING, S.PENDING), (S.PUBLISHED, S.PUBLISHED)}),
    "start_and_claim": (_start_and_claim_each, {(S.PENDING, S.PENDING), (S.PUBLISHED, S.PUBLISHED)}),
    "record_audit_once": (_record_audit_each, {(s, S.COMPLETED) for s in ALL_OUTBOX_STATES if s != S.COMPLETED}),
    "finish_and_complete": (_finish_each, {(s, S.COMPLETED) for s in ALL_OUTBOX_STATES if s != S.COMPLETED}),
    "extend_delivery": (_extend_each, {(S.PENDING, S.PENDING), (S.PUBLISHED, S.PUBLISHED)}),
    "complete": (_complete_each, {(s, S.COMPLETED) for s in ALL_OUTBOX_STATES if s != S.COMPLETED}),
    "fail": (_fail_each, {(S.PENDING, S.FAILED), (S.PUBLISHED, S.FAILED)}),
    "replay ids": (_replay_ids, {(S.DEAD, S.PENDING), (S.FAILED, S.PENDING)}),
    "replay states": (_replay_states, {(S.DEAD, S.PENDING), (S.FAILED, S.PENDING)}),
    "replay --force": (_replay_forced, {(S.DEAD, S.PENDING), (S.FAILED, S.PENDING)}),
}


@pytest.mark.parametrize("name", OPERATIONS)
async def test_statement_makes_only_allowed_transitions(name: str, db: asyncpg.Connection, rows: Rows) -> None:
    operation, expected = OPERATIONS[name]

    await operation(db, rows)

    seen = {(S(r["before"]), S(r["after"])) for r in await db.fetch("SELECT before, after FROM seen_transitions")}
    assert seen - OUTBOX_TRANSITIONS == set(), f"{name} made transitions outside OUTBOX_TRANSITIONS"
    assert expected <= seen, f"{name} did not make {expected - seen}"


async def test_purge_deletes_only_completed_rows_and_their_task_runs(db: asyncpg.Connection, rows: Rows) -> None:
    for row_id in rows.values():
        await queries.record_run_done(db, str(row_id), "audit_log_transaction", {})

    deleted = await queries.purge_completed(db, timedelta(minutes=1), 100)

    kept = {row_id for state, row_id in rows.items() if state != S.COMPLETED}
    assert deleted == (1, 1)
    assert {r["id"] for r in await db.fetch("SELECT id FROM outbox")} == kept
    assert {r["task_id"] for r in await db.fetch("SELECT task_id FROM task_runs")} == {str(i) for i in kept}


def test_nothing_leaves_completed() -> None:
    assert not [pair for pair in OUTBOX_TRANSITIONS if pair[0] == S.COMPLETED]
