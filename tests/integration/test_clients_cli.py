"""`python -m api.clients`: the operator's commands create, list and revoke clients like the API does."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from core.clients import Clients
from core.settings import Settings
from tests.support.environment import ROOT, service_env

pytestmark = pytest.mark.e2e  # runs `python -m api.clients` as a process


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.clients", *args],
        cwd=ROOT,
        env=service_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_create_list_revoke(settings: Settings, engine: AsyncEngine) -> None:
    created = _cli(settings, "--json", "create", "shop")
    assert created.returncode == 0, created.stderr
    client = json.loads(created.stdout)
    service = Clients(engine, admin_api_key=None, cache_seconds=0)
    caller = await service.authenticate(client["api_key"])
    assert caller is not None
    assert str(caller.id) == client["id"]

    listed = _cli(settings, "list")
    assert client["id"] in listed.stdout
    assert "active" in listed.stdout
    assert client["api_key"] not in listed.stdout

    revoked = _cli(settings, "revoke", client["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    assert await service.authenticate(client["api_key"]) is None

    missing = _cli(settings, "revoke", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr
