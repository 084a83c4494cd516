"""Which models a crawl reads: the configured ones plus a bounded number found in `_petals.models`.

Plain Python (no Django), so the crawl can run anywhere; `monitor.conf` feeds it the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from swarm.data_structures import ModelInfo
from swarm.names import is_private_prefix, is_valid_dht_prefix

HF_URL = "https://huggingface.co/"
# A Hugging Face model page, as servers write it into the model index (PROTOCOL.md): owner and name are
# Hub repository ids (letters, digits, `-`, `_`, `.`; at most 96 characters); no query, fragment or sub-page.
HF_MODEL_URL = re.compile(r"https://huggingface\.co/([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})/?", re.ASCII)


def salted_key(salt: bytes, text: str) -> bytes:
    """A per-crawl pseudo-random rank (a keyed hash): with a secret salt, nobody can pick a peer id or a
    model prefix that sorts first, and a new salt each crawl rotates who comes first."""
    return hashlib.blake2b(text.encode(), key=salt[:64], digest_size=8).digest()


def hf_model_url(repository: str | None) -> str | None:
    """The index's `repository` when it is a Hugging Face model URL (normalized), else None."""
    match = HF_MODEL_URL.fullmatch(repository or "")
    if match is None or any(".." in part or part.endswith(".") for part in match.groups()):
        return None
    return HF_URL + "/".join(match.groups())


@dataclasses.dataclass(frozen=True)
class ModelTarget:
    dht_prefix: str
    num_blocks: int
    name: str
    repository: str | None = None  # an https URL, or None
    official: bool = True  # configured by the operator (False: found in the DHT's model index)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelTarget:
        return cls(**data)


def repository_url(repository: str | None) -> str | None:
    """`owner/name` → its Hugging Face URL; URLs are kept only when they are plain https links."""
    if not repository:
        return None
    if "://" not in repository:
        return HF_URL + repository.strip("/")
    return repository if urlparse(repository).scheme == "https" else None


def name_from_repository(repository: str | None) -> str | None:
    if not repository:
        return None
    path = urlparse(repository).path.strip("/")
    return path or None


def parse_models_setting(value: Any) -> list[ModelTarget]:
    """`MONITOR_MODELS`: a list of dicts, JSON of one, or compact `prefix:num_blocks[:repository[:name]]` entries
    separated by `;`. Raises ValueError with a message naming the bad entry."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        entries = (
            json.loads(text)
            if text.startswith("[")
            else [_compact_entry(item) for item in text.split(";") if item.strip()]
        )
    else:
        entries = list(value or [])
    targets = [_target_from_dict(entry) for entry in entries]
    prefixes = [target.dht_prefix for target in targets]
    if len(set(prefixes)) != len(prefixes):
        raise ValueError("MONITOR_MODELS lists a dht_prefix more than once")
    return targets


def _compact_entry(item: str) -> dict[str, Any]:
    parts = [part.strip() for part in item.strip().split(":", 3)]
    if len(parts) < 2:
        raise ValueError(f"MONITOR_MODELS entry {item.strip()!r} is not prefix:num_blocks[:repository[:name]]")
    entry: dict[str, Any] = {"dht_prefix": parts[0], "num_blocks": parts[1]}
    if len(parts) > 2 and parts[2]:
        entry["repository"] = parts[2]
    if len(parts) > 3 and parts[3]:
        entry["name"] = parts[3]
    return entry


def _target_from_dict(entry: Any) -> ModelTarget:
    if not isinstance(entry, dict):
        raise ValueError(f"MONITOR_MODELS entry {entry!r} must be an object")
    prefix = entry.get("dht_prefix")
    if not isinstance(prefix, str) or not is_valid_dht_prefix(prefix):
        raise ValueError(f"MONITOR_MODELS entry {entry!r}: dht_prefix must be a valid DHT prefix")
    try:
        num_blocks = int(entry.get("num_blocks"))
    except (TypeError, ValueError):
        num_blocks = 0
    if num_blocks <= 0:
        raise ValueError(f"MONITOR_MODELS entry {entry!r}: num_blocks must be a positive integer")
    repository = repository_url(entry.get("repository"))
    name = entry.get("name") or name_from_repository(repository) or prefix
    return ModelTarget(dht_prefix=prefix, num_blocks=num_blocks, name=str(name), repository=repository, official=True)


def choose_targets(
    configured: list[ModelTarget],
    index: dict[str, ModelInfo],
    *,
    max_custom_models: int,
    max_num_blocks: int,
    verified: Mapping[str, int] | None = None,
    salt: bytes = b"",
) -> tuple[list[ModelTarget], int]:
    """Configured models (always), then indexed ones to crawl; returns (targets, indexed models skipped).

    Anyone can add to the index, so an indexed model is skipped when its prefix or size is absurd or when
    it names no Hugging Face model (`hf_model_url`). The rest are ranked by how many servers earlier crawls
    verified for them (`verified`, by prefix: a model real servers serve is never pushed out by strangers'
    entries), then in the crawl's salted order (every new model gets its turn; nobody can pick a prefix
    that sorts first), and the first `max_custom_models` are crawled. Nothing here is listed yet: the crawl
    lists an indexed model only once a server it reached holds it (`monitor.crawl.finish_crawl`).
    """
    verified = verified or {}
    known = {target.dht_prefix for target in configured}
    custom, skipped = [], 0
    for prefix, info in index.items():
        if prefix in known:
            continue
        repository = hf_model_url(info.repository)
        bad = not is_valid_dht_prefix(prefix) or is_private_prefix(prefix) or info.num_blocks > max_num_blocks
        if bad or repository is None:
            skipped += 1
            continue
        custom.append(
            ModelTarget(
                dht_prefix=prefix,
                num_blocks=info.num_blocks,
                name=name_from_repository(repository) or prefix,
                repository=repository,
                official=False,
            )
        )
    custom.sort(key=lambda target: (-verified.get(target.dht_prefix, 0), salted_key(salt, target.dht_prefix)))
    skipped += max(len(custom) - max_custom_models, 0)
    return [*configured, *custom[:max_custom_models]], skipped
