"""The relay daemon: publish committed outbox rows as Celery tasks, and track them to completion.

Run it with ``python -m relay``; see ``relay.__main__`` for the operator commands.
"""
