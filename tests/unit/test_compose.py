"""docker-compose.yml, Dockerfile, Procfile and .env.example keep their shape (no Docker engine runs here).

Each test pins one promise of the deployment: servers with health checks and a durable broker, migrations
before the service starts, one image and one environment for every process, and an .env.example that
lists every setting so it cannot fall behind core/settings.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from honcho.environ import parse_procfile
from jsonschema import Draft7Validator

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("migrate", "api", "relay", "celery_worker", "flower")
LONG_RUNNING = ("api", "relay", "celery_worker")
MONITORING = ("prometheus", "grafana")
# Each long-running service, the setting of its metrics port, and the Prometheus job that scrapes it.
METRICS = {"api": ("API_METRICS_PORT", "api"), "relay": ("RELAY_METRICS_PORT", "relay")}
METRICS["celery_worker"] = ("WORKER_METRICS_PORT", "worker")
WORKER_COMMAND = ["celery", "-A", "worker.celery_app", "worker", "--loglevel=info"]
# Variables .env.example lists for docker-compose.yml itself, which are no settings of the service.
COMPOSE_ONLY = {"POSTGRES_ADMIN_PASSWORD", "FLOWER_BASIC_AUTH"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _healthy(*names: str) -> dict[str, dict[str, str]]:
    return {name: {"condition": "service_healthy"} for name in names}


def test_every_service_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "redis", *APP_SERVICES, *MONITORING}


def test_postgres_has_a_health_check_and_a_volume(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(volume.endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])


def test_redis_is_durable_needs_a_password_and_has_a_health_check(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["command"][:2] == ["sh", "-c"]
    command = redis["command"][2].split()
    assert command[:2] == ["exec", "redis-server"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == '"$$REDIS_PASSWORD"'
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "REDISCLI_AUTH" in redis["healthcheck"]["test"][1]
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert "ports" not in redis


def test_no_password_has_a_default(services: dict[str, dict[str, Any]]) -> None:
    """Every password compose passes on is `${VAR:?message}`: compose refuses to start without it."""
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in ("POSTGRES_PASSWORD", "POSTGRES_ADMIN_PASSWORD", "REDIS_PASSWORD", "ADMIN_API_KEY"):
        uses = re.findall(r"\$\{" + variable + r"([^}]*)\}", text)
        assert uses, variable
        assert all(use.startswith(":?") for use in uses), (variable, uses)
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_ADMIN_PASSWORD:?")
    for line in _example_lines():
        if re.match(r"^(POSTGRES_PASSWORD|POSTGRES_ADMIN_PASSWORD|REDIS_PASSWORD|ADMIN_API_KEY)=", line):
            assert line.endswith("="), f".env.example ships a password: {line}"


def test_the_service_connects_as_its_own_role_and_only_migrations_as_the_owner(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in (*LONG_RUNNING, "flower"):
        assert services[name]["environment"]["POSTGRES_USER"] == "outbox_service", name
    assert services["migrate"]["environment"]["POSTGRES_USER"] == "postgres"
    postgres = services["postgres"]
    assert postgres["environment"]["SERVICE_DB_USER"] == "outbox_service"
    assert "./deploy/postgres-init:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    script = (ROOT / "deploy" / "postgres-init" / "10-service-role.sh").read_text()
    assert "NOSUPERUSER" in script
    assert "IN ROLE outbox_app" in script


def test_volumes_are_named_so_data_survives_a_recreate() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"postgres-data", "redis-data", "prometheus-data"} <= set(compose["volumes"])


def test_migrate_runs_once_after_postgres_is_healthy(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["depends_on"] == _healthy("postgres")
    assert migrate["restart"] == "no"


def test_the_service_starts_after_migrations_and_healthy_servers(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING:
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends_on["redis"] == {"condition": "service_healthy"}, name
        assert depends_on["postgres"] == {"condition": "service_healthy"}, name


def test_commands(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]["command"]
    assert api[:2] == ["uvicorn", "api.main:app"]
    assert api[api.index("--port") + 1] == "8000"
    assert api[api.index("--host") + 1] == "0.0.0.0"
    assert any(port.endswith(":8000") for port in services["api"]["ports"])
    assert services["relay"]["command"] == ["python", "-m", "relay"]
    assert services["celery_worker"]["command"] == WORKER_COMMAND


def test_every_app_process_shares_image_env_and_restart_policy(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert api["build"] == "."
    assert api["env_file"] == ".env"
    for name in APP_SERVICES:
        service = services[name]
        for key in ("image", "build", "env_file", "volumes"):
            assert service.get(key) == api.get(key), f"{name}.{key}"
        assert service["environment"]["POSTGRES_HOST"] == "postgres", name
        assert service["environment"]["REDIS_HOST"] == "redis", name
    for name in ("postgres", "redis", *LONG_RUNNING, "flower"):
        assert services[name]["restart"] == "unless-stopped", name


def test_compose_only_variables_are_used_by_compose() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in COMPOSE_ONLY:
        assert "${" + variable in text, variable


def test_flower_is_optional_authenticated_and_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    assert flower["profiles"] == ["monitoring"]
    assert flower["command"][:2] == ["sh", "-c"]
    script = flower["command"][2]
    assert 'test -n "$$FLOWER_BASIC_AUTH" ||' in script
    assert "exec celery -A worker.celery_app flower" in script
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert "profiles" not in services["celery_worker"]


def _default(value: str, variable: str) -> int:
    """The default of a `${VARIABLE:-default}` interpolation."""
    match = re.fullmatch(rf"\$\{{{variable}:-(\d+)\}}", value)
    assert match, f"{value!r} is not ${{{variable}:-<port>}}"
    return int(match.group(1))


def test_each_process_exposes_its_metrics_port_where_prometheus_scrapes(services: dict[str, dict[str, Any]]) -> None:
    prometheus = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    jobs = {
        job["job_name"]: job["dns_sd_configs"][0] for job in prometheus["scrape_configs"] if "dns_sd_configs" in job
    }
    for name, (variable, job) in METRICS.items():
        service = services[name]
        port = _default(service["environment"][variable], variable)
        assert [_default(exposed, variable) for exposed in service["expose"]] == [port], name
        assert port == Settings.model_fields[variable.lower()].default, f"{name}: compose and Settings disagree"
        assert (jobs[job]["names"], jobs[job]["port"]) == ([name], port), f"prometheus job {job}"
        assert not any(str(port) in published for published in service.get("ports", [])), "scaling would collide"


def test_prometheus_and_grafana_are_optional_and_provisioned_from_the_repository(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in MONITORING:
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert service["restart"] == "unless-stopped", name
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), f"{name} mounts {source}, which does not exist"
                assert volume.endswith(":ro"), f"{name} must not write into the repository"
    assert "/etc/prometheus/prometheus.yml" in " ".join(services["prometheus"]["command"])
    assert any(port.endswith(":9090") for port in services["prometheus"]["ports"])
    assert any(port.endswith(":3000") for port in services["grafana"]["ports"])


def _grafana_guard(services: dict[str, dict[str, Any]]) -> str:
    """The grafana entrypoint's shell script as the container runs it (Compose turns $$ into $)."""
    entrypoint = services["grafana"]["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    script: str = entrypoint[2].replace("$$", "$")
    assert script.endswith("exec /run.sh")
    return script.replace("exec /run.sh", "echo started")


def test_grafana_has_no_default_password_and_refuses_to_start_without_one(
    services: dict[str, dict[str, Any]],
) -> None:
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GF_SECURITY_ADMIN_PASSWORD:-}"
    script = _grafana_guard(services)
    refused = subprocess.run(["sh", "-c", script], env={}, capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert "set GF_SECURITY_ADMIN_PASSWORD" in refused.stderr
    started = subprocess.run(
        ["sh", "-c", script], env={"GF_SECURITY_ADMIN_PASSWORD": "s3cret"}, capture_output=True, text=True, check=False
    )
    assert (started.returncode, started.stdout.strip()) == (0, "started")


COMPOSE_SCHEMA = ROOT / "tests" / "unit" / "data" / "compose-spec.json"


def _schema_errors(compose: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft7Validator(schema).iter_errors(compose)]


def test_the_file_is_valid_compose(tmp_path: Path) -> None:
    """Checked against the Compose Specification's JSON schema (tests/unit/data), which needs no
    Docker; where a Compose binary exists, `config` checks it too, with .env.example as .env."""
    assert _schema_errors(yaml.safe_load((ROOT / "docker-compose.yml").read_text())) == []
    tool = _compose_command()
    if tool is None:
        return
    (tmp_path / "docker-compose.yml").write_text((ROOT / "docker-compose.yml").read_text())
    secrets = "POSTGRES_PASSWORD=a\nPOSTGRES_ADMIN_PASSWORD=b\nREDIS_PASSWORD=c\nADMIN_API_KEY=" + "d" * 32 + "\n"
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text() + secrets)
    result = subprocess.run(
        [*tool, "--profile", "monitoring", "config", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("service", "key", "value"),
    [("relay", "depends_on", {"migrate": {"condition": "service_finished"}}), ("api", "restart_policy", "always")],
)
def test_the_schema_check_catches_a_broken_file(service: str, key: str, value: object) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose["services"][service][key] = value
    assert _schema_errors(compose) != []


def _compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1), whichever works here, else None."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return command
    return None


def test_commands_name_modules_that_exist() -> None:
    for module in ("api.main", "relay.__main__", "worker.celery_app"):
        assert importlib.util.find_spec(module) is not None, module
    assert (ROOT / "alembic.ini").is_file()


def test_procfile_runs_what_compose_runs() -> None:
    processes = parse_procfile((ROOT / "Procfile").read_text()).processes
    assert set(processes) == {"api", "relay", "worker"}
    assert "uvicorn api.main:app" in processes["api"]
    assert processes["relay"].endswith("python -m relay")
    assert processes["worker"].endswith(" ".join(WORKER_COMMAND))
    # Crash-restart wrapper: honcho stops everything when one process exits (see devservers/keepalive.py).
    for name in ("relay", "worker"):
        assert "devservers.keepalive --" in processes[name], name


def test_image_is_slim_unprivileged_and_has_flower() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users, "the image must not run as root"
    assert users[-1] not in {"root", "0"}
    extras = set(re.findall(r'pip install[^\n]*"\.\[([\w,-]+)\]"', dockerfile)[0].split(","))
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "dev" not in extras, "the image carries no test tools"
    installed = [requirement for extra in extras for requirement in optional.get(extra, [])]
    assert any(requirement.startswith("flower") for requirement in installed), "the flower service needs flower"


def test_secrets_stay_out_of_the_image() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored
    assert not {"alembic.ini", "migrations", "README.md", "pyproject.toml"} & set(ignored)


def _example_lines() -> list[str]:
    return (ROOT / ".env.example").read_text().splitlines()


def test_env_example_names_every_setting() -> None:
    named = {match.group(1) for line in _example_lines() if (match := re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=", line))}
    expected = {(field.alias or name).upper() for name, field in Settings.model_fields.items()}
    assert expected - named == set(), "add these to .env.example"
    assert named - expected == COMPOSE_ONLY, "these are not settings (any more)"


def test_env_example_values_are_valid_and_the_defaults() -> None:
    example = Settings(_env_file=ROOT / ".env.example")
    defaults = Settings(_env_file=None)
    differing = {name for name in Settings.model_fields if getattr(example, name) != getattr(defaults, name)}
    assert differing == set()
