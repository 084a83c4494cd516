"""Inference sessions: one rpc_inference stream per span, with fault tolerance.

Each server keeps the attention cache of its blocks, so a step sends only new tokens. The
client remembers what entered each span; when a server fails or vanishes, it picks a
replacement chain for those blocks, replays the remembered inputs there, and carries on:
greedy output stays the same.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import torch
from hivemind.proto import runtime_pb2

from swarm.client.event_loop import run_sync
from swarm.client.routing import MissingBlocksError, RouteSpan, SequenceManager
from swarm.names import block_uids, join_chain
from swarm.wire import deserialize, dumps_metadata, pack_args, serialize

logger = logging.getLogger(__name__)

REPLAY_CHUNK_TOKENS = 1024
_NO_PROMPTS = torch.empty(0)
_NO_HYPO_IDS = torch.empty(0, dtype=torch.int64)


class SessionError(RuntimeError):
    """An inference step failed on every server tried."""


class ServerSession:
    """One open rpc_inference stream to one server, for blocks [span.start, span.end)."""

    def __init__(self, manager: SequenceManager, span: RouteSpan, max_length: int):
        self.manager, self.span, self.max_length = manager, span, max_length
        self.uid = join_chain(block_uids(manager.dht_prefix, span.start, span.end))
        self.session_id = str(uuid.uuid4())
        self.inputs: list[torch.Tensor] = []  # everything sent so far, for replay elsewhere
        self.position = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._responses: Any = None
        self._opening: asyncio.Future | None = None
        self.started = False
        self.closed = False

    async def _requests(self):
        while True:
            request = await self._queue.get()
            if request is None:
                return
            yield request

    async def open(self) -> None:
        # libp2p negotiates a stream's protocol lazily, on its first message: the stream finishes
        # opening only once the first step is queued, so `step()` awaits it.
        stub = self.manager.stub(self.span.peer_id)
        self._opening = asyncio.ensure_future(stub.rpc_inference(self._requests()))

    async def step(
        self, hidden: torch.Tensor, step_id: str, start_from: int | None, next_servers: list | None = None
    ) -> torch.Tensor:
        tensors, structure = pack_args([hidden, _NO_PROMPTS, _NO_HYPO_IDS])
        metadata: dict[str, Any] = {"session_id": self.session_id, "step_id": step_id, "args_structure": structure}
        if next_servers and self.started and start_from is None:
            metadata["next_servers"] = next_servers
        if not self.started:
            metadata.update(max_length=self.max_length, alloc_timeout=self.manager.config.alloc_timeout)
            self.started = True
        if start_from is not None and start_from != self.position:
            metadata["start_from_position"] = start_from
        self._queue.put_nowait(
            runtime_pb2.ExpertRequest(
                uid=self.uid, tensors=[serialize(t) for t in tensors], metadata=dumps_metadata(metadata)
            )
        )
        if self._responses is None:
            self._responses = await asyncio.wait_for(self._opening, self.manager.config.connect_timeout)
        response = await asyncio.wait_for(anext(self._responses), self.manager.config.request_timeout)
        (output,) = deserialize(response.tensors, max_tensors=1)
        if output.shape != hidden.shape:
            raise SessionError(
                f"server {self.span.peer_id} returned shape {tuple(output.shape)} for {tuple(hidden.shape)}"
            )
        if start_from is not None:
            self.position = start_from
            self.inputs = [torch.cat(self.inputs, dim=1)[:, :start_from]] if self.inputs else []
        self.inputs.append(hidden)
        self.position += hidden.shape[1]
        return output

    def history(self) -> torch.Tensor | None:
        return torch.cat(self.inputs, dim=1) if self.inputs else None

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.put_nowait(runtime_pb2.ExpertRequest())  # no tensors: the server frees the cache
        self._queue.put_nowait(None)
        if self._responses is None and self._opening is not None:
            self._opening.cancel()
        if self._responses is not None:
            try:
                await asyncio.wait_for(anext(self._responses), 2.0)
            except (StopAsyncIteration, Exception):
                pass


class InferenceSession:
    """A multi-step generation session across the swarm: `step(hidden)` -> hidden after all blocks.

    Use as a context manager (`with model.inference_session(max_length=N) as session:`); the
    servers free their caches when it closes.
    """

    def __init__(self, manager: SequenceManager, max_length: int):
        self.manager = manager
        self.max_length = max_length
        self.sessions: list[ServerSession] = []
        self.position = 0  # tokens processed by the servers
        self.token_ids: torch.Tensor | None = None  # the token ids behind those positions, if known
        self.tokens_sent = 0  # counts every token position sent (the cost of this session)
        self._rewind_to: int | None = None
        self.closed = False

    # ----- sync API -----

    def step(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.closed:
            raise SessionError("this inference session is closed")
        start = self.position if self._rewind_to is None else self._rewind_to
        if start + hidden.shape[1] > self.max_length:
            raise SessionError(
                f"the session would hold {start + hidden.shape[1]} tokens, more than its max_length={self.max_length}"
            )
        timeout = self.manager.config.request_timeout * (self.manager.config.max_retries + 2) + 60
        output = run_sync(self._step(hidden.detach().cpu(), self._rewind_to), timeout=timeout)
        self.position = start + hidden.shape[1]
        self._rewind_to = None
        self.tokens_sent += hidden.shape[1]
        if token_ids is not None:
            kept = self.token_ids[:, :start] if self.token_ids is not None else token_ids[:, :0]
            self.token_ids = torch.cat([kept, token_ids.cpu()], dim=1)
        return output

    def rewind(self, position: int) -> None:
        """Forget tokens after `position`; the next step continues from there."""
        if not 0 <= position <= self.position:
            raise ValueError(f"can rewind only to a position between 0 and {self.position}")
        if position != self.position:
            self._rewind_to = position
            self.position = position
            if self.token_ids is not None:
                self.token_ids = self.token_ids[:, :position]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            run_sync(self._close_all(self.sessions), timeout=10)
            self.sessions = []

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def route(self) -> list[RouteSpan]:
        return [s.span for s in self.sessions]

    # ----- async internals -----

    async def _step(self, hidden: torch.Tensor, start_from: int | None) -> torch.Tensor:
        if not self.sessions:
            self.sessions = await self._open_chain(0, self.manager.num_blocks)
        step_id = str(uuid.uuid4())
        index, failures = 0, 0
        while index < len(self.sessions):
            session = self.sessions[index]
            try:
                hidden = await session.step(hidden, step_id, start_from, self._next_servers(index))
                index += 1
            except MissingBlocksError:
                raise
            except Exception as e:
                failures += 1
                logger.warning("Server %s failed (%s: %s); replacing it", session.span.peer_id, type(e).__name__, e)
                self.manager.ban(session.span.peer_id)
                if failures > self.manager.config.max_retries:
                    raise SessionError(
                        f"inference step failed on {failures} servers; last error: {type(e).__name__}: {e}"
                    ) from e
                await self._replace(index, start_from)
        return hidden

    def _next_servers(self, index: int) -> list[list]:
        """Petals' next_servers: the later servers of the chain, so each can push its outputs onward."""
        later = self.sessions[index + 1 :]
        if not self.manager.config.use_server_to_server or not later or not all(s.started for s in later):
            return []
        return [[s.span.peer_id, s.session_id, s.span.start, s.span.end] for s in later]

    async def _open_chain(self, start: int, end: int) -> list[ServerSession]:
        route = await self.manager.make_route(start, end, mode="latency")
        sessions = [ServerSession(self.manager, span, self.max_length) for span in route]
        try:
            await asyncio.gather(*(s.open() for s in sessions))
        except Exception:
            await self._close_all(sessions)
            raise
        return sessions

    async def _replace(self, index: int, start_from: int | None) -> None:
        """Swap sessions[index] for a fresh chain over the same blocks, replaying its history there."""
        failed = self.sessions[index]
        history = failed.history()
        if history is not None and start_from is not None:
            history = history[:, :start_from]
        await self._close_all([failed])
        replacements = await self._open_chain(failed.span.start, failed.span.end)
        if history is not None and history.shape[1] > 0:
            step_id = str(uuid.uuid4())
            for chunk in history.split(REPLAY_CHUNK_TOKENS, dim=1):
                for session in replacements:
                    chunk = await session.step(chunk, f"{step_id}-{session.position}", None)
        self.sessions[index : index + 1] = replacements

    @staticmethod
    async def _close_all(sessions: list[ServerSession]) -> None:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
