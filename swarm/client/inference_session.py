"""Inference sessions: one rpc_inference stream per span, with fault tolerance.

Each server keeps the attention cache of its blocks, so a step sends only new tokens. The
client remembers what entered each span; when a server fails or vanishes, it picks a
replacement chain for those blocks, replays the remembered inputs there, and carries on:
greedy output stays the same.

Beam search reorders the batch between steps (row i continues hypothesis hypo_ids[i]): the
reorder travels with the next step as its `hypo_ids`, and each server reorders its cache
before computing that step (Petals semantics). The remembered inputs follow the same
reorders, so a replacement server is rebuilt with the rows in their current order.

A server takes a bounded number of tokens (rows x new tokens) per request: a longer step, or the
replay of a long history, goes out as several steps, each of which every server of the chain
takes whole; the caller still sees one step.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm.client.event_loop import run_sync
from swarm.client.routing import (
    PUSH_MIN_SAVING,
    MissingBlocksError,
    RequestRejected,
    RouteSpan,
    SequenceManager,
    rejection,
)
from swarm.names import block_uids, join_chain
from swarm.server.handler import INFERENCE_HANDLE
from swarm.streams import BlockingStream
from swarm.wire import deserialize, dumps_metadata, pack_args, serialize

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0  # seconds to wait for servers to free a finished session's caches
# Every step sends [hidden_states, prompts, hypo_ids]; prompts are always empty here, hypo_ids
# too unless the batch was reordered since the last step.
_ARGS = pack_args([torch.empty(0)] * 3)[1]
_NO_PROMPTS = serialize(torch.empty(0))
_NO_PROMPTS_NOR_HYPO_IDS = (_NO_PROMPTS, serialize(torch.empty(0, dtype=torch.int64)))


def _max_response_bytes(hidden: torch.Tensor) -> int:
    return hidden.numel() * 8 + 2**16  # the outputs have the inputs' shape (float64 at most)


class SessionError(RuntimeError):
    """An inference step failed on every server tried."""


class _ReplayError(RuntimeError):
    """A replacement server failed while its session was rebuilt (the cause is chained)."""

    def __init__(self, span: RouteSpan, sent: torch.Tensor):
        super().__init__(f"server {span.peer_id} failed while replaying blocks {span.start}:{span.end}")
        self.span = span
        self.sent = sent  # the request's hidden states


class ServerSession:
    """One open rpc_inference stream to one server, for blocks [span.start, span.end)."""

    def __init__(self, manager: SequenceManager, span: RouteSpan, max_length: int):
        self.manager, self.span, self.max_length = manager, span, max_length
        self.uid = join_chain(block_uids(manager.dht_prefix, span.start, span.end))
        self.session_id = str(uuid.uuid4())
        # Everything sent so far, for replay elsewhere: each step's hidden states and the hypo_ids
        # that reordered the rows before it (None: no reorder).
        self.steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.position = 0
        self._stream: BlockingStream | None = None
        self.started = False
        self.broken = False
        self.closed = False
        self._unanswered: torch.Tensor | None = None  # the empty step of start(), until its answer is read
        # The server before this one in the chain: the only peer whose pushes this server may take for us.
        self.previous_server: str | None = None
        self._previous_declared: str | None = None

    def open(self) -> None:
        peer_id = PeerID.from_base58(self.span.peer_id)
        self._stream = BlockingStream(self.manager.p2p, peer_id, INFERENCE_HANDLE, self.manager.config.connect_timeout)

    def start(self, like: torch.Tensor) -> None:
        """Start the server's session with an empty step (no tokens) and read its answer later, before the
        first real step's: the server allocates the cache and registers the session while the servers
        before it compute, so that they can push even the first step here (Petals clients do the same)."""
        empty = like[:, :0]
        metadata = self._metadata(str(uuid.uuid4()), None, None)
        request = runtime_pb2.ExpertRequest(
            uid=self.uid, tensors=[serialize(empty), *_NO_PROMPTS_NOR_HYPO_IDS], metadata=dumps_metadata(metadata)
        )
        self.broken = True  # until its answer is read
        self._stream.send(request, self.manager.config.request_timeout)
        self._unanswered = empty

    def _metadata(self, step_id: str, start_from: int | None, next_servers: list | None) -> dict[str, Any]:
        metadata: dict[str, Any] = {"session_id": self.session_id, "step_id": step_id, "args_structure": _ARGS}
        if next_servers:  # (a rewinding step is pushed too: every server rewinds to the same position)
            metadata["next_servers"] = next_servers
        if self.previous_server != self._previous_declared:
            metadata["previous_server"] = self._previous_declared = self.previous_server
        if not self.started:
            metadata.update(max_length=self.max_length, alloc_timeout=self.manager.config.alloc_timeout)
            metadata["active_adapter"] = self.manager.config.active_adapter  # kept for the whole session
            self.started = True
        if start_from is not None and start_from != self.position:
            metadata["start_from_position"] = start_from
        return metadata

    def _receive(self, hidden: torch.Tensor, timeout: float) -> torch.Tensor:
        """The answer to the step with inputs `hidden` (and first to start()'s empty step, if unread)."""
        answers = [self._receive_tensor(hidden, timeout)]
        if self._unanswered is not None:
            # The empty step's answer comes first, unless a step pushed here was computed before it.
            answers.append(self._receive_tensor(hidden, timeout))
            answers.sort(key=lambda answer: answer.shape[1] != 0)
            self._check_shape(answers.pop(0), self._unanswered)
            self._unanswered = None
        return self._check_shape(answers[0], hidden)

    def _receive_tensor(self, hidden: torch.Tensor, timeout: float) -> torch.Tensor:
        response = self._stream.receive(runtime_pb2.ExpertResponse, _max_response_bytes(hidden), timeout)
        if response is None:
            raise SessionError(f"server {self.span.peer_id} ended the session")
        (output,) = deserialize(response.tensors, max_tensors=1)
        return output

    def _check_shape(self, output: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if output.shape != hidden.shape:
            raise SessionError(
                f"server {self.span.peer_id} returned shape {tuple(output.shape)} for {tuple(hidden.shape)}"
            )
        return output

    def step(
        self,
        hidden: torch.Tensor,
        step_id: str,
        start_from: int | None,
        next_servers: list | None = None,
        hypo_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        metadata = self._metadata(step_id, start_from, next_servers)
        if hypo_ids is None and prompts is None:
            extra = _NO_PROMPTS_NOR_HYPO_IDS
        else:
            extra = (
                _NO_PROMPTS if prompts is None else serialize(prompts),
                _NO_PROMPTS_NOR_HYPO_IDS[1] if hypo_ids is None else serialize(hypo_ids),
            )
        request = runtime_pb2.ExpertRequest(
            uid=self.uid, tensors=[serialize(hidden), *extra], metadata=dumps_metadata(metadata)
        )
        timeout = self.manager.config.request_timeout
        self.broken = True  # until the answer is in: a stream left mid-step is of no further use
        self._stream.send(request, timeout)
        output = self._receive(hidden, timeout)
        self.broken = False
        if start_from is not None:
            self.position = start_from
            self.steps = [(self.history()[:, :start_from], None)] if self.steps else []
        self.steps.append((hidden, hypo_ids))
        self.position += hidden.shape[1]
        return output

    def history(self) -> torch.Tensor | None:
        """The inputs that rebuild this server's cache, rows in their current order."""
        return replay_history(self.steps)

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
        self.batch_size: int | None = None  # rows of every step: the servers' caches are made for the first's
        self.sessions: list[ServerSession] = []
        self.position = 0  # positions processed by the servers: a learned prefix, then tokens
        self.prefix_length = 0  # leading positions of a learned prefix (prompt tuning), with no token ids
        self.token_ids: torch.Tensor | None = None  # the token ids behind the positions after it, if known
        self._prompts: torch.Tensor | None = None  # deep prompts of the first step, for replays
        self.tokens_sent = 0  # counts every token position sent (the cost of this session)
        self._rewind_to: int | None = None
        self._hypo_ids: torch.Tensor | None = None  # a reorder the servers have yet to apply
        self._push_decisions: dict[tuple[str, str], bool] = {}  # (sender, receiver) peer ids: push there?
        self.closed = False
        self.failed: str | None = None  # why a step failed for good: the session takes no more steps
        self._failures = 0  # failed requests in the current step

    # ----- sync API -----

    def step(
        self,
        hidden: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        prefix_length: int = 0,
    ) -> torch.Tensor:
        """Run `hidden` (batch, new_tokens, hidden_size) through all blocks. With `hypo_ids`, row i of
        the batch first continues hypothesis hypo_ids[i] (beam search), as after `reorder(hypo_ids)`.

        The first step of a session may carry deep prompts, (blocks, batch, prefix, hidden_size),
        and say that its first `prefix_length` positions are a learned prefix without token ids.
        """
        if self.closed:
            raise SessionError("this inference session is closed")
        if self.failed is not None:
            # Some servers of the chain may have applied the failed step and others not: reusing the session
            # would feed them tokens at different positions.
            raise SessionError(f"this inference session failed ({self.failed}); open a new one")
        if self.batch_size is not None and hidden.shape[0] != self.batch_size:
            raise ValueError(
                f"this inference session's batch size is {self.batch_size} (its servers hold caches for that many "
                f"rows), got {hidden.shape[0]} rows: open a new session for another batch size"
            )
        if hypo_ids is not None:
            self.reorder(hypo_ids)
        start = self.position if self._rewind_to is None else self._rewind_to
        if start == 0:
            self.prefix_length, self._prompts = prefix_length, prompts
        elif prompts is not None or prefix_length:
            raise ValueError("prompts and a learned prefix belong to the first step of a session")
        if start + hidden.shape[1] > self.max_length:
            raise SessionError(
                f"the session would hold {start + hidden.shape[1]} tokens, more than its max_length={self.max_length}"
            )
        pending = self._hypo_ids if start > 0 else None  # nothing cached yet: nothing to reorder
        if pending is not None:
            _check_hypo_ids(pending, hidden.shape[0])
            if torch.equal(pending, torch.arange(len(pending))):
                pending = None  # spare the servers a copy of their caches
        output = self._step(hidden.detach().cpu(), self._rewind_to, pending, self._prompts if start == 0 else None)
        self.position = start + hidden.shape[1]
        self._rewind_to = None
        self._hypo_ids = None
        self.tokens_sent += hidden.shape[1]
        if token_ids is not None:
            kept = self.token_ids[:, : start - self.prefix_length] if self.token_ids is not None else token_ids[:, :0]
            self.token_ids = torch.cat([kept, token_ids.cpu()], dim=1)
        return output

    def reorder(self, hypo_ids: torch.Tensor | Sequence[int]) -> None:
        """Beam search: row i of the batch continues hypothesis hypo_ids[i] from now on.

        `token_ids` follow at once; the servers reorder their caches with the next step.
        """
        hypo_ids = torch.as_tensor(hypo_ids).detach().cpu()
        if hypo_ids.ndim != 1 or hypo_ids.dtype.is_floating_point or hypo_ids.dtype == torch.bool:
            raise ValueError("hypo_ids must be a 1-d tensor of row indices")
        hypo_ids = hypo_ids.to(torch.int64)
        known = self._hypo_ids if self._hypo_ids is not None else self.token_ids
        rows = self.batch_size if self.batch_size is not None else len(known if known is not None else hypo_ids)
        _check_hypo_ids(hypo_ids, rows)
        if self.token_ids is not None:
            self.token_ids = self.token_ids[hypo_ids]
        self._hypo_ids = hypo_ids if self._hypo_ids is None else self._hypo_ids[hypo_ids]

    @property
    def token_position(self) -> int:
        """Tokens the servers hold after the learned prefix (if any)."""
        return self.position - self.prefix_length

    def rewind(self, position: int) -> None:
        """Forget positions after `position`; the next step continues from there."""
        if not 0 <= position <= self.position:
            raise ValueError(f"can rewind only to a position between 0 and {self.position}")
        if 0 < position < self.prefix_length:
            raise ValueError(f"cannot rewind into the learned prefix of {self.prefix_length} positions")
        if position != self.position:
            self._rewind_to = position
            self.position = position
            if self.token_ids is not None:
                self.token_ids = self.token_ids[:, : max(position - self.prefix_length, 0)]
            if position == 0:
                self.prefix_length = 0

    def rewind_tokens(self, count: int) -> None:
        """Keep the learned prefix and the first `count` tokens after it."""
        self.rewind(self.prefix_length + count)

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

    def _step(
        self,
        hidden: torch.Tensor,
        start_from: int | None,
        hypo_ids: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        if not self.sessions:
            self.sessions = self._open_chain(0, self.manager.num_blocks)
            self.batch_size = hidden.shape[0]  # the servers make their caches for this many rows
            if prompts is None:  # (steps with deep prompts are not pushed)
                self._start_push_targets(hidden)
        self._failures = 0
        try:
            return self._run(0, hidden, start_from, hypo_ids, prompts)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            raise

    def _run(
        self,
        index: int,
        hidden: torch.Tensor,
        start_from: int | None,
        hypo_ids: torch.Tensor | None,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        """`hidden` through sessions[index:], in as many steps as their servers' request limits need.

        Each part is a step of its own for every server there (its own step id, pushed on like any other),
        so the servers' positions and pushes stay consistent; the rewind, reorder and deep prompts go with
        the first part.
        """
        tokens = self._tokens_per_step(self.sessions[index:], hidden.shape[0], prompts)
        if hidden.shape[1] > tokens:
            first = self._run(index, hidden[:, :tokens], start_from, hypo_ids, prompts)
            rest = [self._run(index, part, None, None, None) for part in hidden[:, tokens:].split(tokens, dim=1)]
            return torch.cat([first, *rest], dim=1)
        step_id = str(uuid.uuid4())
        while index < len(self.sessions):
            session = self.sessions[index]
            session.previous_server = self._previous_server(index)
            try:
                span_prompts = _span_prompts(prompts, session.span)
                hidden = session.step(hidden, step_id, start_from, self._next_servers(index), hypo_ids, span_prompts)
                index += 1
                continue
            except MissingBlocksError:
                raise
            except Exception as e:
                self._failed(session.span, e, hidden)
            self._replace_with_retries(index, start_from)
            if hidden.shape[1] > self._tokens_per_step(self.sessions[index:], hidden.shape[0], prompts):
                # The replacement takes fewer tokens at a time (a limit learned from its refusal).
                return self._run(index, hidden, start_from, hypo_ids, prompts)
        return hidden

    def _tokens_per_step(self, sessions: list[ServerSession], rows: int, prompts: torch.Tensor | None) -> int:
        """The most new tokens per row that every server of `sessions` takes in one request."""
        limit = min(self.manager.tokens_per_request(session.span.peer_id) for session in sessions)
        tokens = limit // rows
        prefix = prompts.shape[2] if prompts is not None else 0  # deep prompts: in the first request whole
        if tokens < max(prefix, 1):
            what = f"{rows} rows" + (f" with a learned prefix of {prefix} positions" if prefix else "")
            raise RequestRejected(f"a step of {what} does not fit the servers' {limit} tokens per request")
        return tokens

    def _replace_with_retries(self, index: int, start_from: int | None) -> None:
        # A replacement chain can fail too, while it replays: that counts as a failure of its own.
        while True:
            try:
                self._replace(index, start_from)
                return
            except _ReplayError as e:
                self._failed(e.span, e.__cause__, e.sent)

    def _failed(self, span: RouteSpan, error: BaseException, sent: torch.Tensor) -> None:
        """Count a failed request of `sent` to the server of `span`, and ban the server if it was at fault.

        A request the server refused as invalid is our fault: one too large teaches us the server's limit
        (the next try sends less), any other is raised to the caller, as no server would take it.
        """
        self._failures += 1
        refused = rejection(error, sent.shape[0], sent.shape[1])
        if refused is None:
            self._give_up_after(self._failures, span, error)
        elif refused.token_limit is None:
            raise RequestRejected(
                f"server {span.peer_id} refused the request as invalid ({refused.reason}); other servers would too"
            ) from error
        else:
            self.manager.learn_token_limit(span.peer_id, refused.token_limit)
            self._give_up_after(self._failures, span, error, ban=False)

    def _give_up_after(self, failures: int, span: RouteSpan, error: BaseException, ban: bool = True) -> None:
        """Log a server's failure and (with `ban`) avoid it for a while; raise SessionError after max_retries
        failures."""
        blocks, retries = f"blocks {span.start}:{span.end}", self.manager.config.max_retries
        failure = f"server {span.peer_id} failed on {blocks}: {type(error).__name__}: {error}"
        if ban:
            self.manager.ban(span.peer_id)
        if failures > retries:
            raise SessionError(
                f"inference step failed {failures} times (max_retries={retries}); last, {failure}"
            ) from error
        if ban:
            logger.warning("%s; replacing it (retry %d of %d)", failure[0].upper() + failure[1:], failures, retries)

    def _next_servers(self, index: int) -> list[list]:
        """Petals' next_servers: the later servers of the chain that each server pushes its outputs on to,
        as far as pushing is on and worth it hop by hop (and the server there has its session open)."""
        if self.manager.config.use_server_to_server is False:
            return []
        chain = []
        for sender, receiver in zip(self.sessions[index:], self.sessions[index + 1 :]):
            if not receiver.started or not self.push_worth_it(sender.span.peer_id, receiver.span.peer_id):
                break
            chain.append([receiver.span.peer_id, receiver.session_id, receiver.span.start, receiver.span.end])
        return chain

    def _previous_server(self, index: int) -> str | None:
        """The server whose pushes sessions[index]'s server may take (none when pushing is off)."""
        if index == 0 or self.manager.config.use_server_to_server is False:
            return None
        return self.sessions[index - 1].span.peer_id

    def _start_push_targets(self, hidden: torch.Tensor) -> None:
        """Start the sessions that the server before them will push to, so that the first step is pushed too."""
        for index, (sender, receiver) in enumerate(zip(self.sessions, self.sessions[1:]), start=1):
            if self.manager.config.use_server_to_server is False:
                return
            if not receiver.started and self.push_worth_it(sender.span.peer_id, receiver.span.peer_id):
                receiver.previous_server = self._previous_server(index)
                try:
                    receiver.start(hidden)
                except OSError as e:  # the step through it fails and replaces it
                    logger.debug("Could not start the session on %s early: %s", receiver.span.peer_id, e)

    def push_worth_it(self, sender: str, receiver: str) -> bool:
        """Whether server `sender` pushes its outputs to `receiver` in this session (use_server_to_server)."""
        if self.manager.config.use_server_to_server:
            return True
        decided = self._push_decisions.get((sender, receiver))
        if decided is None:  # once per hop and session: the round trips behind it change slowly
            decided = self.manager.push_saving(sender, receiver) >= PUSH_MIN_SAVING
            self._push_decisions[sender, receiver] = decided
        return decided

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
            try:
                self._replay(replacements, history)
            except BaseException:
                _close_all(replacements)  # not kept: their streams end here
                raise
        self.sessions[index : index + 1] = replacements

    def _replay(self, sessions: list[ServerSession], history: torch.Tensor) -> None:
        """Rebuild the caches of a new chain from `history`, in steps that each of its servers takes whole."""
        tokens = self._tokens_per_step(sessions, history.shape[0], self._prompts)
        step_id = str(uuid.uuid4())
        for part in history.split(tokens, dim=1):
            chunk = part
            for session in sessions:
                # The first part starts the session: it carries the deep prompts, if any.
                prompts = _span_prompts(self._prompts, session.span) if session.position == 0 else None
                try:
                    chunk = session.step(chunk, f"{step_id}-{session.position}", None, prompts=prompts)
                except Exception as e:
                    raise _ReplayError(session.span, chunk) from e


def _span_prompts(prompts: torch.Tensor | None, span: RouteSpan) -> torch.Tensor | None:
    return None if prompts is None else prompts[span.start : span.end].detach().cpu()


def _check_hypo_ids(hypo_ids: torch.Tensor, rows: int) -> None:
    if hypo_ids.shape != (rows,) or (rows and not 0 <= hypo_ids.min() <= hypo_ids.max() < rows):
        raise ValueError(f"hypo_ids must be {rows} row indices in [0, {rows}), got {hypo_ids.tolist()}")


def replay_history(steps: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor | None:
    """The hidden states that rebuild a cache after these steps: each step reorders the rows
    (hypo_ids, or None) then appends its hidden states. Row maps are composed from the end, so
    every step's tensor is copied once however many reorders came after it."""
    if not steps:
        return None
    parts, rows = [], None  # rows[i]: where the final row i sits at this point of the history
    for hidden, hypo_ids in reversed(steps):
        parts.append(hidden if rows is None else hidden[rows])
        if hypo_ids is not None:
            rows = hypo_ids if rows is None else hypo_ids[rows]
    return torch.cat(parts[::-1], dim=1)


def _close_all(sessions: list[ServerSession], timeout: float = CLOSE_TIMEOUT) -> None:
    """End every session first, then wait for the servers together (one shared deadline)."""
    for session in sessions:
        session.finish()
    deadline = time.monotonic() + timeout
    for session in sessions:
        session.wait_closed(deadline - time.monotonic())
