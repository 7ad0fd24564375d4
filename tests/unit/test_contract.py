"""The outbox payloads a transfer produces are JSON-safe and carry the transfer's facts."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.contract import (
    AUDIT_LOG_TRANSACTION,
    SEND_TRANSACTION_EMAIL,
    DepositFacts,
    TaskMessage,
    TransferFacts,
    deposit_messages,
    transfer_messages,
)
from core.money import check_transfer_amount, format_amount, parse_amount

amounts = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1000000"), places=2)
facts = st.builds(
    TransferFacts,
    transaction_id=st.uuids(),
    from_account_id=st.uuids(),
    to_account_id=st.uuids(),
    amount=amounts,
    currency=st.from_regex(r"[A-Z]{3}", fullmatch=True),
    status=st.just("SUCCESS"),
    created_at=st.datetimes(timezones=st.just(UTC)),
    source_email=st.emails(),
)


@given(facts)
def test_every_payload_survives_a_json_round_trip(transfer: TransferFacts) -> None:
    for message in transfer_messages(transfer):
        assert json.loads(json.dumps(message.kwargs)) == message.kwargs


@given(facts)
def test_a_transfer_produces_exactly_its_two_tasks(transfer: TransferFacts) -> None:
    email, audit = transfer_messages(transfer)
    assert email.task_name == SEND_TRANSACTION_EMAIL
    assert email.kwargs == {
        "email": transfer.source_email,
        "amount": format_amount(transfer.amount),
        "status": "SUCCESS",
    }
    assert audit.task_name == AUDIT_LOG_TRANSACTION
    assert audit.kwargs["transaction_id"] == str(transfer.transaction_id)
    data = audit.kwargs["data"]
    assert Decimal(data["amount"]) == transfer.amount
    assert uuid.UUID(data["from_account_id"]) == transfer.from_account_id
    assert datetime.fromisoformat(data["created_at"]) == transfer.created_at


@given(amounts)
def test_valid_amounts_round_trip_through_their_wire_form(amount: Decimal) -> None:
    assert check_transfer_amount(parse_amount(format_amount(amount)), Decimal("1000000")) == amount


@given(st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=Decimal("0.001"), max_value=Decimal(10)))
def test_three_decimal_places_are_refused_even_when_the_last_is_zero(amount: Decimal) -> None:
    # Nothing is rounded or normalised: "1.230" is not an amount on the wire, nor here.
    with pytest.raises(ValueError, match="decimal places"):
        check_transfer_amount(amount, Decimal(100))


def test_naive_and_aware_times_are_not_mixed() -> None:
    moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=1)
    payload = transfer_messages(
        TransferFacts(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), Decimal("1.00"), "EUR", "SUCCESS", moment, "a@b.co")
    )[1].kwargs
    assert payload["data"]["created_at"].endswith("+00:00")


MOMENT = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
IDS = [uuid.UUID(int=n) for n in (1, 2, 3)]


def test_a_transfer_s_two_payloads_exactly() -> None:
    facts = TransferFacts(IDS[0], IDS[1], IDS[2], Decimal("12.5"), "EUR", "SUCCESS", MOMENT, "payer@example.com")
    assert transfer_messages(facts) == [
        TaskMessage(SEND_TRANSACTION_EMAIL, {"email": "payer@example.com", "amount": "12.50", "status": "SUCCESS"}),
        TaskMessage(
            AUDIT_LOG_TRANSACTION,
            {
                "transaction_id": str(IDS[0]),
                "data": {
                    "kind": "transfer",
                    "transaction_id": str(IDS[0]),
                    "from_account_id": str(IDS[1]),
                    "to_account_id": str(IDS[2]),
                    "amount": "12.50",
                    "currency": "EUR",
                    "status": "SUCCESS",
                    "created_at": "2026-03-01T12:30:00+00:00",
                },
            },
        ),
    ]


def test_a_deposit_s_two_payloads_exactly() -> None:
    facts = DepositFacts(IDS[0], IDS[2], Decimal("7"), "USD", "SUCCESS", MOMENT, "owner@example.com")
    assert deposit_messages(facts) == [
        TaskMessage(SEND_TRANSACTION_EMAIL, {"email": "owner@example.com", "amount": "7.00", "status": "SUCCESS"}),
        TaskMessage(
            AUDIT_LOG_TRANSACTION,
            {
                "transaction_id": str(IDS[0]),
                "data": {
                    "kind": "deposit",
                    "transaction_id": str(IDS[0]),
                    "from_account_id": None,
                    "to_account_id": str(IDS[2]),
                    "amount": "7.00",
                    "currency": "USD",
                    "status": "SUCCESS",
                    "created_at": "2026-03-01T12:30:00+00:00",
                },
            },
        ),
    ]
