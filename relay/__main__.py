"""``python -m relay``: run the relay daemon, or an operator command.

    python -m relay                      run until SIGTERM/SIGINT
    python -m relay status [--json]      counts per state, ages, last-minute figures
    python -m relay dead [--limit N]     dead and failed rows
    python -m relay replay ID... | --all-dead | --all-failed  [--force]
    python -m relay purge --older-than 7d

Exit codes: 0 success, 1 database unreachable or a command failed, 2 bad arguments or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from uuid import UUID

import asyncpg
from pydantic import ValidationError

from core.logging import configure_logging
from core.outbox.states import OutboxState
from core.settings import Settings, get_settings
from relay import operator
from relay.db import connect
from relay.durations import parse_duration

EXIT_UNREACHABLE = 1
EXIT_USAGE = 2


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an outbox id (UUID): {text!r}") from None


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m relay", description="Outbox relay daemon and operator commands.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    status = commands.add_parser("status", help="counts per state, oldest ages, last-minute latency")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    dead = commands.add_parser("dead", help="list dead and failed rows")
    dead.add_argument("--limit", type=_positive, default=100, help="at most this many rows (default 100)")
    replay = commands.add_parser("replay", help="put dead or failed rows back to pending, counters reset")
    replay.add_argument("ids", nargs="*", type=_uuid, metavar="ID")
    replay.add_argument("--all-dead", action="store_true", help="every dead row")
    replay.add_argument("--all-failed", action="store_true", help="every failed row")
    replay.add_argument("--force", action="store_true", help="also replay emails whose send may already have happened")
    purge = commands.add_parser("purge", help="delete completed rows (and their task runs) older than an age")
    purge.add_argument("--older-than", type=_duration, required=True, metavar="AGE", help="e.g. 7d, 12h, 30m")
    return parser


async def _run_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        connection = await connect(settings, f"relay-{args.command}")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"error: cannot reach the database: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        if args.command == "status":
            return await operator.status(connection, sys.stdout, as_json=args.json)
        if args.command == "dead":
            return await operator.dead(connection, sys.stdout, args.limit)
        if args.command == "replay":
            states = [OutboxState.DEAD] * args.all_dead + [OutboxState.FAILED] * args.all_failed
            return await operator.replay(connection, sys.stdout, sys.stderr, args.ids, states, force=args.force)
        return await operator.purge(connection, sys.stdout, args.older_than)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"error: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await connection.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it comes with uvicorn[standard]): measurably cheaper per batch."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "replay" and not args.ids and not (args.all_dead or args.all_failed):
        parser.error("replay needs outbox ids, --all-dead or --all-failed")
    if args.command == "replay" and args.ids and (args.all_dead or args.all_failed):
        parser.error("replay takes either ids or --all-dead/--all-failed, not both")
    try:
        settings = get_settings()
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "purge" and args.older_than < (shortest := operator.minimum_retention(settings)):
        parser.error(
            f"--older-than {args.older_than} is shorter than the longest redelivery window ({shortest} = "
            "CELERY_VISIBILITY_TIMEOUT + CELERY_RETRY_BACKOFF_MAX + RELAY_COMPLETION_DEADLINE): a late duplicate "
            "of a purged task would run its effect again"
        )
    configure_logging(settings, "relay")
    if args.command is None:
        from relay.daemon import run_daemon  # the daemon's imports (Celery, redis) only when needed

        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run_daemon(settings))
        return 0
    return asyncio.run(_run_command(args, settings))


if __name__ == "__main__":
    sys.exit(main())
