"""The states of an outbox row and of a task run, and the transitions allowed between them.

Pure: no database. `core.outbox.queries` is the only code that changes a state, and a test
(tests/integration/test_outbox_transitions.py) runs each of its statements against rows in
every state and holds it to OUTBOX_TRANSITIONS.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class OutboxState(StrEnum):
    """The life of an outbox row (see core.outbox for the diagram)."""

    PENDING = "pending"  # committed, waiting for a relay (or for its retry time)
    PUBLISHED = "published"  # the broker accepted its message; no worker has finished it yet
    COMPLETED = "completed"  # a worker made its effect; final
    FAILED = "failed"  # the task gave up (a permanent error, or its retries ran out)
    DEAD = "dead"  # publishing gave up (attempts or re-publishes used up), or a poison row


class RunState(StrEnum):
    """A task id's record in task_runs: its effect is being made under a lease, or is done."""

    RUNNING = "running"
    DONE = "done"


ALL_OUTBOX_STATES: Final = tuple(OutboxState)
ALL_RUN_STATES: Final = tuple(RunState)

_S = OutboxState
OUTBOX_TRANSITIONS: Final[frozenset[tuple[OutboxState, OutboxState]]] = frozenset(
    {
        (_S.PENDING, _S.PUBLISHED),  # a relay published it
        # A publish failed (retried later), or a worker recorded a delivery's start on a row whose
        # publishing transaction had not committed yet.
        (_S.PENDING, _S.PENDING),
        # The broker refused it RELAY_MAX_ATTEMPTS times, or it is a poison row (kwargs that
        # cannot be decoded or are not an object, a task the contract does not know): dead at once.
        (_S.PENDING, _S.DEAD),
        (_S.PUBLISHED, _S.PUBLISHED),  # a worker recorded a delivery's start, or extended its lease
        (_S.PUBLISHED, _S.PENDING),  # the reconciler found evidence that its message is gone: publish again
        (_S.PUBLISHED, _S.DEAD),  # ... more than RELAY_MAX_REPUBLISHES times
        (_S.PUBLISHED, _S.FAILED),  # the task gave up
        # A worker finished the task (or the reconciler found its effect recorded in task_runs
        # while the row still said published). Also from pending, dead and failed: a message
        # published before the row went back to pending, or a redelivery after the row was given
        # up, still made its effect, and the row must say so.
        (_S.PUBLISHED, _S.COMPLETED),
        (_S.PENDING, _S.COMPLETED),
        (_S.DEAD, _S.COMPLETED),
        (_S.FAILED, _S.COMPLETED),
        (_S.PENDING, _S.FAILED),  # an earlier copy of the message failed for good
        (_S.DEAD, _S.PENDING),  # an operator replayed it
        (_S.FAILED, _S.PENDING),  # an operator replayed it
    }
)
"""Every (before, after) pair a statement may produce. Nothing leaves `completed`."""
