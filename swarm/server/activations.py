"""Forward passes kept for their backward pass: training through the swarm without recomputing.

A training client calls rpc_forward, then rpc_backward with the same inputs. Without help the
server runs the span's forward twice (once per call). When the client names a `keep_for_backward`
id, the server may keep the forward's autograd graph under that id, within a memory budget, for
a short time; the matching backward then only runs the backward. Anything not kept (a budget
full, an id unknown, inputs that differ) falls back to recomputing, so the store may drop entries
whenever it likes: peers cannot grow it past its budget or pin it past its time limit.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

import torch

MAX_KEEP_ID_LENGTH = 128


@dataclasses.dataclass
class KeptForward:
    """One forward pass with its graph: inputs that require grad and the output built from them."""

    first: int
    last: int
    hidden: torch.Tensor
    prompts: torch.Tensor | None
    output: torch.Tensor
    adapter: str | None = None
    nbytes: int = 0  # what its graph holds (the tensors autograd saved)

    def matches(
        self, first: int, last: int, hidden: torch.Tensor, prompts: torch.Tensor | None, adapter: str | None = None
    ) -> bool:
        """The backward request is for exactly this forward (same blocks, adapter and inputs)."""
        if (first, last, adapter) != (self.first, self.last, self.adapter) or hidden.shape != self.hidden.shape:
            return False
        if (prompts is None) != (self.prompts is None):
            return False
        same_hidden = torch.equal(hidden.to(self.hidden.device, self.hidden.dtype), self.hidden.detach())
        if prompts is None:
            return same_hidden
        return (
            same_hidden
            and prompts.shape == self.prompts.shape
            and torch.equal(prompts.to(self.prompts.device, self.prompts.dtype), self.prompts.detach())
        )


@dataclasses.dataclass
class _Entry:
    kept: KeptForward
    nbytes: int
    expires: float


class ActivationStore:
    """Kept forwards by (peer, id): least recently kept dropped first, within a total and a per-peer budget."""

    def __init__(self, max_bytes: int, max_bytes_per_peer: int, ttl: float = 60.0):
        self.max_bytes, self.max_bytes_per_peer, self.ttl = max_bytes, max_bytes_per_peer, ttl
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.bytes_used = 0
        self.hits = 0  # backward passes that reused a kept forward

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= min(self.max_bytes, self.max_bytes_per_peer)

    def put(self, peer: str, keep_id: str, kept: KeptForward, nbytes: int | None = None) -> bool:
        nbytes = kept.nbytes if nbytes is None else nbytes
        if not self.fits(nbytes):
            return False
        self._drop_expired()
        self._drop((peer, keep_id))
        while self._peer_bytes(peer) + nbytes > self.max_bytes_per_peer:
            self._drop(next(key for key in self._entries if key[0] == peer))
        while self.bytes_used + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[(peer, keep_id)] = _Entry(kept, nbytes, time.monotonic() + self.ttl)
        self.bytes_used += nbytes
        return True

    def pop(self, peer: str, keep_id: str) -> KeptForward | None:
        self._drop_expired()
        entry = self._entries.pop((peer, keep_id), None)
        if entry is None:
            return None
        self.bytes_used -= entry.nbytes
        return entry.kept

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _peer_bytes(self, peer: str) -> int:
        return sum(entry.nbytes for (owner, _), entry in self._entries.items() if owner == peer)

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for key in [key for key, entry in self._entries.items() if entry.expires <= now]:
            self._drop(key)
