"""docker-compose.yml describes the full stack: checked with `docker compose config` (which also
resolves the public address and ports from .env) and by reading the YAML (services, commands,
volumes, the GPU reservation); the web port on loopback behind exactly one trusted proxy; the
health check against a real daphne with a real ALLOWED_HOSTS; the image's static files; the client
address behind a proxy; and the cache and limits of is_reachable's probes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from config.proxy import TrustedProxyHeaders, client_address, parse_networks
from config.throttle import ProbeLimiter, TooManyProbes
from swarm.local_swarm import SwarmProcess
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
    assert any(port.endswith(":8000:8000") for port in services["web"]["ports"])
    assert "celery -A config worker" in command(services["worker"])
    assert "celery -A config beat" in command(services["beat"])
    assert "migrate" in command(services["migrate"])
    bootstrap = command(services["bootstrap"])
    assert "rundht" in bootstrap and "--identity-path /var/lib/swarm/" in bootstrap  # identity on a volume
    assert "runblockserver" in command(services["blockserver"])
    assert "--proxy-headers" not in command(services["web"])  # daphne's believes anyone: config/proxy.py decides


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
    for name in ("SECRET_KEY=", "ALLOWED_HOSTS=", "POSTGRES_PASSWORD=", "BLOCK_SERVER_MODEL=", "SWARM_PUBLIC_HOST="):
        assert name in example


def compose_command() -> list[str] | None:
    """The compose client here: docker's plugin (`docker compose`) or Debian's `docker-compose` (1.29),
    both of which check a file without a daemon."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def compose_config(tmp_path, env_text: str, *extra: str) -> subprocess.CompletedProcess:
    """`docker compose config` of our file with this .env (the client reads it for `${...}`)."""
    compose = compose_command()
    if compose is None:
        unavailable("no docker compose client is installed here (.ci/run installs Debian's docker-compose)")
    (tmp_path / ".env").write_text(env_text)
    compose_file = str(ROOT / "docker-compose.yml")
    return subprocess.run(
        [*compose, "-f", compose_file, "--project-directory", str(tmp_path), "config", *extra],
        capture_output=True,
        text=True,
    )


def test_docker_compose_config_accepts_it(tmp_path):
    result = compose_config(tmp_path, (ROOT / ".env.example").read_text(), "-q")
    assert result.returncode == 0, result.stderr


def published(service: dict) -> set[tuple[str, int]]:
    """(published, target) pairs, whatever syntax the client prints them in."""
    pairs = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((str(port["published"]), int(port["target"])))
        else:
            outside, inside = str(port).split("/")[0].rsplit(":", 2)[-2:]
            pairs.add((outside, int(inside)))
    return pairs


def test_public_address_and_fixed_ports_come_from_the_environment(tmp_path):
    env = (ROOT / ".env.example").read_text()
    env += "\nSWARM_PUBLIC_HOST=198.51.100.7\nSWARM_BOOTSTRAP_PORT=4001\nBLOCK_SERVER_PORT=4002\n"
    result = compose_config(tmp_path, env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]

    bootstrap, server = services["bootstrap"], services["blockserver"]
    assert published(bootstrap) == {("4001", 4001)} and published(server) == {("4002", 4002)}
    assert "--host-maddrs /ip4/0.0.0.0/tcp/4001 --announce-maddrs /ip4/198.51.100.7/tcp/4001" in command(bootstrap)
    assert "--host-maddrs /ip4/0.0.0.0/tcp/4002 --announce-maddrs /ip4/198.51.100.7/tcp/4002" in command(server)
    for name, service in services.items():
        assert "/tcp/0" not in command(service), f"{name} listens on a random port"


def resolved(tmp_path, extra_env: str = "") -> dict:
    result = compose_config(tmp_path, (ROOT / ".env.example").read_text() + extra_env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def host_ips(service: dict) -> set[str]:
    """The host addresses a service's ports are published on (0.0.0.0: every one)."""
    ips = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ips.add(port.get("host_ip") or "0.0.0.0")
        else:
            parts = str(port).split("/")[0].split(":")
            ips.add(":".join(parts[:-2]) or "0.0.0.0")
    return ips


def test_the_site_is_published_on_loopback_and_trusts_exactly_the_proxys_address(tmp_path):
    config = resolved(tmp_path)
    web = config["services"]["web"]
    assert host_ips(web) == {"127.0.0.1"} and published(web) == {("8000", 8000)}
    # A proxy on this host reaching 127.0.0.1:8000 arrives through the project network's gateway:
    # that one address is trusted, not a network every container on the host shares.
    gateway = config["networks"]["default"]["ipam"]["config"][0]["gateway"]
    trusted = parse_networks(web["environment"]["TRUSTED_PROXIES"].split())
    assert [str(network) for network in trusted] == [f"{gateway}/32"]

    # Without TRUSTED_PROXIES in .env the default is the same; WEB_BIND opens the port on purpose.
    env = "\n".join(
        line for line in (ROOT / ".env.example").read_text().splitlines() if not line.startswith("TRUSTED_PROXIES=")
    )
    (tmp_path / "bare").mkdir()
    result = compose_config(tmp_path / "bare", env + "\nWEB_BIND=0.0.0.0\n")
    assert result.returncode == 0, result.stderr
    web = yaml.safe_load(result.stdout)["services"]["web"]
    assert web["environment"]["TRUSTED_PROXIES"] == gateway and host_ips(web) == {"0.0.0.0"}


def test_the_health_check_passes_with_a_real_allowed_hosts(tmp_path):
    """The web service's health check, run against daphne with the web service's settings from
    .env.example (ALLOWED_HOSTS=swarm.example.org, SECURE_PROXY=1, DEBUG off); only the services
    (PostgreSQL, Redis) and the port differ."""
    web = resolved(tmp_path)["services"]["web"]
    env = {key: str(value) for key, value in web["environment"].items()}
    assert env["ALLOWED_HOSTS"] == "swarm.example.org" and env["SECURE_PROXY"] == "1" and "DEBUG" not in env
    for name in ("DATABASE_URL", "REDIS_URL", "SWARM_INITIAL_PEERS_FILE"):
        env.pop(name)
    env.update(VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="config.settings", PYTHONPATH=str(ROOT), DEBUG="")
    daphne = str(Path(sys.executable).parent / "daphne")
    argv = [daphne, "-e", "tcp:port=0:interface=127.0.0.1", "config.asgi:application"]
    server = SwarmProcess("daphne", argv, env, tmp_path / "daphne.log")
    try:
        line = server.wait_for_line(lambda line: "Listening on TCP address" in line, timeout=120)
        port = line.rsplit(":", 1)[1].strip()
        kind, program, *args = web["healthcheck"]["test"]
        assert kind == "CMD" and program == "python"
        args = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in args]
        check = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        # The site itself still refuses that Host: only the health check is exempt.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/state", timeout=30)
        assert refused.value.code == 400
    finally:
        server.stop(timeout=15)


def test_compose_refuses_to_run_without_a_public_address(tmp_path):
    env = "\n".join(
        line for line in (ROOT / ".env.example").read_text().splitlines() if not line.startswith("SWARM_PUBLIC_HOST=")
    )
    result = compose_config(tmp_path, env, "-q")
    assert result.returncode != 0 and "set SWARM_PUBLIC_HOST to this machine's public IP" in result.stderr


def test_the_image_builds_the_static_manifest_without_debug(tmp_path):
    dockerfile = (ROOT / "Dockerfile").read_text()
    collect = next(line for line in dockerfile.splitlines() if "collectstatic" in line)
    assert "DEBUG" not in collect, collect
    env = {**os.environ, "SECRET_KEY": "collectstatic-only", "STATIC_ROOT": str(tmp_path / "static")}
    env["VAR_DIR"] = str(tmp_path / "var")
    env.pop("DEBUG", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    manifest = json.loads((tmp_path / "static" / "staticfiles.json").read_text())
    assert "playground/chat.js" in manifest["paths"] and "js/format.js" in manifest["paths"]


# ----- behind a reverse proxy -----


def test_x_forwarded_for_is_believed_only_from_trusted_proxies():
    networks = parse_networks(["172.16.0.0/12", "10.0.0.5"])
    assert client_address("203.0.113.9", "1.2.3.4", networks) == "203.0.113.9"  # not a proxy: ignored
    assert client_address("172.18.0.1", "198.51.100.20", networks) == "198.51.100.20"
    # A client's own X-Forwarded-For comes first; the proxies append what they saw: the right-most
    # address that is not one of our proxies is the client.
    assert client_address("172.18.0.1", "6.6.6.6, 198.51.100.20, 10.0.0.5", networks) == "198.51.100.20"
    assert client_address("172.18.0.1", "garbage", networks) == "172.18.0.1"
    assert client_address("172.18.0.1", None, networks) == "172.18.0.1"
    with pytest.raises(ValueError, match="'nonsense' is not an IP address"):
        parse_networks(["nonsense"])


def test_the_middleware_gives_apps_the_clients_address():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["client"])

    middleware = TrustedProxyHeaders(app, trusted=["127.0.0.1"])
    headers = [(b"x-forwarded-for", b"198.51.100.20")]
    for kind, client in [("http", ("127.0.0.1", 5000)), ("websocket", ("127.0.0.1", 5001)), ("http", ("8.8.8.8", 1))]:
        asyncio.run(middleware({"type": kind, "client": client, "headers": headers}, None, None))
    assert seen == [("198.51.100.20", 5000), ("198.51.100.20", 5001), ("8.8.8.8", 1)]


# ----- is_reachable's probes -----


def test_reachability_probes_are_cached_and_rate_limited():
    async def scenario():
        limiter = ProbeLimiter(ttl=60, per_client=3, window=60, concurrency=2)
        release = asyncio.Event()

        async def probe():
            await release.wait()
            return "reachable"

        # Concurrent askers for one peer share one probe; a cached answer costs nothing.
        first = [asyncio.create_task(limiter.run("peer-a", "client-1", probe)) for _ in range(5)]
        await asyncio.sleep(0)
        second = asyncio.create_task(limiter.run("peer-b", "client-1", probe))
        await asyncio.sleep(0)
        with pytest.raises(TooManyProbes, match="too many reachability checks are running"):
            await limiter.run("peer-c", "client-2", probe)  # two probes run already
        release.set()
        answers = await asyncio.gather(*first, second)
        assert answers == ["reachable"] * 6 and limiter.probes == 2
        assert await limiter.run("peer-a", "client-9", probe) == "reachable" and limiter.probes == 2

        assert await limiter.run("peer-d", "client-1", probe) == "reachable"  # client-1's third probe
        with pytest.raises(TooManyProbes, match="at most 3 checks per 60 s"):
            await limiter.run("peer-e", "client-1", probe)
        assert await limiter.run("peer-e", "client-2", probe) == "reachable"  # others are not limited by it

    asyncio.run(scenario())
