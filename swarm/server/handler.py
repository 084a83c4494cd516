"""The RPC servicer of a block server, under Petals' handle names (PROTOCOL.md, "RPC").

Torch work runs on one compute thread so that the event loop keeps answering pings and
streams while a step computes; every request is validated before it touches the blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# hivemind recognises streaming handlers by typing.AsyncIterator hints (not collections.abc's)
from typing import Any, AsyncIterator, Iterator, TypeVar  # noqa: UP035

import torch
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.streaming import split_for_streaming
from hivemind.utils.tensor_descr import BatchTensorDescriptor

from swarm import __version__
from swarm.names import block_uids, join_chain, parse_block_uid, split_chain
from swarm.server.activations import MAX_KEEP_ID_LENGTH, ActivationStore
from swarm.server.backend import SessionKVCache, SpanBackend
from swarm.server.batching import BatcherClosed, StepBatcher
from swarm.server.memory_cache import CacheAllocationError, KVCachePool
from swarm.streams import FrameError, RemoteError, close_when_peer_ends, read_message, write_error, write_message
from swarm.wire import (
    BadRequest,
    deserialize,
    deserialize_streamed,
    dumps_metadata,
    loads_metadata,
    serialize,
    unpack_args,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

STREAM_CHUNK_BYTES = 2 * 1024**2  # half the daemon's 4 MiB message limit
MAX_BATCH_SIZE = 64
MAX_SEEN_STEPS = 4096
MAX_SESSION_ID_LENGTH = 128
MAX_STEP_ID_LENGTH = 128  # a session keeps up to MAX_SEEN_STEPS of them
MAX_PEER_ID_LENGTH = 128
MAX_NEXT_SERVERS = 64  # servers after this one in a pushed chain
MAX_CHAIN_BLOCKS = 4096  # blocks a pushed chain may span (models have a few hundred at most)
INFERENCE_HANDLE = "TransformerConnectionHandler.rpc_inference"  # served on a raw stream, see swarm.streams
MAX_STREAM_PARTS = 100_000
REQUEST_OVERHEAD_BYTES = 2**20  # a request's metadata (at most 64 KiB), hypo ids and framing
# One message of a streamed forward/backward: Petals splits tensors in parts of DEFAULT_MAX_MSG_SIZE
# (and repeats the metadata in each), we in half that. Larger messages are refused unread.
MAX_STREAM_MESSAGE_BYTES = 2 * DEFAULT_MAX_MSG_SIZE


@dataclasses.dataclass
class _Session:
    """The server side of one inference session: its cache, its limits, and the stream to its client."""

    cache: SessionKVCache
    first: int
    last: int
    max_length: int
    batch_size: int
    writer: asyncio.StreamWriter
    adapter: str | None = None  # chosen by the first request, kept for the whole session
    steps_computed: int = 0  # steps with tokens
    empty_step_seen: bool = False  # one empty step may open a session (Petals' clients), no more
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    seen_steps: OrderedDict[Any, None] = dataclasses.field(default_factory=OrderedDict)
    applying: set[asyncio.Future] = dataclasses.field(default_factory=set)  # steps being applied (see _apply_step)
    closed: bool = False  # ended: steps that come later change nothing
    broken: str | None = None  # why a step failed mid-computation: the cache is not trusted after it
    previous_server: str | None = None  # the one peer whose pushes this session's client accepts (see rpc_push)
    uses_prompts: bool = False  # a step carried deep prompts: later steps may too (see _step_request_bytes)

    def track(self, applying: asyncio.Future) -> None:
        """Keep a step being applied until it is done (see `close`)."""
        self.applying.add(applying)
        applying.add_done_callback(self._applied)

    def _applied(self, applying: asyncio.Future) -> None:
        self.applying.discard(applying)
        if not applying.cancelled():
            applying.exception()  # retrieved: a requester that was cancelled no longer waits for it

    async def close(self) -> None:
        """End the session once no step is being applied to it: its cache may be freed after this."""
        async with self.lock:
            self.closed = True
        await asyncio.gather(*self.applying, return_exceptions=True)


def _check_next_servers(next_servers: Any, after: int) -> None:
    """`next_servers` (PROTOCOL.md: `[peer_id, session_id, start, end]` each) must chain on from block `after`,
    before anything is built from it (a span of 10**9 blocks would be a billion block names)."""
    if not isinstance(next_servers, (list, tuple)) or len(next_servers) > MAX_NEXT_SERVERS:
        raise BadRequest(f"next_servers must be a list of at most {MAX_NEXT_SERVERS} servers")
    for entry in next_servers:
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise BadRequest("each of next_servers must be [peer_id, session_id, start, end]")
        peer_id, session_id, start, end = entry
        _check_peer_id(peer_id, "next_servers")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_LENGTH:
            raise BadRequest(f"next_servers: a session id must be 1 to {MAX_SESSION_ID_LENGTH} characters")
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (start, end)) or start != after:
            raise BadRequest(f"next_servers: each span must start where the previous one ends (block {after})")
        if not start < end <= after + MAX_CHAIN_BLOCKS:
            raise BadRequest(f"next_servers: a span must end after its start, within {MAX_CHAIN_BLOCKS} blocks")
        after = end


def _check_peer_id(peer_id: Any, what: str) -> str:
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_LENGTH:
        raise BadRequest(f"{what}: a peer id must be a short string")
    try:
        PeerID.from_base58(peer_id)
    except Exception:
        raise BadRequest(f"{what}: a peer id is not a valid base58 peer id") from None
    return peer_id


class ShuttingDown(RuntimeError):
    """The server refuses new work while it drains before going offline."""


class Overloaded(RuntimeError):
    """The server (or this peer's share of it) is at a limit; the request may be retried later or elsewhere."""


class InFlightBytes:
    """Bytes of requests received and not yet answered, per peer and in all, within two budgets: a peer
    cannot make the server buffer more than its share, and all peers together no more than the total."""

    def __init__(self, per_peer: int, total: int):
        self.per_peer, self.total = per_peer, total
        self.held = 0
        self.by_peer: Counter[PeerID] = Counter()

    def hold(self, peer: PeerID, nbytes: int) -> None:
        if self.by_peer[peer] + nbytes > self.per_peer:
            raise Overloaded(f"your requests in flight exceed {self.per_peer} bytes; wait for the previous ones")
        if self.held + nbytes > self.total:
            raise Overloaded("this server is receiving too many large requests; try again later")
        self.held += nbytes
        self.by_peer[peer] += nbytes

    def release(self, peer: PeerID, nbytes: int) -> None:
        if not nbytes:
            return
        self.held -= nbytes
        self.by_peer[peer] -= nbytes
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]


class HeldBytes:
    """What one request (or one session's current step) holds of a peer's in-flight budget."""

    def __init__(self, budget: InFlightBytes, peer: PeerID):
        self.budget, self.peer = budget, peer
        self.nbytes = 0

    def hold(self, nbytes: int) -> None:
        self.budget.hold(self.peer, nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        self.budget.release(self.peer, self.nbytes)
        self.nbytes = 0


class TransformerConnectionHandler(ServicerBase):
    """Serves one span of blocks. The class name is part of the wire protocol's handle names."""

    def __init__(
        self,
        backend: SpanBackend,
        dht_prefix: str,
        cache_pool: KVCachePool,
        *,
        max_length: int,
        max_alloc_timeout: float = 600.0,
        step_timeout: float = 300.0,
        max_tokens_per_request: int = 8192,
        dht_client_mode: bool = False,
        max_kept_activation_bytes: int = 256 * 2**20,  # forwards kept for their backward (training)
        session_timeout: float = 3600.0,  # a whole inference session, besides each step's step_timeout
        max_sessions_per_peer: int = 64,  # a chat site serves all its users from one peer
        max_active_requests: int = 1024,  # requests and sessions in flight, all peers together
        max_stream_bytes: int = 2 * 2**30,  # requests received and not yet answered, all peers together
        max_stream_bytes_per_peer: int = 2**30,
        max_pushes: int = 64,  # server-to-server pushes in flight; when full, steps are not pushed
        push_timeout: float = 10.0,
        max_cache_share_per_peer: float = 0.75,  # of the cache pool for one peer (a chat site is one peer)
    ):
        self.backend = backend
        self.dht_prefix = dht_prefix
        self.cache_pool = cache_pool
        self.max_length = max_length
        self.max_alloc_timeout = max_alloc_timeout
        self.step_timeout = step_timeout
        self.max_tokens_per_request = max_tokens_per_request
        self.dht_client_mode = dht_client_mode
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # All torch work goes through the batcher; a stacked forward carries no more tokens than one request.
        self.batcher = StepBatcher(backend, self.executor, max_batch_tokens=max_tokens_per_request)
        self.accepting = True
        self.active_requests = 0
        self.p2p: P2P | None = None
        self._sessions: dict[str, _Session] = {}  # by session_id, for rpc_push
        self._pushes: set[asyncio.Task] = set()
        self._session_tasks: set[asyncio.Task] = set()  # open inference streams, for end_sessions
        self._ending: str | None = None  # why end_sessions() ended them
        self.activations = ActivationStore(max_kept_activation_bytes, max_kept_activation_bytes // 2)
        self.steps_served = 0
        self.tokens_served = 0
        self.pushes_received = 0  # pushed steps computed here (a duplicate of a step seen already is not counted)
        self.session_timeout = session_timeout
        self.max_sessions_per_peer = max_sessions_per_peer
        self.max_active_requests = max_active_requests
        self.in_flight = InFlightBytes(max_stream_bytes_per_peer, max_stream_bytes)
        self.max_pushes = max_pushes
        self.push_timeout = push_timeout
        self._open_session_ids: set[str] = set()  # reserved from a session's first request until its end
        self._sessions_by_peer: Counter[PeerID] = Counter()
        self.max_cache_share_per_peer = max_cache_share_per_peer
        self._cache_bytes_by_peer: Counter[PeerID] = Counter()

    async def start(self, p2p: P2P) -> None:
        self.p2p = p2p
        await self.add_p2p_handlers(p2p)
        await p2p.add_binary_stream_handler(INFERENCE_HANDLE, self._serve_inference_stream)
        # hivemind's stream handlers read each message whole, however large its header says it is:
        # the streamed forward and backward are served on raw streams instead, with bounded messages.
        for method in (self.rpc_forward_stream, self.rpc_backward_stream):
            name = self._get_handle_name(None, method.__name__)
            await p2p.remove_binary_stream_handler(name)
            await p2p.add_binary_stream_handler(name, functools.partial(self._serve_request_stream, method, name))

    async def drain(self, timeout: float) -> None:
        """Refuse new work and wait (up to `timeout`) for requests in flight to finish."""
        self.accepting = False
        self.activations.clear()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.active_requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        pushes = list(self._pushes)
        for push in pushes:
            push.cancel()
        await asyncio.gather(*pushes, return_exceptions=True)
        await self.batcher.close()

    @contextlib.asynccontextmanager
    async def _request(self) -> AsyncIterator[None]:
        if not self.accepting:
            raise ShuttingDown("this server is shutting down; choose another server")
        if self.active_requests >= self.max_active_requests:
            raise Overloaded(f"this server is busy ({self.active_requests} requests in flight); try again later")
        self.active_requests += 1
        try:
            yield
        finally:
            self.active_requests -= 1

    async def _compute(self, fn: Callable[..., T], *args: Any, kind: Any = None, size: int = 1) -> T:
        """Run torch work where its measured cost says (see swarm.server.batching); `kind` None: the compute thread."""
        return await self.batcher.run(fn, *args, kind=kind, rows=size)

    # ----- validation -----

    def _parse_chain(self, uid_chain: str) -> tuple[int, int]:
        """A chain of consecutive served blocks -> (first, last + 1)."""
        if not isinstance(uid_chain, str) or len(uid_chain) > 100_000:
            raise BadRequest("uid must be a string of block uids")
        uids = split_chain(uid_chain)
        if not uids:
            raise BadRequest("the request names no blocks")
        indices = []
        for uid in uids:
            try:
                prefix, index = parse_block_uid(uid)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if prefix != self.dht_prefix or not self.backend.start <= index < self.backend.end:
                raise BadRequest(
                    f"block {uid[:100]!r} is not served here (this server holds "
                    f"{self.dht_prefix}.{self.backend.start}..{self.backend.end - 1})"
                )
            indices.append(index)
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise BadRequest("blocks in one request must be consecutive and in order")
        return indices[0], indices[-1] + 1

    def _check_hidden(self, hidden: Any, what: str = "hidden_states") -> torch.Tensor:
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[-1] != self.backend.hidden_size:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
            raise BadRequest(f"{what} must have shape (batch, tokens, {self.backend.hidden_size}), got {shape}")
        if not hidden.is_floating_point():
            raise BadRequest(f"{what} must be a floating-point tensor")
        batch, tokens = hidden.shape[:2]
        if not 1 <= batch <= MAX_BATCH_SIZE:
            raise BadRequest(f"batch size must be between 1 and {MAX_BATCH_SIZE}")
        if batch * tokens > self.max_tokens_per_request:
            raise BadRequest(f"at most {self.max_tokens_per_request} tokens per request")
        return hidden

    def _check_prompts(self, prompts: Any, hidden: torch.Tensor, num_blocks: int) -> torch.Tensor | None:
        if prompts is None or prompts.numel() == 0:
            return None
        expected = (num_blocks, hidden.shape[0], None, hidden.shape[2])
        if prompts.ndim != 4 or any(e is not None and e != s for e, s in zip(expected, prompts.shape)):
            raise BadRequest(f"prompts must have shape (blocks={num_blocks}, batch, prefix, hidden) or be empty")
        if not prompts.is_floating_point() or prompts.shape[2] > hidden.shape[1]:
            raise BadRequest("prompts must be floating-point and no longer than the sequence")
        return prompts

    @staticmethod
    def _check_hypo_ids(hypo_ids: Any, batch: int) -> torch.Tensor | None:
        if hypo_ids is None or hypo_ids.numel() == 0:
            return None
        if hypo_ids.dtype != torch.int64 or hypo_ids.shape != (batch,):
            raise BadRequest(f"hypo_ids must be an int64 tensor of shape ({batch},)")
        if hypo_ids.min() < 0 or hypo_ids.max() >= batch:
            raise BadRequest("hypo_ids must index rows of the batch")
        return hypo_ids

    # ----- rpc_info -----

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        info: dict[str, Any] = {
            "version": __version__,
            "dht_client_mode": self.dht_client_mode,
            "cache_tokens_available": self.cache_tokens_left(),
            "pushes_received": self.pushes_received,  # ours, not Petals': lets a client see pushes arrive
            "stacked_steps": self.batcher.stacked_steps,  # ours: steps computed in a batch with other sessions'
            "batches": self.batcher.batches,  # ours: forwards of inference steps, stacked or alone
        }
        if request.uid:
            first, last = self._parse_chain(request.uid)
            if last - first != 1:
                raise BadRequest("rpc_info describes one block at a time")
            info.update(self._schemas())
        return runtime_pb2.ExpertInfo(serialized_info=MSGPackSerializer.dumps(info))

    def _schemas(self) -> dict[str, Any]:
        hidden = BatchTensorDescriptor(1, self.backend.hidden_size, dtype=self.backend.dtype)
        prompts = BatchTensorDescriptor.from_tensor(torch.empty(0, dtype=self.backend.dtype))
        hypo_ids = BatchTensorDescriptor.from_tensor(torch.empty(0, dtype=torch.int64))
        return {
            "forward_schema": ((hidden,), {}),
            "outputs_schema": (hidden,),
            "keyword_names": (),
            "inference_schema": ((hidden, prompts, hypo_ids), {}),
        }

    def cache_tokens_left(self) -> int:
        """rpc_info's `cache_tokens_available`, in Petals' unit: tokens of keys and values for one block."""
        return max(self.cache_pool.bytes_left, 0) // max(self.backend.cache_bytes(1, 1, 1), 1)

    def announced_cache_tokens(self) -> int:
        """The announcement's `cache_tokens_left`, in Petals' unit: tokens of one block's keys (or values)."""
        return max(self.cache_pool.bytes_left, 0) // max(self.backend.cache_bytes(1, 1, 1) // 2, 1)

    # ----- forward / backward -----

    def _forward_inputs(self, request: runtime_pb2.ExpertRequest, tensors: list[torch.Tensor]):
        first, last = self._parse_chain(request.uid)
        metadata = loads_metadata(request.metadata)
        adapter = self._adapter(metadata)
        args = unpack_args(tensors, metadata.get("args_structure"))
        keep_id = metadata.get("keep_for_backward")
        if keep_id is not None and (not isinstance(keep_id, str) or len(keep_id) > MAX_KEEP_ID_LENGTH):
            raise BadRequest(f"keep_for_backward must be a string of at most {MAX_KEEP_ID_LENGTH} characters")
        return first, last, args, adapter, keep_id

    async def _forward(
        self, request: runtime_pb2.ExpertRequest, tensors: list[torch.Tensor], context: P2PContext
    ) -> torch.Tensor:
        first, last, args, adapter, keep_id = self._forward_inputs(request, tensors)
        if not args:
            raise BadRequest("rpc_forward needs [hidden_states, prompts]")
        hidden = self._check_hidden(args[0])
        prompts = self._check_prompts(args[1] if len(args) > 1 else None, hidden, last - first)
        if keep_id is None or not self.activations.max_bytes:
            kind, size = ("forward", first, last, prompts is not None), hidden.shape[0] * hidden.shape[1]
            forward = self.backend.forward
            return await self._compute(forward, hidden, first, last, prompts, adapter, kind=kind, size=size)
        # A training client will ask for this forward's backward: keep its graph if the budget allows.
        kept = await self._compute(self.backend.forward_for_backward, hidden, first, last, prompts, adapter)
        self.activations.put(str(context.remote_id), keep_id, kept)
        return kept.output.detach()

    async def _backward(
        self, request: runtime_pb2.ExpertRequest, tensors: list[torch.Tensor], context: P2PContext
    ) -> list[torch.Tensor]:
        first, last, args, adapter, keep_id = self._forward_inputs(request, tensors)
        if len(args) < 2:
            raise BadRequest("rpc_backward needs [hidden_states, grad_outputs, prompts]")
        hidden = self._check_hidden(args[0])
        grad_outputs = self._check_hidden(args[1], "grad_outputs")
        if grad_outputs.shape != hidden.shape:
            raise BadRequest("grad_outputs must have the shape of hidden_states")
        prompts = self._check_prompts(args[2] if len(args) > 2 else None, hidden, last - first)
        kept = self.activations.pop(str(context.remote_id), keep_id) if keep_id is not None else None
        if kept is not None and kept.matches(first, last, hidden, prompts, adapter):
            self.activations.hits += 1
            grad_hidden, grad_prompts = await self._compute(self.backend.backward_from, kept, grad_outputs)
        else:
            grad_hidden, grad_prompts = await self._compute(
                self.backend.backward, hidden, grad_outputs, first, last, prompts, adapter
            )
        return [grad_hidden] if grad_prompts is None else [grad_hidden, grad_prompts]

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        async with self._request():
            output = await self._forward(request, deserialize(request.tensors), context)
            return runtime_pb2.ExpertResponse(tensors=[serialize(output)])

    async def rpc_forward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async with self._request(), self._gather_stream(requests, context, tensors=1) as (request, tensors):
            output = await self._forward(request, tensors, context)
            for part in split_for_streaming(serialize(output), STREAM_CHUNK_BYTES):
                yield runtime_pb2.ExpertResponse(tensors=[part])

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        async with self._request():
            grads = await self._backward(request, deserialize(request.tensors), context)
            return runtime_pb2.ExpertResponse(tensors=[serialize(g) for g in grads])

    async def rpc_backward_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async with self._request(), self._gather_stream(requests, context, tensors=2) as (request, tensors):
            grads = await self._backward(request, tensors, context)
            for grad in grads:
                for part in split_for_streaming(serialize(grad), STREAM_CHUNK_BYTES):
                    yield runtime_pb2.ExpertResponse(tensors=[part])

    @contextlib.asynccontextmanager
    async def _gather_stream(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext, *, tensors: int
    ) -> AsyncIterator[tuple[runtime_pb2.ExpertRequest, list[torch.Tensor]]]:
        """Reassemble a streamed request: uid and metadata from the first part, tensors split in parts.

        Its bytes count against the in-flight budgets (this peer's and the server's) until the
        request is answered, and a stream larger than any valid request (`tensors` hidden-state
        tensors plus prompts) is refused as soon as it grows past that, before more is buffered.
        """
        max_bytes = self._max_request_bytes(tensors)
        first: runtime_pb2.ExpertRequest | None = None
        parts: list[runtime_pb2.Tensor] = []
        held = HeldBytes(self.in_flight, context.remote_id)
        try:
            async for request in requests:
                size = request.ByteSize()
                if held.nbytes + size > max_bytes:
                    raise BadRequest(
                        f"the streamed request exceeds {max_bytes} bytes, more than any valid request to these blocks"
                    )
                held.hold(size)
                first = first or request
                parts.extend(request.tensors)
                if len(parts) > MAX_STREAM_PARTS:
                    raise BadRequest("too many tensor parts in the stream")
            if first is None:
                raise BadRequest("empty request stream")
            gathered = deserialize_streamed(parts)
            del parts
            yield first, gathered
        finally:
            held.release()

    def _adapter(self, metadata: dict[str, Any]) -> str | None:
        """The request's `active_adapter` (Petals' key): a served adapter's name, or None (also for "")."""
        name = metadata.get("active_adapter")
        if name is None or name == "":
            return None
        if not isinstance(name, str):
            raise BadRequest("active_adapter must be a string (an adapter name)")
        if name not in self.backend.adapters:
            served = ", ".join(repr(a) for a in self.backend.adapters[:5]) or "none"
            if len(self.backend.adapters) > 5:
                served += f" and {len(self.backend.adapters) - 5} more"
            raise BadRequest(f"adapter {name[:200]!r} is not served here (this server serves: {served})")
        return name

    async def _serve_request_stream(
        self,
        method: Callable[[AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[Any]],
        name: str,
        stream_info: StreamInfo,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """A hivemind protobuf stream (same bytes), read one bounded message at a time as the method asks."""
        context = P2PContext(handle_name=name, local_id=self.p2p.peer_id, remote_id=stream_info.peer_id)

        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while True:
                request = await read_message(reader, runtime_pb2.ExpertRequest, MAX_STREAM_MESSAGE_BYTES)
                if request is None:
                    return
                yield request

        try:
            async for response in method(requests(), context):
                await write_message(writer, response)
        except (asyncio.IncompleteReadError, ConnectionError, RemoteError):
            writer.close()  # the client went away (or gave up)
        except Exception as e:
            if not isinstance(e, (BadRequest, FrameError, ShuttingDown, Overloaded)):
                logger.warning("%s from %s failed", name, stream_info.peer_id, exc_info=True)
            await _report(writer, str(e))
            await close_when_peer_ends(reader, writer, MAX_STREAM_MESSAGE_BYTES, until_eof=True)
        else:
            writer.close()

    # ----- inference -----

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A step pushed by the previous server of a chain: computed at once, answered on the session's stream."""
        async with self._request():
            metadata = loads_metadata(request.metadata)
            session_id = metadata.get("session_id")
            session = self._sessions.get(session_id) if isinstance(session_id, str) else None
            if session is None:  # as Petals does: the session may have ended, or never been opened here
                logger.debug("Ignoring a push from %s for an unknown session", context.remote_id)
                return runtime_pb2.ExpertResponse()
            if session.previous_server is None or str(context.remote_id) != session.previous_server:
                # Anyone who once learned the session id (an earlier server of the chain, one the client has
                # replaced since) could otherwise inject or rewind this session's steps.
                logger.debug("Ignoring a push from %s: not this session's previous server", context.remote_id)
                return runtime_pb2.ExpertResponse()
            await self._inference_step(session, request, metadata, pushed=True)
            return runtime_pb2.ExpertResponse()

    async def _serve_inference_stream(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """rpc_inference: one stream per session, read and written frame by frame (see swarm.streams)."""
        max_bytes = self._max_request_bytes()
        peer_ended = errored = False
        task = asyncio.current_task()
        self._session_tasks.add(task)
        try:
            async with self._request():
                with self._peer_session(stream_info.peer_id):
                    peer_ended = await self._run_session(stream_info.peer_id, reader, writer)
        except asyncio.CancelledError:
            if self._ending is None:
                raise
            errored = True  # ended by end_sessions(): the client is told why
            await _report(writer, self._ending)
        except (asyncio.IncompleteReadError, ConnectionError):
            peer_ended = True  # the client went away; its cache was freed on the way out
        except (BadRequest, FrameError, CacheAllocationError, ShuttingDown, BatcherClosed, Overloaded) as e:
            errored = True
            await _report(writer, str(e))
        except Exception as e:
            errored = True
            logger.warning("Inference session from %s failed", stream_info.peer_id, exc_info=True)
            await _report(writer, f"{type(e).__name__}: {e}")
        finally:
            self._session_tasks.discard(task)
            if peer_ended:
                writer.close()
            else:
                # After an error frame, wait for the client's close: its end-of-stream may have crossed our error.
                await close_when_peer_ends(reader, writer, max_bytes, until_eof=errored)

    async def end_sessions(self, reason: str) -> None:
        """End every open inference session, telling its client `reason` (clients replay elsewhere): once they
        are gone nothing holds this handler's blocks or caches, so a server moving to other blocks frees them
        before it loads the new ones."""
        self._ending = reason
        tasks = list(self._session_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @contextlib.contextmanager
    def _peer_session(self, peer: PeerID) -> Iterator[None]:
        """Count one open inference stream against its peer's limit."""
        if self._sessions_by_peer[peer] >= self.max_sessions_per_peer:
            raise Overloaded(
                f"you have {self._sessions_by_peer[peer]} inference sessions open on this server, the most allowed "
                f"per peer ({self.max_sessions_per_peer}); close one first"
            )
        self._sessions_by_peer[peer] += 1
        try:
            yield
        finally:
            self._sessions_by_peer[peer] -= 1
            if self._sessions_by_peer[peer] <= 0:
                del self._sessions_by_peer[peer]

    async def _run_session(self, peer: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one session; True if it ended with the client's end-of-stream (nothing more to read).

        Each request's bytes count against the in-flight budgets from its frame header until its step is
        answered; after the first step, a frame may be no larger than a valid step of this session.
        """
        held = HeldBytes(self.in_flight, peer)
        try:
            return await self._serve_session(peer, reader, writer, held)
        finally:
            held.release()

    async def _serve_session(
        self, peer: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: HeldBytes
    ) -> bool:
        deadline = asyncio.get_running_loop().time() + self.session_timeout
        request = await self._next_request(reader, held, self._max_request_bytes(), deadline)
        if request is None:
            return True
        first, last = self._parse_chain(request.uid)
        metadata = loads_metadata(request.metadata)
        adapter = self._adapter(metadata)
        max_length = metadata.get("max_length")
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise BadRequest("the first inference request must set max_length (an integer)")
        if not 0 < max_length <= self.max_length:
            raise BadRequest(f"max_length must be between 1 and {self.max_length}, got {max_length}")
        alloc_timeout = _bounded_float(metadata.get("alloc_timeout", 0.0), 0.0, self.max_alloc_timeout)
        session_id = metadata.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or len(session_id) > MAX_SESSION_ID_LENGTH):
            raise BadRequest(f"session_id must be a string of at most {MAX_SESSION_ID_LENGTH} characters")
        if not request.tensors:
            return False
        batch_size = self._check_hidden(deserialize(request.tensors)[0]).shape[0]
        if session_id is not None and session_id in self._open_session_ids:
            raise BadRequest(f"an inference session with session_id {session_id!r} is already open on this server")

        nbytes = self.backend.cache_bytes(last - first, batch_size, max_length)
        with self._session_id_reserved(session_id), self._peer_cache(peer, nbytes):
            async with self.cache_pool.reserve(nbytes, alloc_timeout):
                cache = await self._compute(self.backend.new_cache, first, last - first, batch_size, max_length)
                session = _Session(cache, first, last, max_length, batch_size, writer, adapter=adapter)
                if session_id is not None:
                    self._sessions[session_id] = session  # so that the previous server can push steps here
                try:
                    while request is not None and request.tensors:  # a request without tensors ends the session
                        try:
                            response = await self._inference_step(session, request, metadata)
                        finally:
                            held.release()
                        if response is not None:
                            await write_message(writer, response)
                        request = await self._next_request(reader, held, self._step_request_bytes(session), deadline)
                        metadata = loads_metadata(request.metadata) if request is not None else {}
                finally:
                    if session_id is not None and self._sessions.get(session_id) is session:
                        del self._sessions[session_id]
                    await session.close()  # a step still being applied (a push) finishes before the cache goes
                    self.batcher.session_closed(cache)
        return request is None

    @contextlib.contextmanager
    def _peer_cache(self, peer: PeerID, nbytes: int) -> Iterator[None]:
        """Count a session's cache against its peer's share of the pool, so one peer cannot hold all of it."""
        share = int(self.cache_pool.capacity_bytes * self.max_cache_share_per_peer)
        if self._cache_bytes_by_peer[peer] + nbytes > share:
            unit = max(self.backend.cache_bytes(self.backend.end - self.backend.start, 1, 1), 1)
            raise Overloaded(
                f"your sessions here would hold {(self._cache_bytes_by_peer[peer] + nbytes) // unit} tokens of "
                f"attention cache, more than one peer's share ({share // unit}); close a session first"
            )
        self._cache_bytes_by_peer[peer] += nbytes
        try:
            yield
        finally:
            self._cache_bytes_by_peer[peer] -= nbytes
            if self._cache_bytes_by_peer[peer] <= 0:
                del self._cache_bytes_by_peer[peer]

    @contextlib.contextmanager
    def _session_id_reserved(self, session_id: str | None) -> Iterator[None]:
        if session_id is None:
            yield
            return
        self._open_session_ids.add(session_id)
        try:
            yield
        finally:
            self._open_session_ids.discard(session_id)

    async def _next_request(
        self, reader: asyncio.StreamReader, held: HeldBytes, max_bytes: int, deadline: float
    ) -> runtime_pb2.ExpertRequest | None:
        """The session's next request, its bytes `held` from its header on (the caller releases them)."""
        left = deadline - asyncio.get_running_loop().time()
        session_over = BadRequest(
            f"the inference session reached this server's limit of {self.session_timeout:g} s; "
            "open a new session to continue"
        )
        if left <= 0:
            raise session_over
        try:
            async with asyncio.timeout(min(self.step_timeout, left)):
                return await read_message(reader, runtime_pb2.ExpertRequest, max_bytes, held.hold)
        except TimeoutError:
            if left <= self.step_timeout:
                raise session_over from None
            raise BadRequest(f"no inference step for {self.step_timeout:.0f} s; session closed") from None

    def _max_request_bytes(self, tensors: int = 1) -> int:
        """The largest valid request: `tensors` full tensors of hidden states plus one prompt per block."""
        hidden_bytes = self.max_tokens_per_request * self.backend.hidden_size * 4
        return hidden_bytes * (tensors + self.backend.end - self.backend.start) + REQUEST_OVERHEAD_BYTES

    def _step_request_bytes(self, session: _Session) -> int:
        """The largest valid next step of an open session: its rows over at most its max_length (a step may
        rewind), with deep prompts only if an earlier step carried some (Petals' clients send them each step)."""
        if not session.steps_computed:
            return self._max_request_bytes()  # (an opening empty step says nothing of the next)
        tokens = min(self.max_tokens_per_request, session.batch_size * session.max_length)
        hidden_bytes = tokens * self.backend.hidden_size * 4
        blocks = session.last - session.first if session.uses_prompts else 0
        return hidden_bytes * (1 + blocks) + REQUEST_OVERHEAD_BYTES

    async def _inference_step(
        self, session: _Session, request: runtime_pb2.ExpertRequest, metadata: dict[str, Any], pushed: bool = False
    ) -> runtime_pb2.ExpertResponse | None:
        """One step of a session, from its client or pushed; None if this step was computed already.

        The step is applied by a task of its own that the requester only waits for: a request cancelled
        mid-step (a push whose sender timed out, a stream torn down) cannot stop it between advancing the
        cache and recording the step id, so each step is applied exactly once, whichever copy comes first.
        """
        applying = asyncio.ensure_future(self._apply_step(session, request, metadata, pushed))
        session.track(applying)
        return await asyncio.shield(applying)

    async def _apply_step(
        self, session: _Session, request: runtime_pb2.ExpertRequest, metadata: dict[str, Any], pushed: bool
    ) -> runtime_pb2.ExpertResponse | None:
        """The serialized path of every change to a session's state (see `_inference_step`)."""
        async with session.lock:  # a pushed step and the client's steps never interleave
            if session.closed:
                return None
            if session.broken is not None:
                raise BadRequest(
                    f"an earlier step of this session failed while it computed ({session.broken[:200]}); its "
                    "attention cache cannot be trusted: open a new session"
                )
            step_id = metadata.get("step_id")
            if step_id is not None:
                if isinstance(step_id, bool) or not isinstance(step_id, (str, int, bytes)):
                    raise BadRequest("step_id must be a string or an integer")
                if isinstance(step_id, (str, bytes)) and len(step_id) > MAX_STEP_ID_LENGTH:
                    raise BadRequest(f"step_id must be at most {MAX_STEP_ID_LENGTH} characters")  # kept per session
                if step_id in session.seen_steps:
                    return None  # the other copy (pushed or the client's) came first
            if metadata.get("next_servers"):
                _check_next_servers(metadata["next_servers"], session.last)
            if not pushed and "previous_server" in metadata:  # only the session's client says who may push
                previous = metadata["previous_server"]
                session.previous_server = None if previous is None else _check_peer_id(previous, "previous_server")
            cache = session.cache
            args = unpack_args(deserialize(request.tensors), metadata.get("args_structure"))
            hidden = self._check_hidden(args[0])
            if hidden.shape[0] != session.batch_size:
                raise BadRequest(f"this session's batch size is {session.batch_size}, got {hidden.shape[0]}")
            prompts = self._check_prompts(args[1] if len(args) > 1 else None, hidden, session.last - session.first)
            session.uses_prompts = session.uses_prompts or prompts is not None
            hypo_ids = self._check_hypo_ids(args[2] if len(args) > 2 else None, session.batch_size)
            start_from = metadata.get("start_from_position")
            if start_from is not None and (
                isinstance(start_from, bool) or not isinstance(start_from, int) or not 0 <= start_from <= cache.position
            ):
                raise BadRequest(f"start_from_position must be an integer between 0 and {cache.position}")
            position = cache.position if start_from is None else start_from
            if position + hidden.shape[1] > session.max_length:
                raise BadRequest(
                    f"this step would reach {position + hidden.shape[1]} tokens, "
                    f"past the session's max_length={session.max_length}"
                )
            if hidden.shape[1] == 0:
                # Petals clients may open a session with an empty step; later ones would only keep an idle
                # session (and its cache) alive past the step timeout.
                if session.steps_computed or session.empty_step_seen:
                    raise BadRequest("inference steps must carry at least one token")
                session.empty_step_seen = True
                cache.position = position
                output = hidden
            else:
                cache.position = position
                try:
                    output = await self.batcher.step(hidden, cache, prompts, hypo_ids, session.adapter)
                except Exception as e:
                    # The step may have reordered the cache (beam search) or written part of it: applying it
                    # again would not give what applying it once gives. The client replays on a new session.
                    session.broken = f"{type(e).__name__}: {e}"
                    raise
                session.steps_computed += 1
            if step_id is not None:  # only now: a step that failed may still come again
                session.seen_steps[step_id] = None
                if len(session.seen_steps) > MAX_SEEN_STEPS:
                    session.seen_steps.popitem(last=False)
            self.steps_served += 1
            self.tokens_served += hidden.shape[0] * hidden.shape[1]
            serialized = serialize(output)  # once, for the client's answer and the push
            if metadata.get("next_servers") and prompts is None:
                if len(self._pushes) < self.max_pushes:
                    push = asyncio.create_task(self._push_outputs(serialized, request, metadata))
                    self._pushes.add(push)
                    push.add_done_callback(self._pushes.discard)
                else:  # the client sends the step to the next server itself anyway
                    logger.debug("Not pushing a step: %d pushes are in flight already", len(self._pushes))
            response = runtime_pb2.ExpertResponse(tensors=[serialized])
            if pushed:  # the client's own copy of this step will be dropped: the outputs go to it from here
                self.pushes_received += 1
                with contextlib.suppress(Exception):  # a client gone meanwhile: its stream's end closes the session
                    await write_message(session.writer, response)
            return response

    async def _push_outputs(
        self, output: runtime_pb2.Tensor, request: runtime_pb2.ExpertRequest, metadata: dict[str, Any]
    ) -> None:
        """Send this step's outputs straight to the next server of the chain (server-to-server).

        The pushed request is the step as the client would send it to that server (same step_id,
        so whichever copy arrives second is dropped there).
        """
        try:
            next_servers = metadata["next_servers"]
            peer_id, session_id, start, end = next_servers[0]
            pushed = runtime_pb2.ExpertRequest(
                uid=join_chain(block_uids(self.dht_prefix, int(start), int(end))),
                tensors=[output, *request.tensors[1:]],
                metadata=dumps_metadata(
                    {**metadata, "session_id": session_id, "next_servers": next_servers[1:], "pushed": True}
                ),
            )
            stub = self.get_stub(self.p2p, PeerID.from_base58(peer_id))
            await asyncio.wait_for(stub.rpc_push(pushed, timeout=self.push_timeout), self.push_timeout)
        except Exception as e:  # the client still sends the step itself; a failed push only costs time
            logger.debug("Push to the next server failed: %s", e)


async def _report(writer: asyncio.StreamWriter, text: str) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already (then the wait for its close ends at once)
        await write_error(writer, text)


def _bounded_float(value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRequest("expected a number")
    return min(max(float(value), low), high)


async def fetch_server_info(p2p: P2P, peer_id: PeerID, uid: str = "", timeout: float = 20.0) -> dict[str, Any]:
    """A server's `rpc_info` answer, decoded (empty uid: the server's own figures, no block schemas)."""
    stub = TransformerConnectionHandler.get_stub(p2p, peer_id)
    answer = await asyncio.wait_for(stub.rpc_info(runtime_pb2.ExpertUID(uid=uid), timeout=timeout), timeout)
    return MSGPackSerializer.loads(answer.serialized_info)
