"""The whole service as real processes, the way a user runs it: API, relay and worker, with a
private Redis (so a test may stop it) and a real SMTP sink. Every process is always stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from devservers.embedded import free_port
from tests.support.database import select
from tests.support.environment import ROOT
from tests.support.relays import PrivateRedis
from tests.support.smtp import SmtpSink
from tests.support.waiting import wait_until

# Short limits and intervals so that faults resolve in seconds, not the production minutes.
E2E_ENV = {
    "EMAIL_SEND_DELAY": "0",
    "AUDIT_WRITE_DELAY": "0.05",
    "CELERY_TASK_QUEUE": "e2e",
    "CELERY_TASK_TIME_LIMIT": "5",
    "CELERY_TASK_SOFT_TIME_LIMIT": "4",
    "SMTP_TIMEOUT": "4",
    "CELERY_RETRY_BACKOFF_MAX": "2",
    "CELERY_TASK_MAX_RETRIES": "20",
    "CELERY_VISIBILITY_TIMEOUT": "10",
    "CELERY_WORKER_CONCURRENCY": "8",
    "RELAY_POLL_INTERVAL": "0.5",
    "RELAY_BACKOFF_BASE": "0.1",
    "RELAY_BACKOFF_MAX": "1",
    "RELAY_MAX_ATTEMPTS": "1000",
    "RELAY_PUBLISH_TIMEOUT": "2",
    "RELAY_COMPLETION_DEADLINE": "15",
    "RELAY_RECONCILE_INTERVAL": "1",
    "RELAY_MAX_REPUBLISHES": "20",
    "LOG_JSON": "false",
}


@dataclass
class Managed:
    """One long-running process of the service, restartable, with its output in a log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL the process (and anything it started): a crash, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class System:
    env: dict[str, str]
    redis: PrivateRedis
    smtp: SmtpSink
    workdir: Path
    api_port: int = field(default_factory=free_port)
    processes: dict[str, Managed] = field(default_factory=dict)
    holder_key: str = ""  # set by open_accounts()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def add(self, name: str, args: list[str]) -> Managed:
        managed = Managed(name, args, self.env, self.workdir / f"{name}.log")
        self.processes[name] = managed
        return managed

    def start_all(self) -> None:
        python = sys.executable
        uvicorn = ["-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(self.api_port)]
        self.add("api", [python, *uvicorn])
        self.add("relay", [python, "-m", "relay"])
        celery = [python, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel=info"]
        # Supervised like `make run` and compose do: Celery's worker may exit when the broker goes away.
        keepalive = [python, "-m", "devservers.keepalive", "--delay", "0.5", "--max-delay", "2", "--"]
        self.add("worker", [*keepalive, *celery, "--without-mingle", "--without-gossip"])
        for managed in self.processes.values():
            managed.start()
        # The API's own line, not a connect to the port: a stranger that took the port meanwhile
        # would satisfy a connect, while uvicorn would exit with "address already in use".
        listening = f"Uvicorn running on {self.base_url}"
        wait_until(lambda: listening in self.processes["api"].log(), 30, f"the API saying {listening!r}")
        wait_until(lambda: "ready." in self.processes["worker"].log(), 30, "the worker ready")

    def kill_worker_process(self) -> None:
        """SIGKILL the Celery worker itself (its keepalive supervisor restarts it)."""
        supervisor = self.processes["worker"].process
        assert supervisor is not None
        for child in psutil.Process(supervisor.pid).children(recursive=True):
            child.kill()

    def stop_all(self) -> None:
        for managed in reversed(list(self.processes.values())):
            managed.stop()
            managed.kill()

    def client(self, key: str | None = None) -> httpx.Client:
        """An HTTP client on the API with `key` (default: the operator's, ADMIN_API_KEY)."""
        headers = {"Authorization": f"Bearer {key or self.env['ADMIN_API_KEY']}"}
        return httpx.Client(base_url=self.base_url, timeout=30, headers=headers)

    def new_client_key(self, name: str = "e2e") -> str:
        with self.client() as operator:
            answer = operator.post("/api/v1/clients", json={"name": name})
        assert answer.status_code == 201, answer.text
        key: str = answer.json()["api_key"]
        return key

    def funded_accounts(self, key: str, *balances: str) -> list[str]:
        """Accounts of the client with `key`, each funded by an operator's deposit of its balance."""
        ids = []
        with self.client(key) as client, self.client() as operator:
            for index, balance in enumerate(balances):
                opened = client.post(
                    "/api/v1/accounts", json={"owner_email": f"owner{index}@example.com", "currency": "EUR"}
                )
                assert opened.status_code == 201, opened.text
                ids.append(opened.json()["id"])
                if balance not in ("0", "0.00"):
                    deposited = operator.post(
                        f"/api/v1/accounts/{ids[-1]}/deposits",
                        json={"amount": balance},
                        headers={"Idempotency-Key": f"fund-{ids[-1]}"},
                    )
                    assert deposited.status_code == 201, deposited.text
        return ids

    def logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{m.log()[-6000:]}" for name, m in self.processes.items())

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    def add_relay(self, name: str, **env: str) -> Managed:
        """Another relay process with extra environment (not started)."""
        managed = Managed(name, [sys.executable, "-m", "relay"], {**self.env, **env}, self.workdir / f"{name}.log")
        self.processes[name] = managed
        return managed

    def open_accounts(self, count: int, balance: str = "1000000.00") -> list[str]:
        """`count` funded accounts of one client, whose HTTP client `holder()` gives."""
        self.holder_key = self.new_client_key("holder")
        return self.funded_accounts(self.holder_key, *[balance] * count)

    def holder(self) -> httpx.Client:
        """An HTTP client with the key of the client open_accounts() made."""
        return self.client(self.holder_key)

    def transfer(self, client: httpx.Client, source: str, target: str, amount: str = "1.00") -> str:
        """One transfer; returns its transaction id (fails the test if it was not committed)."""
        response = client.post(
            "/api/v1/transactions/transfer", json={"from_account_id": source, "to_account_id": target, "amount": amount}
        )
        assert response.status_code == 201, response.text
        transaction_id: str = response.json()["id"]
        return transaction_id

    def with_deposits(self, committed: set[str]) -> set[str]:
        """`committed` and the deposits that funded the accounts: every transaction with outbox rows."""
        deposits = select(self.database_url, "SELECT id::text AS id FROM transactions WHERE kind = 'deposit'")
        return committed | {r["id"] for r in deposits}

    def each_transfer_once(self, committed: set[str]) -> None:
        """Every outbox row completed, and each committed transfer (and each deposit that funded the
        accounts) has exactly one audit row and exactly one email (by Message-ID), and nothing
        else has any."""
        database = self.database_url
        committed = self.with_deposits(committed)
        rows = select(database, "SELECT id::text AS id, task_name, state, transaction_id::text AS tx FROM outbox")
        assert {r["state"] for r in rows} == {"completed"}
        assert {r["tx"] for r in rows} == committed
        audit = Counter(r["transaction_id"] for r in select(database, "SELECT transaction_id FROM audit_log"))
        assert audit == dict.fromkeys(committed, 1), "an audit row is missing or was written twice"
        emails = {f"<{r['id']}@outbox-transfers>" for r in rows if r["task_name"] == "send_transaction_email"}
        received = Counter(message["Message-ID"] for message in self.smtp.received())
        assert received == dict.fromkeys(emails, 1), f"an email is missing or went out twice: {received.most_common(3)}"


@dataclass
class TransferLoad:
    """Transfers between the given accounts at a steady rate, from a background thread, until the
    block ends. Every transfer must commit (the accounts hold far more than they move)."""

    system: System
    accounts: list[str]
    rate: float
    committed: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __enter__(self) -> TransferLoad:
        self._thread = threading.Thread(target=self._run, name="transfer-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        if self._error is not None and kind is None:
            raise self._error

    def _run(self) -> None:
        try:
            with self.system.holder() as client:
                index = 0
                while not self._stop.wait(1 / self.rate):
                    source = self.accounts[index % len(self.accounts)]
                    target = self.accounts[(index + 1) % len(self.accounts)]
                    self.committed.add(self.system.transfer(client, source, target))
                    index += 1
        except BaseException as error:  # reported by __exit__
            self._error = error
