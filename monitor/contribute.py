"""The status page's "contribute a server" call: the exact command that joins this swarm for a model.

The model argument is the model's Hub repository when the operator configured one, or a checkpoint
folder this site knows (the demo's) whose name gives the model's DHT prefix; otherwise a placeholder
with an explicit `--dht-prefix`. Every word is shell-quoted: prefixes and peers may come from strangers.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable
from pathlib import Path

from monitor.targets import HF_URL

COMMAND = [".venv/bin/python", "manage.py", "runblockserver"]
PLACEHOLDER = "MODEL"
PREFIX_SUFFIXES = ("", "-hf", "-petals")  # what the model families append to a folder's or repository's name
MAX_COMMANDS = 5


@dataclasses.dataclass(frozen=True)
class Contribution:
    name: str  # the model's display name
    dht_prefix: str
    command: str
    needs_model: bool  # the command has a placeholder for the checkpoint


def model_argument(dht_prefix: str, repository: str | None, local_models: Iterable[Path]) -> str | None:
    """What `runblockserver` takes for this model, or None when this site cannot know it."""
    if repository and repository.startswith(HF_URL):
        repo_id = repository[len(HF_URL) :].strip("/")
        if repo_id.count("/") == 1:
            return repo_id
    for path in local_models:
        if any(dht_prefix == path.name + suffix for suffix in PREFIX_SUFFIXES):
            return str(path)
    return None


def command_for(
    dht_prefix: str, repository: str | None, local_models: Iterable[Path], initial_peers: list[str]
) -> tuple[str, bool]:
    """(the shell command, whether it holds a placeholder for the model)."""
    model = model_argument(dht_prefix, repository, local_models)
    words = [*COMMAND, model or PLACEHOLDER]
    if model is None:
        words += ["--dht-prefix", dht_prefix]
    if initial_peers:
        words += ["--initial-peers", *initial_peers]
    quoted = [word if word == PLACEHOLDER else shlex.quote(word) for word in words]
    return " ".join(quoted), model is None


def contributions(models: Iterable, local_models: list[Path], initial_peers: list[str]) -> list[Contribution]:
    """Commands for the configured models (`ModelStatus` rows), broken ones first: they need servers most."""
    official = sorted((m for m in models if m.official), key=lambda m: (m.healthy, m.position))
    result = []
    for status in official[:MAX_COMMANDS]:
        command, needs_model = command_for(status.dht_prefix, status.repository, local_models, initial_peers)
        result.append(Contribution(status.name, status.dht_prefix, command, needs_model))
    return result
