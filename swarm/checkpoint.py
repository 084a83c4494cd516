"""Find a model's checkpoint files (local folder or Hugging Face Hub) and load only chosen tensors.

Servers load just their blocks and clients just the embeddings, final norm and LM head, so
nobody ever materialises the whole model. Sharded checkpoints are read through their
`model.safetensors.index.json`, and only the shards that hold wanted tensors are opened
(and, for Hub repositories, downloaded).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import math
import mmap
import sys
from collections.abc import Callable, Iterator
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
        with TensorReader(self) as reader, _bar(len(names), description, progress) as bar:
            for path, members in self.files_for(names).items():
                for name in members:
                    tensors[name] = reader.read(path, name, dtype).to(device)
                    bar.update(1)
        return tensors

    def load_blocks(
        self,
        prefixes: list[str],
        *,
        dtype: torch.dtype,
        progress: bool = False,
        description: str = "Loading weights",
    ) -> Iterator[LoadedWeights]:
        """Yield each prefix's tensors (names without the prefix), cast to `dtype`, one block after the other.

        Nothing of a block is read before the previous one is taken, so a consumer that converts each block
        (quantizes it, moves it to a GPU) and drops it holds one block's unconverted bytes at most. Tensors
        that need no cast are mapped from the file (read when first used); a cast reads the stored bytes a
        chunk at a time into the tensor of the new dtype, so the stored copy never exists whole in memory.
        """
        names = self.tensor_names()
        groups = [[name for name in names if name.startswith(prefix)] for prefix in prefixes]
        with TensorReader(self) as reader, _bar(sum(map(len, groups)), description, progress) as bar:
            for prefix, members in zip(prefixes, groups, strict=True):
                # Returned, not bound to a local: the generator keeps no reference once the block is taken.
                yield self._read_block(reader, prefix, members, dtype, bar)

    def _read_block(
        self, reader: TensorReader, prefix: str, names: list[str], dtype: torch.dtype, bar
    ) -> LoadedWeights:
        block = LoadedWeights()
        for path, members in self.files_for(names).items():
            for name in members:
                block[name[len(prefix) :]] = reader.read(path, name, dtype)
                bar.update(1)
        return block


class LoadedWeights(dict):
    """One block's tensors as `CheckpointFiles.load_blocks` read them: nobody else holds them, so whoever
    builds the block may drop their pages once converted (`PageReleaser`)."""


def _bar(total: int, description: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=description, unit="tensor", disable=not progress)


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CAST_CHUNK_BYTES = 8 * 2**20  # stored bytes read at a time when casting: the most a cast holds besides its result


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: torch.dtype | None  # None: a dtype safetensors itself must read (float8 and the like)
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, StoredTensor]:
    """A safetensors file's table of tensors (its JSON header: dtype, shape, byte offsets after the header)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has an unreadable safetensors header: {e}") from e
    stored = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in info["data_offsets"])
            shape = tuple(int(n) for n in info["shape"])
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from e
        if not 0 <= begin <= end <= size - 8 - length:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file")
        if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes, not what its shape and dtype take")
        stored[name] = StoredTensor(dtype, shape, 8 + length + begin, end - begin)
    return stored


class TensorReader:
    """Reads single tensors of a checkpoint's files, mapped when no cast is needed, else cast chunk by chunk."""

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict[str, StoredTensor]] = {}
        self._stack = contextlib.ExitStack()
        self._buffer = torch.empty(0, dtype=torch.uint8)  # stored bytes on their way to a cast

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()  # mapped tensors stay valid: they hold their own reference to the mapping

    def _handle(self, path: str):
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        return self._handles[path]

    def read(self, path: str, name: str, dtype: torch.dtype) -> torch.Tensor:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        stored = self._headers[path].get(name)
        if stored is None:
            raise KeyError(f"{path} has no tensor {name!r}")
        if stored.dtype is None or not stored.dtype.is_floating_point or stored.dtype == dtype:
            tensor = self._handle(path).get_tensor(name)  # zero-copy: pages are read when first used
            return tensor.to(dtype) if tensor.is_floating_point() else tensor
        return self._read_cast(path, stored, dtype)

    def _read_cast(self, path: str, stored: StoredTensor, dtype: torch.dtype) -> torch.Tensor:
        """`stored` read a chunk at a time (plain reads: no mapped pages stay resident) into a new `dtype` tensor.

        One buffer serves every cast: a new one per tensor would leave freed holes in the C heap, which
        keeps them (its threshold for mapping allocations of their own grows with what was freed).
        """
        result = torch.empty(stored.shape, dtype=dtype)
        element = stored.nbytes // max(result.numel(), 1)
        step = max(1, CAST_CHUNK_BYTES // max(element, 1))
        if self._buffer.numel() < min(step, result.numel()) * element:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # the old one goes first
            self._buffer = torch.empty(min(step, result.numel()) * element, dtype=torch.uint8)
        _read_into(path, stored, result.view(-1), self._buffer, step)
        return result


def _read_into(path: str, stored: StoredTensor, flat: torch.Tensor, buffer: torch.Tensor, step: int) -> None:
    """Fill `flat` from the file, `step` elements at a time through `buffer`, cast as they are copied."""
    element = stored.nbytes // max(flat.numel(), 1)
    with open(path, "rb", buffering=0) as file:
        file.seek(stored.start)
        for first in range(0, flat.numel(), step):
            count = min(step, flat.numel() - first)
            chunk = buffer[: count * element]
            if file.readinto(memoryview(chunk.numpy())) != chunk.numel():
                raise ValueError(f"{path} ends inside a tensor: truncated download?")
            flat[first : first + count].copy_(chunk.view(stored.dtype))


class PageReleaser:
    """Drops the resident pages of tensors mapped from checkpoint files, once their bytes have been converted.

    Only whole pages inside the tensor, and only where they belong to a file mapping: they are clean copies of
    the file (it is never written), so the kernel reads them again if anything ever does. Without this, a
    quantized span would keep every float weight it read in its resident memory while the file stays mapped.
    Linux only; elsewhere (or for memory that is not a file mapping) nothing happens. Call it only with
    tensors nobody will use again. One releaser per block: it remembers the last mapping it looked up
    (a chunk of rows after another lies in the same one), so /proc/self/maps is read about once per tensor.
    """

    def __init__(self) -> None:
        self._mapping: tuple[int, int, bool] | None = None  # low, high, whether it maps a file

    def __call__(self, tensor: torch.Tensor) -> None:
        if _madvise is None or tensor.device.type != "cpu" or not tensor.numel():
            return
        page = mmap.PAGESIZE
        first = -(-tensor.data_ptr() // page) * page
        end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
        if end <= first:
            return
        if self._mapping is None or not self._mapping[0] <= first < end <= self._mapping[1]:
            self._mapping = _mapping_of(first, end)
        if self._mapping is not None and self._mapping[2]:
            _madvise(first, end - first, MADV_DONTNEED)


MADV_DONTNEED = 4


def _libc_function(name: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


_madvise = _libc_function("madvise")
if _madvise is not None:
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _mapping_of(first: int, end: int) -> tuple[int, int, bool] | None:
    """The mapping of this process that holds [first, end), and whether it maps a file; None if none does."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= first and end <= high:
            return low, high, len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0"
    return None


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc keeps freed small blocks otherwise)."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


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
