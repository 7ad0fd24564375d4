"""Structured logging, configured once per process."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from core.settings import Settings
from core.telemetry import TraceContextFilter

# Extra fields that follow one transfer across the API, the relay and the worker. `trace_id` and
# `span_id` are added by TraceContextFilter whenever a span is current.
CONTEXT_FIELDS = ("trace_id", "span_id", "transaction_id", "outbox_id", "task_id", "task_name", "event")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self._component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "component": self._component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def describe(exc: BaseException) -> str:
    """An error in one line, for logs and stored error texts: its type, then its message if any."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class TextFormatter(logging.Formatter):
    """One readable line, ending with the trace id when the line was logged inside a trace."""

    def __init__(self, component: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # before the traceback, if any
        line = super().formatMessage(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} trace_id={trace_id}" if trace_id else line


def configure_logging(settings: Settings, component: str) -> None:
    """Send the process's logs to stderr, one JSON object a line unless LOG_JSON=false.

    Every line logged inside a span carries its `trace_id` (and `span_id` in JSON).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter(component) if settings.log_json else TextFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
