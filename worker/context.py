"""What a task needs besides its arguments: the settings and the process's database."""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import Settings
from worker.db import WorkerDatabase


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    database: WorkerDatabase

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        return cls(settings, WorkerDatabase(settings))
