"""docker-compose.yml describes the full stack: checked with `docker compose config` where the client
can, and always by reading the YAML (services, commands, ports, volumes, the GPU reservation)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, unavailable

SERVICES = {"redis", "postgres", "migrate", "web", "worker", "beat", "bootstrap", "blockserver"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def command(service: dict) -> str:
    value = service.get("command", "")
    return " ".join(value) if isinstance(value, list) else value


def test_services_and_their_commands(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    assert "daphne" in command(services["web"]) and "config.asgi:application" in command(services["web"])
    assert "8000:8000" in services["web"]["ports"]
    assert "celery -A config worker" in command(services["worker"])
    assert "celery -A config beat" in command(services["beat"])
    assert "migrate" in command(services["migrate"])
    bootstrap = command(services["bootstrap"])
    assert "rundht" in bootstrap and "--identity-path /var/lib/swarm/" in bootstrap  # identity on a volume
    assert "31337:31337" in services["bootstrap"]["ports"]
    assert "runblockserver" in command(services["blockserver"])


def test_block_server_reserves_a_gpu_and_caches_models(compose):
    server = compose["services"]["blockserver"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
    assert any(volume.startswith("model-cache:") for volume in server["volumes"])


def test_app_services_use_redis_postgres_and_the_env_file(compose):
    for name in ("web", "worker", "beat", "migrate", "blockserver"):
        service = compose["services"][name]
        assert service["env_file"] == ".env"
        assert service["environment"]["REDIS_URL"].startswith("redis://redis:")
        assert service["environment"]["DATABASE_URL"].startswith("postgres://")
        assert "SWARM_INITIAL_PEERS_FILE" in service["environment"]


def test_dependencies_and_volumes_exist(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith(("/", ".")) or source in compose["volumes"], f"{name}: {volume}"
    assert {"postgres-data", "model-cache"} <= set(compose["volumes"])


def test_env_example_names_the_required_settings():
    example = (ROOT / ".env.example").read_text()
    for name in ("SECRET_KEY=", "ALLOWED_HOSTS=", "POSTGRES_PASSWORD=", "BLOCK_SERVER_MODEL="):
        assert name in example


def compose_command() -> list[str] | None:
    """The compose client here: docker's plugin (`docker compose`) or Debian's `docker-compose` (1.29),
    both of which check a file without a daemon."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_accepts_it(tmp_path):
    compose = compose_command()
    if compose is None:
        unavailable("no docker compose client is installed here (.ci/run installs Debian's docker-compose)")
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    compose_file = str(ROOT / "docker-compose.yml")
    result = subprocess.run(
        [*compose, "-f", compose_file, "--project-directory", str(tmp_path), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
