"""The outbox: one owner for the `outbox` and `task_runs` tables.

- states.py: the states of a row and of a task run, and every transition allowed.
- queries.py: every statement on the two tables, one function each (asyncpg).
- notifier.py: the coalesced NOTIFY that wakes the relays at commit.

A row is written `pending` in its use case's transaction. A relay publishes it and marks it
`published`, or counts a failed attempt (still `pending`, retried later, `dead` when the
attempts are used up). A worker marks it `completed` when its effect is made, or `failed`
when the task gives up. The reconciler sends a `published` row whose message is gone back to
`pending` (`dead` after too many re-publishes). An operator replays `dead` and `failed` rows
to `pending`. Nothing leaves `completed`. The README's "Architecture" section draws it.

No other module spells SQL for these tables: the API, the relay, the worker, the operator
commands and the bench call these functions.
"""
