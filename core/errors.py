"""Domain errors. They carry no HTTP knowledge: the API maps each to a status code."""

from __future__ import annotations


class DomainError(Exception):
    """A request the domain refuses. `code` is stable and machine-readable."""

    code = "domain_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AccountNotFound(DomainError):
    code = "account_not_found"


class TransactionNotFound(DomainError):
    code = "transaction_not_found"


class InsufficientFunds(DomainError):
    code = "insufficient_funds"


class InvalidTransfer(DomainError):
    """The transfer can never succeed as asked (same account, currency mismatch)."""

    code = "invalid_transfer"


class InvalidAmount(DomainError):
    """An amount the money rules refuse; `field` names the request field it came in."""

    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class IdempotencyConflict(DomainError):
    code = "idempotency_conflict"


class Unauthenticated(DomainError):
    """No key, or a key that is wrong or revoked. Deliberately says which of these it was not."""

    code = "unauthenticated"


class Forbidden(DomainError):
    """The caller's role may not do this (whatever the resource)."""

    code = "forbidden"


class ClientNotFound(DomainError):
    code = "client_not_found"


class BalanceLimitExceeded(DomainError):
    """The deposit would take the balance past what an account can hold."""

    code = "balance_limit_exceeded"
