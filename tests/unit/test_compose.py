"""The container files (docker-compose.yml, Dockerfile) agree with the code they run.

No Docker engine is needed: the files are read as text and YAML and checked against graft.config and
app/cli.py, so a misspelt setting or subcommand fails here rather than at `docker compose up`.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from graft.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
APP_SERVICES = ("migrate", "api", "worker")
GRAFT_VARIABLE = re.compile(r"\bGRAFT_[A-Z0-9_]+")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def cli_choices() -> list[str]:
    """The subcommands `python -m app.cli` accepts, read from its argparse `choices=[...]`."""
    source = (ROOT / "app" / "cli.py").read_text()
    match = re.search(r"choices=(\[[^\]]*\])", source)
    assert match, "app/cli.py no longer declares its subcommands with choices=[...]"
    choices = ast.literal_eval(match.group(1))
    assert choices == ["run", "prestart", "api", "worker"]
    return choices


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def interpolation_default(value: str) -> str:
    """`${VAR:-default}` -> `default`, as compose substitutes it when VAR is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """Target path -> named volume (or host path) for each mount of a service."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[target] = source
    return mounts


def test_compose_parses_and_names_every_service(services: dict[str, Any]) -> None:
    missing = SERVICES - set(services)
    assert not missing, f"docker-compose.yml lacks the services {sorted(missing)}"


def test_one_image_built_once_and_reused(services: dict[str, Any]) -> None:
    built = [name for name, service in services.items() if "build" in service]
    assert built == ["migrate"]
    for name in APP_SERVICES:
        assert services[name]["image"] == "graft:latest"


def test_migrate_is_a_one_shot_prestart(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert command_of(migrate) == ["python", "-m", "app.cli", "prestart"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_api_and_worker_wait_for_migrate_and_redis(services: dict[str, Any], name: str) -> None:
    depends_on = services[name]["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert depends_on["redis"]["condition"] == "service_healthy"


def test_dependencies_have_healthchecks(services: dict[str, Any]) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert "--appendonly" in command_of(services["redis"])
    assert "/data" in mounts_of(services["redis"])


def test_api_healthcheck_probes_readyz(services: dict[str, Any]) -> None:
    from app.health import router

    test = " ".join(services["api"]["healthcheck"]["test"])
    assert "http://localhost:8000/readyz" in test
    assert "/readyz" in {route.path for route in router.routes}
    assert "8000:8000" in services["api"]["ports"]
    assert environment_of(services["api"])["GRAFT_HOST"] == "0.0.0.0"


def test_worker_reserves_an_nvidia_gpu(services: dict[str, Any]) -> None:
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []) for device in devices
    )
    assert environment_of(worker)["GRAFT_WORKER_QUEUE"] == Settings.model_fields["worker_queue"].default


def test_api_and_worker_share_database_and_broker(services: dict[str, Any]) -> None:
    api, worker = environment_of(services["api"]), environment_of(services["worker"])
    for variable in ("GRAFT_DATABASE_URL", "GRAFT_BROKER_URL", "GRAFT_HOME", "GRAFT_BOOTSTRAP_API_KEY"):
        assert api[variable] == worker[variable] == environment_of(services["migrate"])[variable]

    database = urlsplit(interpolation_default(api["GRAFT_DATABASE_URL"]))
    assert database.scheme == "postgresql+psycopg"
    assert database.hostname == "postgres" and database.port == 5432
    postgres = environment_of(services["postgres"])
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == interpolation_default(postgres["POSTGRES_PASSWORD"])
    assert database.path == "/" + postgres["POSTGRES_DB"]

    broker = urlsplit(api["GRAFT_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379


def test_bootstrap_key_is_required(services: dict[str, Any]) -> None:
    value = environment_of(services["api"])["GRAFT_BOOTSTRAP_API_KEY"]
    assert value.startswith("${GRAFT_BOOTSTRAP_API_KEY:?"), "compose must refuse to start without a key"


def test_every_graft_variable_is_a_setting() -> None:
    """Each GRAFT_* name in compose (keys, interpolations, comments) and the Dockerfile is a Settings field."""
    fields = set(Settings.model_fields)
    prefix = Settings.model_config["env_prefix"]
    for path in (COMPOSE_FILE, DOCKERFILE):
        names = set(GRAFT_VARIABLE.findall(path.read_text()))
        assert names, f"{path.name} names no GRAFT_ variable"
        unknown = sorted(name for name in names if name.removeprefix(prefix).lower() not in fields)
        assert not unknown, f"{path.name} names settings that do not exist: {unknown}"


def test_data_volume_is_graft_home_in_every_app_service(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    sources = set()
    for name in APP_SERVICES:
        home = environment_of(services[name])["GRAFT_HOME"]
        mounts = mounts_of(services[name])
        assert home in mounts, f"{name} does not mount a volume at GRAFT_HOME ({home})"
        sources.add(mounts[home])
    assert len(sources) == 1, "api, worker and migrate must share one data volume"
    assert sources.pop() in compose["volumes"]


def test_commands_name_real_cli_subcommands(services: dict[str, Any]) -> None:
    choices = cli_choices()
    expected = {"migrate": "prestart", "api": "api", "worker": "worker"}
    for name, subcommand in expected.items():
        command = command_of(services[name])
        assert command[:3] == ["python", "-m", "app.cli"]
        assert command[3:] == [subcommand]
        assert subcommand in choices


def test_dockerfile_defaults() -> None:
    text = DOCKERFILE.read_text()
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert cmd, "the Dockerfile's CMD must use the exec (JSON) form"
    command = json.loads(cmd.group(1))
    assert command[:3] == ["python", "-m", "app.cli"] and command[3] in cli_choices()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_SPEC=torch==2\.13\.0$", text, re.MULTILINE)
    assert re.search(r"^ARG TORCH_INDEX_URL=$", text, re.MULTILINE)
    assert re.search(r"^USER graft$", text, re.MULTILINE)
    assert re.search(r"^VOLUME /data$", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 8000$", text, re.MULTILINE)
    for setting in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "GRAFT_HOME=/data"):
        assert re.search(rf"^\s*(ENV\s+)?{setting}\b", text, re.MULTILINE), setting
