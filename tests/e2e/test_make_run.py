"""`make run` and `make demo` the way a developer runs them, against the real processes.

README, Running the parts: "Ctrl-C stops everything, embedded servers included, and leaves no
process behind." README, top: "`make demo` creates a client, opens two accounts, deposits into
them, makes a few transfers and shows each one's tasks reach `completed`."

`python -m devservers.run` is started in a session of its own, as a shell starts a foreground job,
and Ctrl-C is what a terminal sends: SIGINT to that whole process group. Every process it started
is recorded by pid (psutil.Process, which also guards against a reused pid) while the service is
up, and only those are ever signalled or killed by these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from core.settings import Settings
from devservers.embedded import free_port
from tests.support.environment import ADMIN_KEY, ROOT, service_env
from tests.support.waiting import wait_until

pytestmark = pytest.mark.e2e

READY_WITHIN = 90.0  # run.py's own READY_TIMEOUT: migrations, then three processes importing the service
# honcho SIGKILLs what is still running 5 s after the first process stopped; a clean stop is well inside that.
STOPPED_WITHIN = 20.0
# `make run --embedded` with its data in a directory of the test's own (run.py keeps it in the checkout's
# .data/, where a developer's own embedded servers and their data live): the same main(), another DATA.
EMBEDDED_RUN = (
    "import pathlib, sys; import devservers.run as run; "
    "run.DATA = pathlib.Path(sys.argv[1]); run.ADMIN_KEY_FILE = run.DATA / 'admin-api-key'; "
    "sys.exit(run.main(sys.argv[2:]))"
)
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def alive(process: psutil.Process) -> bool:
    """Running (a zombie has exited: it only waits for its parent to read its status)."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return str(process.pid)


@dataclass
class MakeRun:
    """One `make run` in its own session (so its pid is its process group's id), output in log_path."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    api_port: int
    process: subprocess.Popen[bytes] | None = None
    recorded: list[psutil.Process] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_until_up(self) -> None:
        """Until the API (ours: its own line names our port), the relay and the worker say they are up."""
        for text, what in (
            (f"Uvicorn running on {self.base_url}", "the API listening on our port"),
            ("The service is up", "make run's banner (the API answered /health/ready)"),
            ("relay started", "the relay started"),
            (" ready.", "the Celery worker ready"),
        ):
            wait_until(self._said_or_exited(text), READY_WITHIN, what)
            assert not self._exited(), f"make run exited ({self.returncode()}) before {what}:\n{self.log()}"
        with httpx.Client(base_url=self.base_url, timeout=5) as http:
            assert http.get("/health/ready").status_code == 200

    def _said_or_exited(self, text: str) -> Callable[[], bool]:
        return lambda: text in self.log() or self._exited()

    def record_processes(self) -> list[psutil.Process]:
        """make run itself and every process below it (honcho's helpers, the API, keepalives, relay, worker)."""
        assert self.process is not None
        top = psutil.Process(self.process.pid)
        self.recorded = [top, *top.children(recursive=True)]
        return self.recorded

    def ctrl_c(self) -> None:
        """What a terminal does on Ctrl-C: SIGINT to every process of the foreground process group."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def _exited(self) -> bool:
        return self.returncode() is not None

    def clean_up(self) -> None:
        """Stop make run as Ctrl-C does if it still runs; then kill whatever of ours survived: the
        recorded processes, then make run's own group."""
        if self.process is not None and self.process.poll() is None:
            self.ctrl_c()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOPPED_WITHIN)
        survivors = [process for process in self.recorded if alive(process)]
        for process in list(survivors):  # and what they started since they were recorded (a restarted child)
            with contextlib.suppress(psutil.Error):
                survivors += process.children(recursive=True)
        for process in survivors:
            if alive(process):
                process.kill()
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def make_run_env(database_url: str, redis_url: str, api_port: int, **extra: str) -> dict[str, str]:
    """This session's database and Redis (its own queue), our API port, the operator's key, no metrics ports.

    The tasks take a second each (as they take a couple by default), so nothing is complete before
    someone waits for it."""
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        celery_broker_url_override=redis_url,
        celery_result_backend_override=redis_url,
        admin_api_key=ADMIN_KEY,
        email_send_delay=1.0,
        audit_write_delay=1.0,
        rate_limit="100000/second",
    )
    return service_env(settings, API_PORT=str(api_port), CELERY_TASK_QUEUE=f"make-run-{uuid.uuid4().hex[:8]}", **extra)


@pytest.fixture
def make_run(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[MakeRun]:
    """`python -m devservers.run` (what `make run` runs) on the configured servers, up and recorded."""
    port = free_port()
    run = MakeRun(
        [sys.executable, "-m", "devservers.run"],
        make_run_env(database_url, redis_url, port),
        tmp_path / "make-run.log",
        port,
    )
    run.start()
    try:
        run.wait_until_up()
        run.record_processes()
        yield run
    finally:
        run.clean_up()
        print(run.log()[-8000:])  # shown by pytest only when the test failed


def assert_ctrl_c_stops_everything(run: MakeRun, also: Sequence[psutil.Process] = ()) -> None:
    """Ctrl-C: make run exits within STOPPED_WITHIN, and by then none of its recorded processes (nor `also`)
    runs, each stopped by its polite signal."""
    recorded = [*run.recorded, *also]
    names = " ".join(process.name() for process in recorded)
    for expected in ("uvicorn", "keepalive", "relay", "celery"):
        assert expected in " ".join(" ".join(p.cmdline()) for p in recorded), f"{expected} not recorded: {names}"

    started = time.monotonic()
    run.ctrl_c()
    try:
        returncode = run.wait(STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"make run still running {STOPPED_WITHIN:g}s after Ctrl-C:\n{run.log()}") from None
    took = time.monotonic() - started

    left = [describe(process) for process in recorded if alive(process)]
    assert not left, f"still running after make run exited ({took:.1f}s after Ctrl-C): {left}\n{run.log()}"
    assert returncode in (0, 130), f"make run exited {returncode} after Ctrl-C (a crash?):\n{run.log()}"
    # Each process stopped on the polite signal; none had to be SIGKILLed (a worker killed mid-task, a relay
    # killed mid-batch).
    assert "sending SIGKILL" not in run.log(), run.log()
    assert "relay.daemon: relay stopped" in run.log(), "the relay did not stop cleanly"


def test_ctrl_c_stops_every_process_make_run_started(make_run: MakeRun) -> None:
    assert_ctrl_c_stops_everything(make_run)


def postmaster(data_dir: Path) -> psutil.Process:
    """The PostgreSQL server whose data is in data_dir (pg_ctl starts it detached, so no child of make run)."""
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return psutil.Process(pid)


def test_ctrl_c_stops_the_embedded_servers_too(database_url: str, redis_url: str, tmp_path: Path) -> None:
    data = Path(tempfile.mkdtemp(prefix="make-run-embedded-"))
    port = free_port()
    # --embedded ignores the session's servers (it makes them unreachable). REDIS_PORT is the embedded Redis's
    # preferred port: a free one, so that it does not take 6379 when that happens to be free.
    env = make_run_env(database_url, redis_url, port, REDIS_PORT=str(free_port()))
    run = MakeRun([sys.executable, "-c", EMBEDDED_RUN, str(data), "--embedded"], env, tmp_path / "make-run.log", port)
    servers: list[psutil.Process] = []
    run.start()
    try:
        run.wait_until_up()
        assert "PostgreSQL: embedded" in run.log(), run.log()
        assert "Redis (broker): embedded" in run.log(), run.log()
        run.record_processes()
        pid_file = data / "redis" / "redis.pid"
        redis_pid = wait_until(lambda: pid_file.read_text().strip() if pid_file.exists() else None, 10, "redis.pid")
        postgres = postmaster(data / "postgres")
        servers = [psutil.Process(int(redis_pid)), postgres, *postgres.children(recursive=True)]
        assert alive(servers[0]), "the embedded Redis is not running"
        assert "redis" in servers[0].name()
        assert alive(postgres), "the embedded PostgreSQL is not running"
        assert "postgres" in postgres.name()

        assert_ctrl_c_stops_everything(run, also=servers)
    finally:
        run.clean_up()
        for process in servers:
            if alive(process):
                process.kill()
        print(run.log()[-8000:])
        shutil.rmtree(data, ignore_errors=True)


@dataclass(frozen=True)
class DemoSaid:
    """The ids `make demo` printed for what it made."""

    client_id: str
    alice: str
    bob: str
    deposits: dict[str, tuple[str, Decimal]]  # transaction id -> (account name, amount)
    transfers: dict[str, tuple[str, str, Decimal]]  # transaction id -> (from name, to name, amount)


def parse_demo(output: str) -> DemoSaid:
    client = re.search(rf"^client demo-\w+ ({UUID}) created", output, re.M)
    accounts = re.search(rf"^accounts \(opened at 0\.00\): alice ({UUID}), bob ({UUID})$", output, re.M)
    assert client, output
    assert accounts, output
    deposits = {
        m[1]: (m[3], Decimal(m[2])) for m in re.finditer(rf"^deposit ({UUID}): (\S+) EUR into (\w+)", output, re.M)
    }
    transfers = {
        m[1]: (m[2], m[3], Decimal(m[4]))
        for m in re.finditer(rf"^transfer ({UUID}): (\w+) -> (\w+) (\S+) EUR accepted$", output, re.M)
    }
    return DemoSaid(client[1], accounts[1], accounts[2], deposits, transfers)


async def read_rows(
    database_url: str, transaction_ids: list[str], accounts: list[str]
) -> dict[str, list[asyncpg.Record]]:
    connection = await asyncpg.connect(database_url)
    try:
        ids = [uuid.UUID(i) for i in transaction_ids]
        return {
            "transactions": await connection.fetch(
                "SELECT t.id::text AS id, t.kind, t.from_account_id::text AS source, t.to_account_id::text AS target,"
                " t.amount, t.status FROM transactions t WHERE t.id = ANY($1)",
                ids,
            ),
            "touching": await connection.fetch(
                "SELECT id::text AS id FROM transactions WHERE from_account_id = ANY($1) OR to_account_id = ANY($1)",
                [uuid.UUID(i) for i in accounts],
            ),
            "outbox": await connection.fetch(
                "SELECT transaction_id::text AS tx, task_name, state FROM outbox WHERE transaction_id = ANY($1)", ids
            ),
            "audit": await connection.fetch(
                "SELECT transaction_id FROM audit_log WHERE transaction_id = ANY($1)", [str(i) for i in ids]
            ),
        }
    finally:
        await connection.close()


async def read_accounts(database_url: str, said: DemoSaid) -> dict[str, asyncpg.Record]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT a.id::text AS id, a.balance, a.currency, c.id::text AS client_id, c.name"
            " FROM accounts a JOIN clients c ON c.id = a.client_id WHERE a.id = ANY($1)",
            [uuid.UUID(said.alice), uuid.UUID(said.bob)],
        )
        return {row["id"]: row for row in rows}
    finally:
        await connection.close()


def test_make_demo_does_what_it_says_and_every_task_completes(make_run: MakeRun) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "devservers.demo", "--base-url", make_run.base_url, "--timeout", "60"],
        cwd=ROOT,
        env=make_run.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, f"{demo.stdout}\n{demo.stderr}"
    said = parse_demo(demo.stdout)
    database_url = make_run.env["DATABASE_URL"]
    names = {said.alice: "alice", said.bob: "bob"}
    assert sorted(said.deposits.values()) == [("alice", Decimal("100.00")), ("bob", Decimal("50.00"))], demo.stdout
    assert len(said.transfers) == 3, demo.stdout

    accounts = asyncio.run(read_accounts(database_url, said))
    assert set(accounts) == {said.alice, said.bob}, "an account the demo printed is not in the database"
    assert {row["client_id"] for row in accounts.values()} == {said.client_id}
    moved = {said.alice: Decimal("100.00"), said.bob: Decimal("50.00")}
    for source, target, amount in said.transfers.values():
        moved[said.alice if source == "alice" else said.bob] -= amount
        moved[said.alice if target == "alice" else said.bob] += amount
    assert {i: row["balance"] for i, row in accounts.items()} == moved

    ids = [*said.deposits, *said.transfers]
    rows = asyncio.run(read_rows(database_url, ids, [said.alice, said.bob]))
    written = {
        r["id"]: (r["kind"], names.get(r["source"]), names[r["target"]], r["amount"]) for r in rows["transactions"]
    }
    expected: dict[str, tuple[str, str | None, str, Decimal]] = {
        i: ("deposit", None, name, amount) for i, (name, amount) in said.deposits.items()
    }
    expected |= {i: ("transfer", *move) for i, move in said.transfers.items()}
    assert written == expected, "the transactions in the database are not the ones the demo printed"
    assert "refused: 409" in demo.stdout
    assert sorted(r["id"] for r in rows["touching"]) == sorted(ids), "the refused transfer (or another) was written"
    # Each deposit and transfer has its two tasks, both completed, and the audit task really wrote its row.
    tasks = sorted((r["tx"], r["task_name"], r["state"]) for r in rows["outbox"])
    assert tasks == sorted(
        (i, name, "completed") for i in ids for name in ("audit_log_transaction", "send_transaction_email")
    )
    assert sorted(r["transaction_id"] for r in rows["audit"]) == sorted(ids)
