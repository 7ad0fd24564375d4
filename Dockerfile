# One image for every role of the service: api, relay, celery_worker, migrate, flower (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The service runs as an unprivileged user; Celery warns (and some options refuse) when run as root.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app

# Dependencies first, from pyproject.toml alone, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p core api relay worker migrations \
    && pip install ".[monitoring]" \
    && pip uninstall --yes outbox-transfers \
    && rm -rf build *.egg-info

# Then the code itself. alembic.ini and migrations/ stay in /app: `alembic upgrade head` runs from here.
COPY . .
RUN pip install --no-deps ".[monitoring]" && rm -rf build *.egg-info

USER app
# The API, Flower, and the metrics ports of the API, the relay and the worker (API_METRICS_PORT...).
EXPOSE 8000 5555 9100 9101 9102
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
