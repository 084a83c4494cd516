"""Inference sessions: one rpc_inference stream per span, with fault tolerance.

Each server keeps the attention cache of its blocks, so a step sends only new tokens. The
client remembers what entered each span; when a server fails or vanishes, it picks a
replacement chain for those blocks, replays the remembered inputs there, and carries on:
greedy output stays the same.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm.client.event_loop import run_sync
from swarm.client.routing import MissingBlocksError, RouteSpan, SequenceManager
from swarm.names import block_uids, join_chain
from swarm.server.handler import INFERENCE_HANDLE
from swarm.streams import BlockingStream
from swarm.wire import deserialize, dumps_metadata, pack_args, serialize

logger = logging.getLogger(__name__)

REPLAY_CHUNK_TOKENS = 1024
CLOSE_TIMEOUT = 2.0  # seconds to wait for servers to free a finished session's caches
# Every step sends [hidden_states, prompts, hypo_ids]; the last two are always empty here.
_ARGS = pack_args([torch.empty(0)] * 3)[1]
_NO_PROMPTS_NOR_HYPO_IDS = (serialize(torch.empty(0)), serialize(torch.empty(0, dtype=torch.int64)))


def _max_response_bytes(hidden: torch.Tensor) -> int:
    return hidden.numel() * 8 + 2**16  # the outputs have the inputs' shape (float64 at most)


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
        self._stream: BlockingStream | None = None
        self.started = False
        self.broken = False
        self.closed = False

    def open(self) -> None:
        peer_id = PeerID.from_base58(self.span.peer_id)
        self._stream = BlockingStream(self.manager.p2p, peer_id, INFERENCE_HANDLE, self.manager.config.connect_timeout)

    def step(
        self, hidden: torch.Tensor, step_id: str, start_from: int | None, next_servers: list | None = None
    ) -> torch.Tensor:
        metadata: dict[str, Any] = {"session_id": self.session_id, "step_id": step_id, "args_structure": _ARGS}
        if next_servers and self.started and start_from is None:
            metadata["next_servers"] = next_servers
        if not self.started:
            metadata.update(max_length=self.max_length, alloc_timeout=self.manager.config.alloc_timeout)
            self.started = True
        if start_from is not None and start_from != self.position:
            metadata["start_from_position"] = start_from
        request = runtime_pb2.ExpertRequest(
            uid=self.uid, tensors=[serialize(hidden), *_NO_PROMPTS_NOR_HYPO_IDS], metadata=dumps_metadata(metadata)
        )
        timeout = self.manager.config.request_timeout
        self.broken = True  # until the answer is in: a stream left mid-step is of no further use
        self._stream.send(request, timeout)
        response = self._stream.receive(runtime_pb2.ExpertResponse, _max_response_bytes(hidden), timeout)
        if response is None:
            raise SessionError(f"server {self.span.peer_id} ended the session")
        self.broken = False
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

    def finish(self) -> None:
        """Say the session is over; the server frees its cache when it reads this."""
        if self.closed or self._stream is None:
            self.closed = True
            return
        self.closed = True
        if self.broken:  # the server has given up on this stream too (or will, when it notices)
            self._stream.close()
            self._stream = None
            return
        try:
            self._stream.send(runtime_pb2.ExpertRequest(), CLOSE_TIMEOUT)  # no tensors: the session is over
            self._stream.end(CLOSE_TIMEOUT)
        except OSError:  # already broken: the server frees the cache when it notices
            self._stream.close()
            self._stream = None

    def wait_closed(self, timeout: float) -> None:
        """After finish(): wait until the server has closed the stream (its cache is freed), then let go."""
        if self._stream is None:
            return
        try:
            self._stream.wait_closed(max(timeout, 0.01))
        except OSError:
            pass
        finally:
            self._stream.close()
            self._stream = None


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
        output = self._step(hidden.detach().cpu(), self._rewind_to)
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
            _close_all(self.sessions)
            self.sessions = []

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def route(self) -> list[RouteSpan]:
        return [s.span for s in self.sessions]

    # ----- internals -----

    def _step(self, hidden: torch.Tensor, start_from: int | None) -> torch.Tensor:
        if not self.sessions:
            self.sessions = self._open_chain(0, self.manager.num_blocks)
        step_id = str(uuid.uuid4())
        index, failures = 0, 0
        while index < len(self.sessions):
            session = self.sessions[index]
            try:
                hidden = session.step(hidden, step_id, start_from, self._next_servers(index))
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
                self._replace(index, start_from)
        return hidden

    def _next_servers(self, index: int) -> list[list]:
        """Petals' next_servers: the later servers of the chain, so each can push its outputs onward."""
        later = self.sessions[index + 1 :]
        if not self.manager.config.use_server_to_server or not later or not all(s.started for s in later):
            return []
        return [[s.span.peer_id, s.session_id, s.span.start, s.span.end] for s in later]

    def _open_chain(self, start: int, end: int) -> list[ServerSession]:
        """Streams to a chain of servers covering blocks [start, end); a server that cannot be reached
        is avoided and another chain chosen, up to max_retries times."""
        config = self.manager.config
        attempts = 0
        while True:
            route = run_sync(
                self.manager.make_route(start, end, mode="latency"),
                timeout=config.missing_blocks_timeout + config.request_timeout + 60,
            )
            sessions = [ServerSession(self.manager, span, self.max_length) for span in route]
            try:
                for session in sessions:
                    failed = session
                    session.open()
                return sessions
            except Exception as e:
                _close_all(sessions)
                attempts += 1
                if attempts > config.max_retries:
                    raise SessionError(
                        f"could not open a session on {attempts} routes; last error from "
                        f"{failed.span.peer_id}: {type(e).__name__}: {e}"
                    ) from e
                logger.warning(
                    "Server %s cannot be reached (%s: %s); choosing another", failed.span.peer_id, type(e).__name__, e
                )
                self.manager.ban(failed.span.peer_id)

    def _replace(self, index: int, start_from: int | None) -> None:
        """Swap sessions[index] for a fresh chain over the same blocks, replaying its history there."""
        failed = self.sessions[index]
        history = failed.history()
        if history is not None and start_from is not None:
            history = history[:, :start_from]
        _close_all([failed])
        replacements = self._open_chain(failed.span.start, failed.span.end)
        if history is not None and history.shape[1] > 0:
            step_id = str(uuid.uuid4())
            for chunk in history.split(REPLAY_CHUNK_TOKENS, dim=1):
                for session in replacements:
                    chunk = session.step(chunk, f"{step_id}-{session.position}", None)
        self.sessions[index : index + 1] = replacements


def _close_all(sessions: list[ServerSession], timeout: float = CLOSE_TIMEOUT) -> None:
    """End every session first, then wait for the servers together (one shared deadline)."""
    for session in sessions:
        session.finish()
    deadline = time.monotonic() + timeout
    for session in sessions:
        session.wait_closed(deadline - time.monotonic())
