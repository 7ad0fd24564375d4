"""The one settings object, read from the environment."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Literal
from urllib.parse import quote, urlsplit

from limits import parse as parse_rate_limit
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core import money

_POSTGRES_SCHEMES = {"postgresql", "postgresql+asyncpg", "postgres", "postgresql+psycopg"}
_BROKER_SCHEMES = {"redis", "rediss", "amqp", "amqps", "pyamqp", "memory"}
_BACKEND_SCHEMES = {"redis", "rediss", "rpc", "cache+memory", "db+postgresql"}
_RATE_LIMIT_SCHEMES = {"redis", "rediss", "memory"}
MIN_ADMIN_KEY_LENGTH = 32
# RELAY_IDLE_TRANSACTION_TIMEOUT's default, in multiples of RELAY_PUBLISH_TIMEOUT: a healthy batch
# keeps its transaction open while it waits for the broker, up to one publish timeout.
IDLE_TRANSACTION_MULTIPLE = 3


def _scheme_of(url: str) -> str:
    return urlsplit(url).scheme


def reveal(value: SecretStr | str | None) -> str | None:
    """The plain text of a secret setting (model_copy(update=...) may have stored a plain str)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


def _check_scheme(variable: str, value: SecretStr | None, allowed: set[str]) -> SecretStr | None:
    # The message names the variable and the scheme only: the URL may carry a password.
    plain = reveal(value)
    if plain is not None and _scheme_of(plain) not in allowed:
        raise ValueError(f"{variable} must use one of the schemes {sorted(allowed)}, got {_scheme_of(plain)!r}")
    return value


class Settings(BaseSettings):
    """Every knob of the service. Explicit URLs win over the parts they are built from.

    Passwords, keys and the URLs that may carry them are SecretStr: they show as '**********'
    in the repr, and validation errors never echo an input value (hide_input_in_errors).
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    # PostgreSQL
    database_url: SecretStr | None = None
    postgres_host: str = "localhost"
    postgres_port: int = Field(5432, ge=1, le=65535)
    postgres_user: str = "postgres"
    postgres_password: SecretStr = SecretStr("")
    postgres_db: str = "postgres"
    db_pool_size: int = Field(20, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_pool_timeout: float = Field(2.0, gt=0)
    db_statement_timeout: float = Field(5.0, gt=0)
    db_lock_timeout: float = Field(2.0, gt=0)

    # Redis and Celery
    redis_host: str = "localhost"
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_db: int = Field(0, ge=0)
    redis_password: SecretStr | None = None
    celery_broker_url_override: SecretStr | None = Field(None, alias="CELERY_BROKER_URL")
    celery_result_backend_override: SecretStr | None = Field(None, alias="CELERY_RESULT_BACKEND")
    celery_task_queue: str = "celery"
    celery_task_time_limit: int = Field(60, ge=1)
    celery_task_soft_time_limit: int = Field(50, ge=1)
    celery_result_expires: int = Field(86_400, ge=1)
    celery_visibility_timeout: int = Field(3_600, ge=1)
    celery_worker_pool: Literal["asyncio", "threads", "prefork", "solo"] = "asyncio"
    celery_worker_concurrency: int = Field(1024, ge=1)
    celery_task_events: bool = False
    worker_db_pool_size: int = Field(16, ge=1)
    worker_batch_window: float = Field(0.01, ge=0, le=1)
    celery_task_max_retries: int = Field(5, ge=0)
    celery_retry_backoff_max: int = Field(60, ge=1)

    # Tasks
    email_send_delay: float = Field(2.0, ge=0)
    audit_write_delay: float = Field(1.0, ge=0)
    smtp_host: str | None = None
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_from: str = "transfers@example.com"
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_timeout: float = Field(10.0, gt=0)

    # API
    api_port: int = Field(8000, ge=1, le=65535)
    max_transfer_amount: Decimal = Decimal("1000000.00")
    outbox_notify_interval: float = Field(0.01, ge=0)
    admin_api_key: SecretStr | None = None
    auth_cache_seconds: float = Field(5.0, ge=0)
    idempotency_key_retention: timedelta = Field(timedelta(hours=24), gt=timedelta(0))
    rate_limit: str = "100/second"
    rate_limit_storage_url: SecretStr | None = None
    max_request_body_bytes: int = Field(65_536, ge=1_024)

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

    # Metrics: the port each process serves Prometheus's /metrics on (0: no metrics at all)
    api_metrics_port: int = Field(9100, ge=0, le=65535)
    relay_metrics_port: int = Field(9101, ge=0, le=65535)
    # How often the relay samples outbox_rows and the oldest ages (the queries of `relay status`).
    relay_metrics_interval: float = Field(15.0, gt=0)
    worker_metrics_port: int = Field(9102, ge=0, le=65535)

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("database_url")
    @classmethod
    def _known_database_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme("DATABASE_URL", value, _POSTGRES_SCHEMES)

    @field_validator("celery_broker_url_override")
    @classmethod
    def _known_broker_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme("CELERY_BROKER_URL", value, _BROKER_SCHEMES)

    @field_validator("celery_result_backend_override")
    @classmethod
    def _known_backend_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme("CELERY_RESULT_BACKEND", value, _BACKEND_SCHEMES)

    @field_validator("rate_limit_storage_url")
    @classmethod
    def _known_rate_limit_storage(cls, value: SecretStr | None) -> SecretStr | None:
        return _check_scheme("RATE_LIMIT_STORAGE_URL", value, _RATE_LIMIT_SCHEMES)

    @field_validator("max_transfer_amount", mode="before")
    @classmethod
    def _exact_maximum(cls, value: object) -> Decimal:
        # The same exact form as an amount on the wire, and within what a balance column holds.
        try:
            maximum = money.parse_amount(str(value) if isinstance(value, int | Decimal) else value)
        except ValueError as exc:
            raise ValueError(f"MAX_TRANSFER_AMOUNT: {exc}") from None
        if maximum <= 0 or maximum > money.LARGEST_BALANCE:
            raise ValueError(f"MAX_TRANSFER_AMOUNT must be above 0 and at most {money.LARGEST_BALANCE}")
        return maximum

    @field_validator("idempotency_key_retention", mode="before")
    @classmethod
    def _seconds_or_iso(cls, value: object) -> object:
        # A plain number is seconds ("86400"); anything else goes to pydantic (ISO 8601: "P1D").
        if isinstance(value, str) and value.replace(".", "", 1).isdigit():
            return float(value)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        try:
            parse_rate_limit(value)
        except ValueError:
            raise ValueError(
                "RATE_LIMIT must be in the limits library's notation, e.g. '100/second' or '1000 per minute'"
            ) from None
        return value

    @field_validator("admin_api_key")
    @classmethod
    def _long_enough_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(f"ADMIN_API_KEY must be at least {MIN_ADMIN_KEY_LENGTH} characters (random)")
        return value

    @model_validator(mode="after")
    def _metrics_port_is_not_the_api_port(self) -> Settings:
        if self.api_metrics_port and self.api_metrics_port == self.api_port:
            raise ValueError(f"API_METRICS_PORT must differ from API_PORT ({self.api_port}); 0 turns metrics off")
        return self

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
        explicit = reveal(self.database_url)
        if explicit:
            rest = explicit.split("://", 1)[1]
            return f"postgresql+asyncpg://{rest}"
        auth = quote(self.postgres_user, safe="")
        password = reveal(self.postgres_password)
        if password:
            auth += ":" + quote(password, safe="")
        return f"postgresql+asyncpg://{auth}@{self.postgres_host}:{self.postgres_port}/{self.postgres_db}"

    @property
    def libpq_database_url(self) -> str:
        """The same database as a plain postgresql:// URL (for asyncpg.connect and tools)."""
        return self.async_database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

    @property
    def redis_url(self) -> str:
        password = reveal(self.redis_password)
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def celery_broker_url(self) -> str:
        return reveal(self.celery_broker_url_override) or self.redis_url

    @property
    def celery_result_backend(self) -> str:
        return reveal(self.celery_result_backend_override) or self.redis_url

    @property
    def rate_limit_storage(self) -> str:
        """Where the API processes share their rate-limit counters (a limits storage URI).

        RATE_LIMIT_STORAGE_URL if set; else the broker's Redis when the broker is Redis; else
        the Redis of the REDIS_* parts.
        """
        explicit = reveal(self.rate_limit_storage_url)
        if explicit:
            return explicit
        broker = self.celery_broker_url
        return broker if _scheme_of(broker) in {"redis", "rediss"} else self.redis_url

    @property
    def admin_key(self) -> str | None:
        """The operator's key in plain text, for the one comparison that needs it."""
        return reveal(self.admin_api_key)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once. Raises pydantic.ValidationError naming the bad variable."""
    return Settings()
