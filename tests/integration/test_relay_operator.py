"""The operator commands as an operator runs them: `python -m relay status|dead|replay|purge`."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from core.outbox.states import OutboxState
from core.settings import Settings
from devservers.embedded import free_port
from tests.support.relays import relay_env, run_relay_command

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
