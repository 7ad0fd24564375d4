"""The ledger against a model of it: whatever several clients and the operator do, every answer and
every balance is the one the model predicts, and the books balance.

A hypothesis state machine drives the real app over HTTP (the whole path: keys, ownership,
idempotency, money rules, the database). The model is a few dictionaries: accounts with their
owner, currency and balance; idempotency keys per client with the answer they gave; which
accounts each transaction touched. Each step checks the status code (refusals exactly where the
model refuses) and the body; after each step every balance is compared with the model and
sum(balances) with sum(deposits).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

import httpx
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.main import create_app
from core.settings import Settings
from tests.support.api import OPERATOR_HEADERS, bearer
from tests.support.database import TABLES

T = TypeVar("T")
CLIENTS = 3
CURRENCIES = ("EUR", "USD")
MAXIMUM = Decimal("1000000.00")

valid_amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("150.00"), places=2).map(str)
# What an amount may look like on the wire, good or bad; the model decides which it is.
amounts = st.one_of(
    valid_amounts,
    valid_amounts.map(lambda a: a.rstrip("0").rstrip(".") if "." in a else a),  # "5", "5.5": the same money
    st.sampled_from(["0", "0.00", "-1.00", "1.234", "1e3", "1_000", "١٢", " 1.00", "1000000.01"]),
)
keys = st.none() | st.sampled_from(["k1", "k2", "k3"])


def _money(raw: str) -> Decimal | None:
    """The model's money rule: the amount the service must accept, or None for a 422."""
    if not raw or any(c not in "0123456789." for c in raw) or raw.count(".") > 1 or raw.startswith("."):
        return None
    whole, _, cents = raw.partition(".")
    if not whole or len(cents) > 2 or raw.endswith("."):
        return None
    amount = Decimal(raw)
    return amount.quantize(Decimal("0.01")) if Decimal(0) < amount <= MAXIMUM else None


@dataclass
class Account:
    owner: int
    currency: str
    balance: Decimal = Decimal("0.00")


@dataclass
class Model:
    accounts: dict[str, Account] = field(default_factory=dict)
    deposits: Decimal = Decimal("0.00")
    # (client, key) -> (what the request was, the answer it got)
    keys: dict[tuple[int, str], tuple[tuple[str, str, Decimal], dict[str, Any]]] = field(default_factory=dict)
    touched: dict[str, set[str]] = field(default_factory=dict)  # transaction id -> accounts


class LedgerMachine(RuleBasedStateMachine):
    loop: ClassVar[asyncio.AbstractEventLoop]
    transport: ClassVar[httpx.ASGITransport]
    engine: ClassVar[AsyncEngine]

    accounts = Bundle("accounts")
    transactions = Bundle("transactions")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.run(self._reset())
        self.operator = self._http(OPERATOR_HEADERS)
        self.clients = []
        for index in range(CLIENTS):
            created = self.run(self.operator.post("/api/v1/clients", json={"name": f"client-{index}"}))
            assert created.status_code == 201, created.text
            self.clients.append(self._http(bearer(created.json()["api_key"])))

    def _http(self, headers: dict[str, str]) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport, base_url="http://test", headers=headers)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    async def _reset(self) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))

    def teardown(self) -> None:
        for http in (self.operator, *self.clients):
            self.run(http.aclose())

    @rule(target=accounts, owner=st.integers(0, CLIENTS - 1), currency=st.sampled_from(CURRENCIES))
    def open_account(self, owner: int, currency: str) -> str:
        answer = self.run(
            self.clients[owner].post("/api/v1/accounts", json={"owner_email": "m@example.com", "currency": currency})
        )
        assert answer.status_code == 201, answer.text
        assert answer.json()["balance"] == "0.00"
        account_id: str = answer.json()["id"]
        self.model.accounts[account_id] = Account(owner, currency)
        return account_id

    @rule(target=transactions, account=accounts, amount=amounts)
    def deposit(self, account: str, amount: str) -> str:
        answer = self.run(
            self.operator.post(
                f"/api/v1/accounts/{account}/deposits",
                json={"amount": amount},
                headers={"Idempotency-Key": str(uuid.uuid4())},
            )
        )
        expected = _money(amount)
        if expected is None:
            assert answer.status_code == 422, answer.text
            return str(uuid.uuid4())  # a transaction nobody can read
        assert answer.status_code == 201, answer.text
        assert answer.json()["amount"] == str(expected)
        self.model.accounts[account].balance += expected
        self.model.deposits += expected
        self.model.touched[answer.json()["id"]] = {account}
        transaction_id: str = answer.json()["id"]
        return transaction_id

    @rule(
        target=transactions,
        client=st.integers(0, CLIENTS - 1),
        source=accounts,
        target_account=accounts | st.builds(lambda: str(uuid.uuid4())),
        amount=amounts,
        key=keys,
    )
    def transfer(self, client: int, source: str, target_account: str, amount: str, key: str | None) -> str:
        body = {"from_account_id": source, "to_account_id": target_account, "amount": amount}
        headers = {"Idempotency-Key": key} if key else {}
        answer = self.run(self.clients[client].post("/api/v1/transactions/transfer", json=body, headers=headers))
        status, expected = self._predict(client, source, target_account, amount, key)
        assert answer.status_code == status, (answer.text, status)
        if status != 201:
            return str(uuid.uuid4())
        if expected is not None:  # a replay: the original answer, and nothing moves
            assert answer.json() == expected
            return str(expected["id"])
        value = _money(amount)
        assert value is not None
        assert answer.json()["amount"] == str(value)
        self.model.accounts[source].balance -= value
        self.model.accounts[target_account].balance += value
        self.model.touched[answer.json()["id"]] = {source, target_account}
        if key:
            self.model.keys[(client, key)] = ((source, target_account, value), answer.json())
        transaction_id: str = answer.json()["id"]
        return transaction_id

    def _predict(
        self, client: int, source: str, target: str, amount: str, key: str | None
    ) -> tuple[int, dict[str, Any] | None]:
        """(status, the original answer when it is a replay), in the order the service checks."""
        value = _money(amount)
        if value is None:
            return 422, None
        if key and (client, key) in self.model.keys:
            request, original = self.model.keys[(client, key)]
            return (201, original) if request == (source, target, value) else (409, None)
        if source == target:
            return 422, None
        accounts = self.model.accounts
        if accounts[source].owner != client or target not in accounts:
            return 404, None
        if accounts[source].currency != accounts[target].currency:
            return 422, None
        if accounts[source].balance < value:
            return 409, None
        return 201, None

    @rule(client=st.integers(-1, CLIENTS - 1), account=accounts)
    def read_account(self, client: int, account: str) -> None:
        http = self.operator if client < 0 else self.clients[client]
        answer = self.run(http.get(f"/api/v1/accounts/{account}"))
        known = self.model.accounts[account]
        if client >= 0 and known.owner != client:
            assert answer.status_code == 404, answer.text
            return
        assert answer.status_code == 200, answer.text
        assert answer.json()["balance"] == str(known.balance)

    @rule(client=st.integers(0, CLIENTS - 1), transaction=transactions)
    def read_transaction(self, client: int, transaction: str) -> None:
        answer = self.run(self.clients[client].get(f"/api/v1/transactions/{transaction}"))
        mine = {a for a, account in self.model.accounts.items() if account.owner == client}
        visible = bool(self.model.touched.get(transaction, set()) & mine)
        assert answer.status_code == (200 if visible else 404), answer.text

    @invariant()
    def balances_match_the_model_and_the_books_balance(self) -> None:
        balances, deposits = self.run(self._books())
        assert balances == {a: account.balance for a, account in self.model.accounts.items()}
        assert sum(balances.values(), Decimal("0.00")) == deposits == self.model.deposits

    async def _books(self) -> tuple[dict[str, Decimal], Decimal]:
        async with self.engine.connect() as connection:
            rows = (await connection.execute(text("SELECT id::text, balance FROM accounts"))).all()
            deposited = (
                await connection.execute(
                    text("SELECT coalesce(sum(amount), 0) FROM transactions WHERE kind = 'deposit'")
                )
            ).scalar_one()
        return {row[0]: row[1] for row in rows}, deposited


def test_the_ledger_answers_and_balances_as_its_model_says(settings: Settings, engine: AsyncEngine) -> None:
    loop = asyncio.new_event_loop()
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    try:
        machine = type(
            "Machine",
            (LedgerMachine,),
            {"loop": loop, "transport": httpx.ASGITransport(app=app), "engine": app.state.services.engine},
        )
        run_state_machine_as_test(
            machine,
            settings=hypothesis_settings(
                max_examples=30,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            ),
        )
    finally:
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()
