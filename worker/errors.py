"""Errors the tasks raise on purpose. Neither is retried: retrying cannot fix them."""

from __future__ import annotations


class InvalidTaskArguments(ValueError):
    """The message's arguments break the task contract (core/contract.py)."""


class PermanentDeliveryError(RuntimeError):
    """The mail server refused the message for good (an SMTP 5xx reply)."""
