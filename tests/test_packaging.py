"""`pip install .` installs the engine alone (the `swarm` package, its demo checkpoints, two console scripts).

The wheel is built offline from a copy of the working tree (setuptools comes with torch and grpcio-tools) and
installed with `--target`, so the console scripts run the installed copy against this venv's torch and hivemind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SKIP_AT_ROOT = {".git", ".venv", "var", "staticfiles", "node_modules", ".pytest_cache", ".ruff_cache", "build"}
DJANGO_ONLY = {"--version", "--verbosity", "--settings", "--pythonpath", "--traceback", "--no-color", "--force-color",
               "--skip-checks"}  # fmt: skip
SCRIPTS = {"swarm-server": "swarm.cli.run_server:main", "swarm-dht": "swarm.cli.run_dht:main"}


def pip(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation", "--no-index", "--quiet"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree (building in place would leave build/ and *.egg-info behind)."""
    source = tmp_path_factory.mktemp("source") / "swarm"

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name == "__pycache__" or name.endswith(".egg-info")}
        return skipped | (SKIP_AT_ROOT & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, source, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    pip("wheel", ".", "-w", str(dist), cwd=source)
    (built,) = dist.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("target")
    pip("install", "--target", str(target), str(wheel), cwd=target)
    return target


def run_installed(installed: Path, script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """A console script of the installed copy, from a folder outside the repository, with nothing set."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(installed)}
    return subprocess.run(
        [str(installed / "bin" / script), *args],
        cwd=installed,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        **kwargs,
    )


def test_the_wheel_holds_the_engine_and_its_demo_models_but_not_the_site(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"swarm", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for model in ("demo_model", "demo_moe_model", "demo_draft_model"):
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert f"swarm/{model}/{file}" in names
    assert {"swarm/cli/run_server.py", "swarm/cli/run_dht.py", "swarm/server/server.py"} <= set(names)
    assert not [name for name in names if "__pycache__" in name]


def test_the_wheel_declares_the_console_scripts_and_engine_dependencies(wheel):
    archive = zipfile.ZipFile(wheel)
    info = next(name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt"))
    entry_points = archive.read(info).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
    metadata = archive.read(info.replace("entry_points.txt", "METADATA")).decode()
    requires = {re.split(r"[ ;<>=\[]", line.split(": ", 1)[1])[0].lower() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}  # fmt: skip
    assert {"torch", "transformers", "hivemind", "safetensors", "huggingface-hub", "tokenizers"} <= requires
    assert "django" not in requires


def test_pyproject_names_every_pinned_requirement():
    """requirements.txt pins what the tests run with; the package must ask for each of them (engine or `site`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["site"]
    names = {re.split(r"[ ;<>=\[]", line)[0].lower() for line in declared}
    transitive = {"psutil"}  # pinned only because accelerate pulls it in
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.split(r"[ ;<>=\[]", line)[0].lower()
            assert name in names or name in transitive, f"{name} is pinned in requirements.txt but not in pyproject"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_scripts_show_their_help(installed, script):
    result = run_installed(installed, script, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: {script}" in result.stdout
    assert "(default: /ip4/0.0.0.0/tcp/0)" in " ".join(result.stdout.split())
    assert "--verbosity" not in result.stdout and "--settings" not in result.stdout  # no Django
    assert script == "swarm-dht" or "announced speed in requests/s" in result.stdout  # the unit


def test_console_scripts_take_the_manage_py_flags(installed):
    """The same parser as `manage.py runblockserver`: the same options, the same refusals before networking."""
    from config.management.commands import runblockserver, rundht

    for script, module in (("swarm-server", runblockserver), ("swarm-dht", rundht)):
        django_parser = module.Command().create_parser("manage.py", module.__name__.rsplit(".", 1)[-1])
        django_flags = {flag for action in django_parser._actions for flag in action.option_strings if flag[1] == "-"}
        help_text = run_installed(installed, script, "--help").stdout
        script_flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", help_text))
        assert script_flags == django_flags - DJANGO_ONLY


def test_the_installed_server_reads_its_own_demo_model_and_refuses_bad_blocks(installed):
    demo = installed / "swarm" / "demo_model"
    result = run_installed(installed, "swarm-server", str(demo), "--new-swarm", "--block-indices", "4:12")
    assert result.returncode == 1
    assert "swarm-server: error: --block-indices 4:12 must lie within 0:8" in result.stderr
    assert "Traceback" not in result.stderr and "Server peer" not in result.stderr


def test_the_installed_server_needs_peers_or_a_new_swarm(installed):
    result = run_installed(installed, "swarm-server", str(installed / "swarm" / "demo_model"))
    assert result.returncode == 1
    assert "--initial-peers" in result.stderr and "--new-swarm" in result.stderr


def test_the_installed_bootstrap_peer_runs_and_stops(installed):
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(installed)}
    command = [str(installed / "bin" / "swarm-dht"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    process = subprocess.Popen(
        command, cwd=installed, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first = process.stdout.readline()  # blocks until the peer is up (or the script died: an empty line)
        assert re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+\n", first), first or process.stderr.read()
        process.terminate()
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
