"""The operator commands as an operator runs them: `python -m relay status|dead|replay|purge`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import uuid

import asyncpg
import pytest

from core.outbox.states import OutboxState
from core.settings import Settings
from devservers.embedded import free_port
from relay.db import connect
from relay.operator import PURGE_CHUNK
from tests.support.relays import relay_env, run_relay_command
from tests.support.waiting import until

pytestmark = pytest.mark.e2e

ROW = """
INSERT INTO outbox (id, task_name, kwargs, state, attempts, last_error, created_at, published_at, completed_at)
VALUES ($1, 'audit_log_transaction', '{}', $2::text, $3, $4, now() - make_interval(secs => $5),
        CASE WHEN $2::text IN ('published', 'completed') THEN now() - make_interval(secs => $5) END,
        CASE WHEN $2::text = 'completed' THEN now() - make_interval(secs => $5) + interval '0.25 s' END)
"""

REPLAYED = """
SELECT id, state, attempts, republishes, next_attempt_at <= now() AS due_now, published_at,
       delivery_started_at, delivery_lease_until, last_error
FROM outbox
"""


@pytest.fixture
def env(settings: Settings, redis_url: str) -> dict[str, str]:
    return relay_env(settings, redis_url, "unused")


async def add(
    db: asyncpg.Connection, state: str, age_s: float = 1.0, attempts: int = 0, error: str | None = None
) -> uuid.UUID:
    row_id = uuid.uuid4()
    await db.execute(ROW, row_id, state, attempts, error, age_s)
    return row_id


async def test_status_reports_counts_ages_and_latency(db: asyncpg.Connection, env: dict[str, str]) -> None:
    await add(db, OutboxState.PENDING, age_s=30)
    await add(db, OutboxState.PUBLISHED, age_s=20)
    for _ in range(3):
        await add(db, OutboxState.COMPLETED, age_s=10)
    await add(db, OutboxState.DEAD)

    result = run_relay_command(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["counts"] == {"pending": 1, "published": 1, "completed": 3, "failed": 0, "dead": 1}
    assert 29 < report["oldest_pending_age_s"] < 60
    assert 19 < report["oldest_published_not_completed_age_s"] < 50
    assert report["published_last_minute"] == 4
    assert report["completed_last_minute"] == 3
    assert report["commit_to_completed_p50_s"] == pytest.approx(0.25, abs=0.01)
    assert report["commit_to_completed_p99_s"] == pytest.approx(0.25, abs=0.01)

    text = run_relay_command(env, "status")
    assert text.returncode == 0
    assert "pending:    1" in text.stdout
    assert "commit->completed (last minute):  p50 250.0 ms, p99 250.0 ms" in text.stdout


async def test_status_on_an_empty_outbox(db: asyncpg.Connection, env: dict[str, str]) -> None:
    result = run_relay_command(env, "status")
    assert result.returncode == 0
    assert "oldest pending:                   none" in result.stdout
    assert "n/a" in result.stdout


async def test_dead_lists_dead_and_failed_rows_and_replay_brings_them_back(
    db: asyncpg.Connection, env: dict[str, str]
) -> None:
    dead = await add(db, OutboxState.DEAD, attempts=10, error="broker unavailable: refused")
    failed = await add(db, OutboxState.FAILED, attempts=1, error="InvalidTaskArguments: amount")
    other_dead = await add(db, OutboxState.DEAD, attempts=10, error="cannot build message")
    published = await add(db, OutboxState.PUBLISHED)
    # Counters and timestamps a replay must reset, not only `attempts`.
    await db.execute(
        "UPDATE outbox SET republishes = 3, next_attempt_at = now() + interval '1 hour',"
        " delivery_started_at = now(), delivery_lease_until = now() + interval '1 hour'"
        " WHERE id = ANY($1::uuid[])",
        [dead, failed, other_dead],
    )

    listing = run_relay_command(env, "dead")
    assert listing.returncode == 0
    lines = listing.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["id", "state", "task_name", "attempts", "republishes", "last_error"]
    assert {line.split("\t")[0] for line in lines[1:]} == {str(dead), str(failed), str(other_dead)}
    assert f"{failed}\tfailed\taudit_log_transaction\t1\t3\tInvalidTaskArguments: amount" in lines

    one = run_relay_command(env, "replay", str(failed))
    assert (one.returncode, one.stdout.strip()) == (0, "replayed 1 row(s)")
    rest = run_relay_command(env, "replay", "--all-dead")
    assert (rest.returncode, rest.stdout.strip()) == (0, "replayed 2 row(s)")
    rows = {r["id"]: r for r in await db.fetch(REPLAYED)}
    for row_id in (dead, failed, other_dead):
        row = rows[row_id]
        assert (row["state"], row["attempts"], row["republishes"]) == (OutboxState.PENDING, 0, 0)
        assert row["due_now"] is True, "a replayed row is claimable at once, not after its old backoff"
        assert (row["published_at"], row["delivery_started_at"], row["delivery_lease_until"]) == (None, None, None)
        assert row["last_error"] == "replayed by operator"

    not_dead = run_relay_command(env, "replay", str(published), str(uuid.uuid4()))
    assert not_dead.returncode == 1
    assert f"error: {published} is not a dead or failed outbox row" in not_dead.stderr
    # Read after the refused replay: the published row is left as it was.
    after = await db.fetchrow("SELECT state, attempts, last_error FROM outbox WHERE id = $1", published)
    assert after is not None
    assert (after["state"], after["attempts"], after["last_error"]) == (OutboxState.PUBLISHED, 0, None)
    assert run_relay_command(env, "dead").stdout.strip() == "no dead or failed rows"


async def test_purge_deletes_old_completed_rows_only(db: asyncpg.Connection, env: dict[str, str]) -> None:
    week = 7 * 86_400
    old_completed = await add(db, OutboxState.COMPLETED, age_s=week + 3600)
    keep = {
        await add(db, OutboxState.COMPLETED, age_s=week - 3600),
        await add(db, OutboxState.PUBLISHED, age_s=week + 3600),
        await add(db, OutboxState.PENDING, age_s=week + 3600),
        await add(db, OutboxState.DEAD, age_s=week + 3600),
        await add(db, OutboxState.FAILED, age_s=week + 3600),
    }
    result = run_relay_command(env, "purge", "--older-than", "7d")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("purged 1 row(s)")
    remaining = {r["id"] for r in await db.fetch("SELECT id FROM outbox")}
    assert remaining == keep
    assert old_completed not in remaining


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay"], "replay needs outbox ids, --all-dead or --all-failed"),
        (["replay", "not-a-uuid"], "not an outbox id (UUID)"),
        (["replay", "--all-dead", str(uuid.UUID(int=1))], "either ids or --all-dead"),
        (["purge", "--older-than", "7x"], "invalid duration '7x'"),
        (["purge"], "the following arguments are required: --older-than"),
        (["dead", "--limit", "0"], "must be a positive integer"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(env: dict[str, str], args: list[str], message: str) -> None:
    result = run_relay_command(env, *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("args", [["status"], ["dead"], ["replay", "--all-dead"], ["purge", "--older-than", "1d"]])
def test_unreachable_database_exits_1_with_a_clear_message(settings: Settings, args: list[str]) -> None:
    env = relay_env(
        settings, "redis://127.0.0.1:1/0", "unused", DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )
    result = run_relay_command(env, *args)
    assert result.returncode == 1
    assert "error: cannot reach the database" in result.stderr


async def test_replaying_an_email_whose_send_may_have_happened_needs_force(
    db: asyncpg.Connection, env: dict[str, str]
) -> None:
    in_doubt, safe = uuid.uuid4(), uuid.uuid4()
    for row_id in (in_doubt, safe):
        await db.execute(
            "INSERT INTO outbox (id, task_name, kwargs, state, last_error) "
            "VALUES ($1, 'send_transaction_email', '{}', 'failed', 'TimeoutError')",
            row_id,
        )
    # A delivery took the lease to send and never settled the outcome (it died, or the reply was lost).
    await db.execute(
        "INSERT INTO task_runs (task_id, task_name, state, lease_until, sends_in_doubt) "
        "VALUES ($1, 'send_transaction_email', 'running', now() - interval '1 minute', 1), "
        "($2, 'send_transaction_email', 'running', now() - interval '1 minute', 0)",
        str(in_doubt),
        str(safe),
    )

    refused = run_relay_command(env, "replay", str(in_doubt), str(safe))
    assert refused.returncode == 1
    assert refused.stdout.strip() == "replayed 1 row(s)"
    assert f"error: {in_doubt}: its email may already have been sent" in refused.stderr
    assert "--force" in refused.stderr
    states = {r["id"]: r["state"] for r in await db.fetch("SELECT id, state FROM outbox")}
    assert states == {in_doubt: OutboxState.FAILED, safe: OutboxState.PENDING}
    listed = run_relay_command(env, "replay", "--all-failed")
    assert (listed.returncode, listed.stdout.strip()) == (1, "replayed 0 row(s)")

    forced = run_relay_command(env, "replay", "--force", str(in_doubt))
    assert (forced.returncode, forced.stdout.strip(), forced.stderr) == (0, "replayed 1 row(s)", "")
    assert await db.fetchval("SELECT state FROM outbox WHERE id = $1", in_doubt) == OutboxState.PENDING


async def test_purge_takes_the_task_runs_with_their_rows_and_refuses_an_age_inside_the_redelivery_window(
    db: asyncpg.Connection, env: dict[str, str]
) -> None:
    old = await add(db, OutboxState.COMPLETED, age_s=8 * 86_400)
    recent = await add(db, OutboxState.COMPLETED, age_s=60)
    for row_id in (old, recent):
        await db.execute(
            "INSERT INTO task_runs (task_id, task_name, state) VALUES ($1, 'audit_log_transaction', 'done')",
            str(row_id),
        )

    too_short = run_relay_command(env, "purge", "--older-than", "30m")
    assert too_short.returncode == 2
    assert "shorter than the longest redelivery window (1:11:00" in too_short.stderr

    result = run_relay_command(env, "purge", "--older-than", "7d")
    assert (result.returncode, result.stdout.strip()) == (
        0,
        "purged 1 row(s) and 1 task run(s) older than 7 days, 0:00:00",
    )
    assert [r["id"] for r in await db.fetch("SELECT id FROM outbox")] == [recent]
    assert [r["task_id"] for r in await db.fetch("SELECT task_id FROM task_runs")] == [str(recent)]


# A statement-level trigger of the test's own: one row per DELETE statement on outbox and on task_runs,
# with its transaction and the rows it deleted. The outbox one then waits on an advisory lock the test
# holds, which parks the purge inside its transaction until the test has looked at the locks.
PURGE_PROBE = """
CREATE TABLE purge_probe (seq serial, txid bigint, tab text, deleted bigint);
CREATE FUNCTION purge_probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO purge_probe (txid, tab, deleted) SELECT txid_current(), TG_TABLE_NAME, count(*) FROM gone;
    IF TG_TABLE_NAME = 'outbox' THEN
        PERFORM pg_advisory_xact_lock({key});
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER purge_probe AFTER DELETE ON outbox REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION purge_probe();
CREATE TRIGGER purge_probe AFTER DELETE ON task_runs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION purge_probe();
"""
DROP_PURGE_PROBE = """
DROP TRIGGER IF EXISTS purge_probe ON outbox;
DROP TRIGGER IF EXISTS purge_probe ON task_runs;
DROP FUNCTION IF EXISTS purge_probe();
DROP TABLE IF EXISTS purge_probe;
"""
PROBE_LOCK = 716_016
# Completed more than a week ago, oldest first by g; each with its task_runs record.
OLD_COMPLETED = """
WITH made AS (
    INSERT INTO outbox (id, task_name, kwargs, state, created_at, published_at, completed_at)
    SELECT gen_random_uuid(), 'audit_log_transaction', '{}', 'completed', t, t, t
    FROM generate_series(1, $1) g, LATERAL (SELECT now() - interval '8 days' - make_interval(secs => g)) AS a(t)
    RETURNING id
)
INSERT INTO task_runs (task_id, task_name, state) SELECT id::text, 'audit_log_transaction', 'done' FROM made
"""


async def purge_waiting_on_probe(db: asyncpg.Connection) -> bool:
    return bool(
        await db.fetchval(
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'relay-purge' AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
        )
    )


async def lockable(db: asyncpg.Connection, row_id: uuid.UUID) -> bool:
    """Whether another writer can lock the row at once (and then lets it go)."""
    try:
        async with db.transaction():
            await db.execute("SELECT 1 FROM outbox WHERE id = $1 FOR UPDATE NOWAIT", row_id)
    except asyncpg.LockNotAvailableError:
        return False
    return True


async def test_purge_deletes_in_chunks_each_its_own_transaction_and_never_locks_the_rows_ahead(
    settings: Settings, db: asyncpg.Connection, env: dict[str, str]
) -> None:
    chunk = PURGE_CHUNK
    old = 2 * chunk + 345
    await db.execute(OLD_COMPLETED, old)
    newest_old, oldest = (
        await db.fetchval("SELECT id FROM outbox ORDER BY completed_at DESC LIMIT 1"),
        await db.fetchval("SELECT id FROM outbox ORDER BY completed_at LIMIT 1"),
    )
    keep = {
        await add(db, OutboxState.COMPLETED, age_s=7 * 86_400 - 3600),
        await add(db, OutboxState.PENDING, age_s=8 * 86_400),
        await add(db, OutboxState.PUBLISHED, age_s=8 * 86_400),
        await add(db, OutboxState.FAILED, age_s=8 * 86_400),
    }
    holder = await connect(settings, "test-purge-probe")
    purge: asyncio.Task[subprocess.CompletedProcess[str]] | None = None
    try:
        await db.execute(PURGE_PROBE.replace("{key}", str(PROBE_LOCK)))
        await holder.execute("SELECT pg_advisory_lock($1)", PROBE_LOCK)
        purge = asyncio.create_task(asyncio.to_thread(run_relay_command, env, "purge", "--older-than", "7d"))
        await until(lambda: purge_waiting_on_probe(db), 30, "the purge's first DELETE to reach the probe")

        # Mid-purge: the first chunk (the oldest rows) is locked by its open transaction, nothing else is.
        assert not await lockable(db, oldest), "the probe should hold the purge inside its first chunk"
        assert await lockable(db, newest_old), "the purge locks rows beyond the chunk it is deleting"
        assert all([await lockable(db, row_id) for row_id in keep])

        await holder.execute("SELECT pg_advisory_unlock($1)", PROBE_LOCK)
        result = await asyncio.wait_for(purge, 60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"purged {old} row(s) and {old} task run(s)"), result.stdout
        statements = await db.fetch("SELECT txid, tab, deleted FROM purge_probe ORDER BY seq")
    finally:
        await holder.close()  # releases the probe's lock, if a failure left it held
        if purge is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(purge, 60)
        await db.execute(DROP_PURGE_PROBE)

    sizes = [chunk] * (old // chunk) + [old % chunk]
    assert len(sizes) == math.ceil(old / chunk)
    outbox_deletes = [(r["txid"], r["deleted"]) for r in statements if r["tab"] == "outbox"]
    runs_deletes = [(r["txid"], r["deleted"]) for r in statements if r["tab"] == "task_runs"]
    assert [deleted for _, deleted in outbox_deletes] == sizes, statements
    assert len({txid for txid, _ in outbox_deletes}) == len(sizes), "each chunk commits in its own transaction"
    assert runs_deletes == outbox_deletes, "a chunk's task runs go in the chunk's own transaction"
    assert {r["id"] for r in await db.fetch("SELECT id FROM outbox")} == keep
    assert await db.fetchval("SELECT count(*) FROM task_runs") == 0
