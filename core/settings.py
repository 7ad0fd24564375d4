"""The one settings object, read from the environment."""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_POSTGRES_SCHEMES = {"postgresql", "postgresql+asyncpg", "postgres", "postgresql+psycopg"}
_BROKER_SCHEMES = {"redis", "rediss", "amqp", "amqps", "pyamqp", "memory"}
_BACKEND_SCHEMES = {"redis", "rediss", "rpc", "cache+memory", "db+postgresql"}
# RELAY_IDLE_TRANSACTION_TIMEOUT's default, in multiples of RELAY_PUBLISH_TIMEOUT: a healthy batch
# keeps its transaction open while it waits for the broker, up to one publish timeout.
IDLE_TRANSACTION_MULTIPLE = 3


def _scheme_of(url: str) -> str:
    return urlsplit(url).scheme


class Settings(BaseSettings):
    """Every knob of the service. Explicit URLs win over the parts they are built from."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False, populate_by_name=True)

    # PostgreSQL
    database_url: str | None = None
    postgres_host: str = "localhost"
    postgres_port: int = Field(5432, ge=1, le=65535)
    postgres_user: str = "postgres"
    postgres_password: str = ""
    postgres_db: str = "postgres"
    db_pool_size: int = Field(20, ge=1)
    db_max_overflow: int = Field(10, ge=0)

    # Redis and Celery
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_db: int = Field(0, ge=0)
    redis_password: str | None = None
    celery_broker_url_override: str | None = Field(None, alias="CELERY_BROKER_URL")
    celery_result_backend_override: str | None = Field(None, alias="CELERY_RESULT_BACKEND")
    celery_task_queue: str = "celery"
    celery_task_time_limit: int = Field(60, ge=1)
    celery_task_soft_time_limit: int = Field(50, ge=1)
    celery_result_expires: int = Field(86_400, ge=1)
    celery_visibility_timeout: int = Field(3_600, ge=1)
    celery_worker_pool: Literal["threads", "prefork", "solo"] = "threads"
    celery_worker_concurrency: int = Field(64, ge=1)
    celery_task_max_retries: int = Field(5, ge=0)
    celery_retry_backoff_max: int = Field(60, ge=1)

    # Tasks
    email_send_delay: float = Field(2.0, ge=0)
    audit_write_delay: float = Field(1.0, ge=0)
    smtp_host: str | None = None
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_from: str = "transfers@example.com"
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_timeout: float = Field(10.0, gt=0)

    # API
    api_port: int = Field(8000, ge=1, le=65535)
    max_transfer_amount: Decimal = Field(Decimal("1000000.00"), gt=0)
    outbox_notify_interval: float = Field(0.01, ge=0)

    # Relay
    relay_batch_size: int = Field(500, ge=1, le=10_000)
    relay_poll_interval: float = Field(1.0, gt=0)
    relay_linger: float = Field(0.2, ge=0)
    relay_busy_poll: float = Field(0.001, ge=0)
    relay_backoff_base: float = Field(1.0, gt=0)
    relay_backoff_max: float = Field(300.0, gt=0)
    relay_max_attempts: int = Field(10, ge=1)
    relay_publish_timeout: float = Field(5.0, gt=0)
    relay_fast_publish: bool = True
    relay_completion_deadline: float = Field(600.0, gt=0)
    relay_reconcile_interval: float = Field(30.0, gt=0)
    relay_max_republishes: int = Field(5, ge=0)
    # Not set: IDLE_TRANSACTION_MULTIPLE x RELAY_PUBLISH_TIMEOUT (filled in by the validator below).
    relay_idle_transaction_timeout: float | None = Field(None, gt=0)

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("database_url")
    @classmethod
    def _known_database_scheme(cls, value: str | None) -> str | None:
        if value is not None and _scheme_of(value) not in _POSTGRES_SCHEMES:
            raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got scheme {_scheme_of(value)!r}")
        return value

    @field_validator("celery_broker_url_override")
    @classmethod
    def _known_broker_scheme(cls, value: str | None) -> str | None:
        if value is not None and _scheme_of(value) not in _BROKER_SCHEMES:
            raise ValueError(f"CELERY_BROKER_URL has unknown scheme {_scheme_of(value)!r}")
        return value

    @field_validator("celery_result_backend_override")
    @classmethod
    def _known_backend_scheme(cls, value: str | None) -> str | None:
        if value is not None and _scheme_of(value) not in _BACKEND_SCHEMES:
            raise ValueError(f"CELERY_RESULT_BACKEND has unknown scheme {_scheme_of(value)!r}")
        return value

    @model_validator(mode="after")
    def _idle_transaction_timeout_above_publish_timeout(self) -> Settings:
        publish = self.relay_publish_timeout
        if self.relay_idle_transaction_timeout is None:
            self.relay_idle_transaction_timeout = IDLE_TRANSACTION_MULTIPLE * publish
        elif self.relay_idle_transaction_timeout <= publish:
            raise ValueError(
                f"RELAY_IDLE_TRANSACTION_TIMEOUT ({self.relay_idle_transaction_timeout}) must be longer than "
                f"RELAY_PUBLISH_TIMEOUT ({publish}): a batch's transaction stays open while it publishes"
            )
        return self

    @property
    def relay_idle_transaction_timeout_s(self) -> float:
        """RELAY_IDLE_TRANSACTION_TIMEOUT in seconds, its default applied."""
        return self.relay_idle_transaction_timeout or IDLE_TRANSACTION_MULTIPLE * self.relay_publish_timeout

    @property
    def async_database_url(self) -> str:
        """The PostgreSQL URL with the asyncpg driver, whichever form it was given in."""
        if self.database_url:
            rest = self.database_url.split("://", 1)[1]
            return f"postgresql+asyncpg://{rest}"
        auth = quote(self.postgres_user, safe="")
        if self.postgres_password:
            auth += ":" + quote(self.postgres_password, safe="")
        return f"postgresql+asyncpg://{auth}@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"

    @property
    def libpq_database_url(self) -> str:
        """The same database as a plain postgresql:// URL (for asyncpg.connect and tools)."""
        return self.async_database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    @property
    def redis_url(self) -> str:
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def celery_broker_url(self) -> str:
        return self.celery_broker_url_override or self.redis_url

    @property
    def celery_result_backend(self) -> str:
        return self.celery_result_backend_override or self.redis_url


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once. Raises pydantic.ValidationError naming the bad variable."""
    return Settings()
