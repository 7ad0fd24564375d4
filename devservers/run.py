"""`make run`: find or start PostgreSQL and Redis, migrate, then run the API, the relay and a worker.

The three processes come from the Procfile and run under honcho's manager, their output interleaved
with a name prefix. Ctrl-C (or SIGTERM) stops them, then the embedded servers this started, if any.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from types import FrameType

from honcho.environ import parse_procfile
from honcho.manager import Manager
from honcho.printer import Message

from core.settings import Settings
from devservers.discovery import EmbeddedUnavailable, Services, resolve_services

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".data"
# The development operator key: made once, kept with the embedded servers' data, readable by you only.
ADMIN_KEY_FILE = DATA / "admin-api-key"
READY_TIMEOUT = 90.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devservers.run", description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", action="store_true", help="use embedded servers even if configured ones answer")
    args = parser.parse_args(argv)
    # pgserver warns about XDG_RUNTIME_DIR on machines without a login session; it works without it.
    warnings.filterwarnings("ignore", module="platformdirs")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    settings = Settings()
    if args.embedded:
        settings = _unreachable(settings)
    try:
        with ExitStack() as stack:
            services = resolve_services(settings, DATA, stack)
            _report(services)
            admin_key = development_admin_key(settings, ADMIN_KEY_FILE)
            env = process_env(settings, services, admin_key)
            _say("applying migrations (alembic upgrade head)")
            if subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], env=env, cwd=ROOT).returncode:
                _say("migrations failed; stopping")
                return 1
            return supervise(env, settings.api_port)
    except EmbeddedUnavailable as exc:
        _say(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def development_admin_key(settings: Settings, path: Path) -> str:
    """The operator's key for `make run`: ADMIN_API_KEY if set, else the one in `path` (made on first use)."""
    if settings.admin_key:
        _say("operator key: ADMIN_API_KEY from your environment")
        return settings.admin_key
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32) + "\n")
    _say(f"operator key (ADMIN_API_KEY) for development: in {path}")
    _say(f"  export ADMIN_API_KEY=$(cat {path})   # make demo reads it from there by itself")
    return path.read_text().strip()


def process_env(settings: Settings, services: Services, admin_key: str | None = None) -> dict[str, str]:
    """The environment of the API, relay and worker: this one, plus the chosen servers, the operator's key
    and venv tools on PATH."""
    env = dict(os.environ)
    env.update(services.env())
    if admin_key:
        env["ADMIN_API_KEY"] = admin_key
    env["API_PORT"] = str(settings.api_port)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Without it Python buffers a piped stdout, and the logs would reach the terminal in bursts.
    env["PYTHONUNBUFFERED"] = "1"
    if "log_json" not in settings.model_fields_set:
        env["LOG_JSON"] = "false"  # one readable line per event on a terminal, unless asked otherwise
    return env


def supervise(env: dict[str, str], api_port: int) -> int:
    """Run the Procfile's processes until Ctrl-C/SIGTERM or until one of them exits; return honcho's code."""
    manager = Manager()
    for name, command in parse_procfile((ROOT / "Procfile").read_text()).processes.items():
        manager.add_process(name, command, env=env, cwd=str(ROOT))
    threading.Thread(target=_announce_when_ready, args=(manager, api_port), daemon=True).start()
    manager.loop()
    return int(manager.returncode or 0)


def banner(api_port: int) -> str:
    """What to do next, once the API answers."""
    base = f"http://127.0.0.1:{api_port}"
    json_id = "python3 -c 'import json, sys; print(json.load(sys.stdin)[\"id\"])'"
    post = "curl -s -X POST -H 'Content-Type: application/json'"
    return "\n".join(
        [
            "The service is up (API, relay, worker). Ctrl-C stops everything.",
            f"  API:       {base}",
            f"  API docs:  {base}/docs",
            "  See it work:  make demo   (in another terminal: a client, accounts, deposits, transfers, their tasks)",
            "  Or by hand: a client (with the operator's key), an account, a deposit, a transfer:",
            f"    export ADMIN_API_KEY=$(cat {ADMIN_KEY_FILE})",
            f'    KEY=$({post} -H "Authorization: Bearer $ADMIN_API_KEY" {base}/api/v1/clients -d \'{{"name": "me"}}\''
            " | python3 -c 'import json, sys; print(json.load(sys.stdin)[\"api_key\"])')",
            f'    A=$({post} -H "Authorization: Bearer $KEY" {base}/api/v1/accounts'
            f' -d \'{{"owner_email": "alice@example.com", "currency": "EUR"}}\' | {json_id})',
            f'    B=$({post} -H "Authorization: Bearer $KEY" {base}/api/v1/accounts'
            f' -d \'{{"owner_email": "bob@example.com", "currency": "EUR"}}\' | {json_id})',
            f"    {post} -H \"Authorization: Bearer $ADMIN_API_KEY\" -H 'Idempotency-Key: first-deposit'"
            f' {base}/api/v1/accounts/$A/deposits -d \'{{"amount": "100.00"}}\'',
            f'    {post} -H "Authorization: Bearer $KEY" {base}/api/v1/transactions/transfer'
            ' -d "{\\"from_account_id\\": \\"$A\\", \\"to_account_id\\": \\"$B\\", \\"amount\\": \\"12.50\\"}"',
            f'    curl -s -H "Authorization: Bearer $KEY" {base}/api/v1/transactions/<id from the answer>  # its tasks',
        ]
    )


def _announce_when_ready(manager: Manager, api_port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    url = f"http://127.0.0.1:{api_port}/health/ready"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                _system_line(manager, banner(api_port))
                return
        except OSError:
            time.sleep(0.25)
    _system_line(manager, f"the API did not answer on {url} within {READY_TIMEOUT:g}s; see its log above")


def _system_line(manager: Manager, text: str) -> None:
    # Through honcho's own queue, so the text is printed in order with the processes' lines.
    manager.events.put(Message(type="line", data=text + "\n", time=datetime.now(), name="system", colour=None))  # noqa: DTZ005 - honcho prints local wall-clock time


def _report(services: Services) -> None:
    _say(f"PostgreSQL: {services.postgres.source} - {services.postgres.note}")
    _say(f"Redis (broker): {services.broker.source} - {services.broker.note}")
    if services.postgres.source == "embedded":
        _say(f"  psql URL: {services.postgres.url}")
    if services.broker.source == "embedded":
        _say(f"  redis URL: {services.broker.url}")


def _unreachable(settings: Settings) -> Settings:
    """settings whose servers cannot answer, so discovery starts the embedded ones."""
    return settings.model_copy(
        update={
            "database_url": "postgresql://postgres@127.0.0.1:1/postgres",
            "celery_broker_url_override": "redis://127.0.0.1:1/0",
        }
    )


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Until honcho installs its own handler: unwind, so the embedded servers started so far are stopped.
    raise KeyboardInterrupt


def _say(message: str) -> None:
    print(f"make run: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
