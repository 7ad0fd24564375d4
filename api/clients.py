"""`python -m api.clients create NAME | list | revoke ID`: the operator's client commands, without HTTP.

The same service as POST/GET/DELETE /api/v1/clients, on the configured database (DATABASE_URL or
POSTGRES_*). `create` prints the new key once: only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from uuid import UUID

from core.clients import Clients, ClientView
from core.database import create_engine
from core.errors import ClientNotFound
from core.settings import get_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.clients", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a client and print its API key (once)")
    create.add_argument("name")
    commands.add_parser("list", help="list clients (never their keys)")
    revoke = commands.add_parser("revoke", help="revoke a client's key")
    revoke.add_argument("client_id", type=UUID)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except ClientNotFound as exc:
        print(f"api.clients: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace) -> int:
    engine = create_engine(get_settings(), pool_size=1, max_overflow=0)
    clients = Clients(engine, admin_api_key=None, cache_seconds=0)
    try:
        if args.command == "create":
            created = await clients.create(args.name)
            if args.json:
                print(
                    json.dumps({"id": str(created.client.id), "name": created.client.name, "api_key": created.api_key})
                )
            else:
                print(f"client {created.client.id} ({created.client.name})")
                print(f"api key (shown once, keep it secret): {created.api_key}")
        elif args.command == "list":
            _print(await clients.list(), as_json=args.json)
        else:
            _print([await clients.revoke(args.client_id)], as_json=args.json)
    finally:
        await engine.dispose()
    return 0


def _print(views: list[ClientView], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{k: str(v) if v is not None else None for k, v in vars_of(view).items()} for view in views]))
        return
    for view in views:
        state = f"revoked {view.revoked_at:%Y-%m-%d %H:%M:%S}" if view.revoked_at else "active"
        print(f"{view.id}  {state:<27} {view.name}")


def vars_of(view: ClientView) -> dict[str, object]:
    return {"id": view.id, "name": view.name, "created_at": view.created_at, "revoked_at": view.revoked_at}


if __name__ == "__main__":
    sys.exit(main())
