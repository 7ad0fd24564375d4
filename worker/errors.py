"""Errors the tasks raise on purpose. The first two are not retried: retrying cannot fix them."""

from __future__ import annotations


class InvalidTaskArguments(ValueError):
    """The message's arguments break the task contract (core/contract.py)."""


class PermanentDeliveryError(RuntimeError):
    """The mail server refused the message for good (an SMTP 5xx reply)."""


class SendDeadlineExceeded(TimeoutError):
    """The whole SMTP conversation did not finish within its deadline (shorter than the lease)."""


class DeliveryUncertain(OSError):
    """The send failed after the message data went to the mail server: it may have been accepted.

    Retried like any transient failure, but the lease records the send as in doubt, so an
    operator's replay of the email needs --force.
    """
