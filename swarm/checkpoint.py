"""Find a model's checkpoint files (local folder or Hugging Face Hub) and load only chosen tensors.

Servers load just their blocks and clients just the embeddings, final norm and LM head, so
nobody ever materialises the whole model. Sharded checkpoints are read through their
`model.safetensors.index.json`, and only the shards that hold wanted tensors are opened
(and, for Hub repositories, downloaded).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointFiles:
    """The safetensors files of one checkpoint and which tensor lives in which file."""

    def __init__(self, name_or_path: str, *, revision: str | None = None, token: str | bool | None = None):
        self.name_or_path = name_or_path
        self.revision = revision
        self.token = token
        self.is_local = Path(name_or_path).is_dir()
        if not self.is_local and is_local_checkpoint(name_or_path):
            raise FileNotFoundError(f"no checkpoint folder at {name_or_path}")
        index_path = self._find(INDEX_FILE, required=False)
        if index_path is not None:
            weight_map = json.loads(Path(index_path).read_text())["weight_map"]
            self.weight_map: dict[str, str] | None = dict(weight_map)
        else:
            self.weight_map = None  # a single file holds everything
            self._find(SINGLE_FILE, required=True)

    def _find(self, filename: str, *, required: bool) -> str | None:
        if self.is_local:
            path = Path(self.name_or_path) / filename
            if path.exists():
                return str(path)
            if not required:
                return None
            if filename == SINGLE_FILE:
                raise FileNotFoundError(f"{self.name_or_path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
            raise FileNotFoundError(f"{self.name_or_path} lacks {filename}, which its {INDEX_FILE} names")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.name_or_path, filename, revision=self.revision, token=self.token)
        except EntryNotFoundError:
            if required:
                raise
            return None

    def files_for(self, names: list[str]) -> dict[str, list[str]]:
        """Group tensor names by the (local or downloaded) file that holds them."""
        groups: dict[str, list[str]] = {}
        for name in names:
            filename = SINGLE_FILE if self.weight_map is None else self.weight_map[name]
            groups.setdefault(filename, []).append(name)
        return {self._find(filename, required=True): members for filename, members in groups.items()}

    def tensor_names(self) -> list[str]:
        if self.weight_map is not None:
            return list(self.weight_map)
        with safe_open(self._find(SINGLE_FILE, required=True), framework="pt") as f:
            return list(f.keys())

    def load(
        self,
        wanted: Callable[[str], bool],
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        progress: bool = False,
        description: str = "Loading weights",
    ) -> dict[str, torch.Tensor]:
        """Load the tensors whose names pass `wanted`, cast to `dtype`, one tensor at a time."""
        names = [name for name in self.tensor_names() if wanted(name)]
        tensors: dict[str, torch.Tensor] = {}
        with tqdm(total=len(names), desc=description, unit="tensor", disable=not progress) as bar:
            for path, members in self.files_for(names).items():
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in members:
                        tensor = f.get_tensor(name)
                        if tensor.is_floating_point():
                            tensor = tensor.to(dtype)
                        tensors[name] = tensor.to(device)
                        bar.update(1)
        return tensors


def missing_local_path(name: str) -> str | None:
    """The first missing part of `name` if it names a local folder that is not there, else None.

    A name is taken for a path when it starts with `/`, `./`, `../` or `~`, or when its first part exists
    here (`swarm/demo_modl`); a Hub repository name (`owner/name`) is neither.
    """
    path = Path(name).expanduser()
    first = Path(name).parts[0] if Path(name).parts else ""
    looks_local = (
        name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
        or (len(Path(name).parts) > 1 and Path(first).exists())
    )
    if not looks_local or path.exists():
        return None
    missing = path
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    return str(missing)


def is_local_checkpoint(name: str) -> bool:
    """Hub names are `owner/name`; anything absolute, relative or with more parts is a local path."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).exists()
