"""Reading and writing swarm state in the hivemind DHT (PROTOCOL.md, "Block announcements").

The coroutines named `_..._in_dht` run inside the DHT process (`DHT.run_coroutine`), so that
large raw answers are parsed where they arrive and only validated results cross the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from multiprocessing import forkserver
from multiprocessing.process import AuthenticationString
from pathlib import Path
from typing import Any

import msgpack
from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.traverse import traverse_dht
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm import msgpack_limits
from swarm.data_structures import ModelInfo, RemoteSpanInfo, ServerInfo, ServerState
from swarm.names import MODELS_INDEX_KEY, block_uid, is_private_prefix, is_valid_dht_prefix
from swarm.process_locks import hivemind_locks, install_in_hivemind, use_in_hivemind
from swarm.relays import relay_p2pd_flags, set_p2pd_flags

logger = logging.getLogger(__name__)
install_in_hivemind()  # a DHT process killed mid-reply must not wedge every later DHT of this program
msgpack_limits.install()  # a stranger's deeply nested value must not crash this process

# A stranger can announce any number of fake peers; beyond this many per model (per `SpanBuilder`: one
# `fetch_swarm`, or one crawl part) the rest are counted as invalid, not kept. It bounds memory, not the
# swarm: it is per model, so 20,000 honest servers over 10 models are far below it.
MAX_PEERS_PER_MODEL = 20_000
# hivemind's msgpack extension code for a dictionary value (DictionaryDHTValue), as it travels in rpc_find.
DICTIONARY_EXT_CODE = MSGPackSerializer._ext_types[DictionaryDHTValue]
MAX_INDEXED_MODELS = 1_000
DHT_START_TIMEOUT = 120.0  # seconds for a DHT peer to start and join; p2pd has its own, shorter startup timeout
ORPHAN_POLL_SECONDS = 0.5  # how often a DHT process checks that its owner is alive
ORPHAN_GRACE_SECONDS = 5.0  # after its owner is gone, how long a DHT process may take to stop before SIGKILL
READY_POLL_SECONDS = 0.5  # while a DHT process starts, how often its owner checks that it has not died

# DHT processes are forked by multiprocessing's fork server, a single-threaded process that has hivemind
# loaded (it is started with the first DHT of a program), not by their owner: a fork copies the locks the
# owner's other threads hold at that instant (a web server's, Celery's), and a child that needs one hangs.
_FORK_SERVER = multiprocessing.get_context("forkserver")
_FORK_SERVER.set_forkserver_preload([__name__])


def start_fork_server() -> None:
    """Start the fork server now: it spends seconds importing hivemind and torch, which then overlap with the
    caller's own start-up (a block server's reachability check) instead of delaying its first DHT."""
    forkserver.ensure_running()


@dataclasses.dataclass
class SwarmView:
    """The servers of one model as read from the DHT."""

    prefix: str
    num_blocks: int
    spans: dict[str, RemoteSpanInfo]  # by peer id (base58)
    invalid_entries: int = 0
    fetched_at: float = 0.0

    def online_spans(self) -> list[RemoteSpanInfo]:
        return [span for span in self.spans.values() if span.state == ServerState.ONLINE]

    def coverage(self, state: ServerState = ServerState.ONLINE) -> list[int]:
        """How many servers in `state` hold each block."""
        counts = [0] * self.num_blocks
        for span in self.spans.values():
            if span.state == state:
                for index in range(span.start, span.end):
                    counts[index] += 1
        return counts

    def missing_blocks(self) -> list[int]:
        return [index for index, count in enumerate(self.coverage()) if count == 0]


@dataclasses.dataclass(frozen=True)
class RelaySettings:
    """A peer's libp2p relay settings (PROTOCOL.md, "Reachability and relays").

    - `use_relay`: dial peers through relays, accept relayed connections and relay for others (p2pd does
      all three or none); on by default. The relay service runs on peers that see themselves as public.
    - `serve_through`: relays to reserve a slot on and announce ourselves through (a peer behind NAT).
    - `public`: this peer is reachable directly (a bootstrap peer, a server whose check said so): tells
      p2pd's AutoNAT so instead of waiting for it to find out, which starts the relay service at once.
    """

    use_relay: bool = True
    serve_through: tuple[str, ...] = ()
    public: bool = False

    def p2p_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"use_relay": self.use_relay}
        if self.serve_through:
            kwargs.update(use_auto_relay=True, trusted_relays=list(self.serve_through), force_reachability="private")
        elif self.public:
            kwargs["force_reachability"] = "public"
        return kwargs

    def p2pd_flags(self) -> dict[str, Any]:
        return relay_p2pd_flags(use_relay=self.use_relay, static_relays=bool(self.serve_through))


def create_dht(
    initial_peers: Sequence[str],
    *,
    client_mode: bool,
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",),
    announce_maddrs: Sequence[str] | None = None,
    identity_path: str | None = None,
    relay: RelaySettings | None = None,
) -> DHT:
    """Start a hivemind DHT peer (a child process with its own p2pd) that exits with its parent."""
    return OwnedDHT(
        initial_peers=list(initial_peers),
        client_mode=client_mode,
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
        identity_path=identity_path,
        relay=relay,
    )


class OwnedDHT(DHT):
    """hivemind's DHT process, owned by the process that starts it: only the owner stops it, and it never
    outlives the owner.

    - It is started by the fork server (see _FORK_SERVER), with the owner's logging levels and format and
      its MPFuture locks (swarm.process_locks). Coroutines passed to `run_coroutine` are imported there by
      name: their modules must import without the owner's set-up (no Django models).
    - It runs in a session of its own, with its p2pd. A signal to the owner's process group (Ctrl-C,
      systemd, `timeout`, `kill -TERM -- -PGID`) reaches the owner alone, which can still use the DHT to
      say goodbye (a server announces OFFLINE) before shutting it down. Were p2pd in the owner's group,
      it would die first and the DHT's own shutdown would hang on it.
    - SIGTERM (hivemind's "hard way", multiprocessing's exit handler) stops it together with its p2pd.
    - A thread notices when the owner is gone (even SIGKILLed) and stops it together with its p2pd.
    """

    _start_method = "forkserver"

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        _use_multiprocessing_key(multiprocessing.current_process())
        _use_multiprocessing_key(process_obj)
        return _FORK_SERVER.Process._Popen(process_obj)

    def __init__(
        self, *args: Any, start_timeout: float = DHT_START_TIMEOUT, relay: RelaySettings | None = None, **kwargs: Any
    ):
        self._owner = _process_identity(os.getpid())
        self._owner_logging = _logging_setup()
        self._locks = hivemind_locks()
        relay = relay or RelaySettings()
        self._p2pd_flags = relay.p2pd_flags()  # set in the DHT process, which starts the p2pd
        super().__init__(*args, start=False, **relay.p2p_kwargs(), **kwargs)
        try:
            self.start()
            self._wait_until_ready(start_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _wait_until_ready(self, timeout: float) -> None:
        """hivemind's wait, but a DHT process that died on its way up is an error at once, not at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._ready.result(timeout=max(0.0, min(READY_POLL_SECONDS, deadline - time.monotonic())))
            except TimeoutError:
                if not self.is_alive():
                    raise RuntimeError(f"the DHT process exited with code {self.exitcode} as it started") from None
                if time.monotonic() >= deadline:
                    raise

    def shutdown(self) -> None:
        """hivemind's shutdown, and a SIGKILL to the process and its p2pd if they are still there after it
        (a wedged event loop never runs the SIGTERM handler)."""
        super().shutdown()
        if self.pid is None:  # never started
            return
        self.join(ORPHAN_GRACE_SECONDS)
        if self.is_alive():
            logger.warning("The DHT process did not stop; killing it and its p2pd")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # its session's group: itself and its p2pd
            self.kill()  # in case it had not made its own group yet
            self.join(ORPHAN_GRACE_SECONDS)

    def run(self) -> None:
        os.setsid()
        signal.set_wakeup_fd(-1)  # whatever the process that forked it had set is not ours to write to
        signal.signal(signal.SIGTERM, _stop_own_group)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _use_logging_setup(self._owner_logging)
        use_in_hivemind(self._locks)  # results travel to the owner through pipes other DHT processes share
        threading.Thread(target=_stop_when_orphaned, args=(self._owner,), name="owner-watch", daemon=True).start()
        set_p2pd_flags(self._p2pd_flags)  # this process starts the peer's p2pd
        super().run()


def _use_multiprocessing_key(process: Any) -> None:
    """The same key, as multiprocessing's own type. billiard (Celery's pool) makes itself the current process,
    with a key of its type, which multiprocessing refuses to pass to a process it starts."""
    key = process._config.get("authkey")
    if key is not None and type(key) is not AuthenticationString:
        process._config["authkey"] = AuthenticationString(bytes(key))


def _process_identity(pid: int) -> tuple[int, str] | None:
    """A running process's pid and start time (a pid alone may be reused); None once it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, *fields = stat[stat.rindex(")") + 2 :].split()
    if state in ("Z", "X"):  # exited, not yet reaped
        return None
    return pid, fields[18]  # field 22 of proc(5), starttime


def _logging_setup() -> tuple[int, int, logging.Formatter | None]:
    """What a DHT process needs to log as its owner does: the root and hivemind levels, the root's format."""
    root = logging.getLogger()
    formatters = [handler.formatter for handler in root.handlers if type(handler.formatter) is logging.Formatter]
    return root.level, logging.getLogger("hivemind").level, formatters[0] if formatters else None


def _use_logging_setup(setup: tuple[int, int, logging.Formatter | None]) -> None:
    root_level, hivemind_level, formatter = setup
    root = logging.getLogger()
    if formatter is not None and not root.handlers:
        handler = logging.StreamHandler()  # the owner's stderr: the fork server inherited it
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(root_level)
    logging.getLogger("hivemind").setLevel(hivemind_level)


def _forget_inherited_fork_server() -> None:
    """In a process forked from an owner (a Celery pool process): its fork server is the parent's child,
    which multiprocessing cannot check on from here (waitpid fails); this process starts one of its own."""
    server = forkserver._forkserver
    if getattr(server, "_forkserver_pid", None) is None:  # none started (or another Python's internals)
        return
    with contextlib.suppress(OSError):
        os.close(server._forkserver_alive_fd)  # the parent's fork server need not wait for this process
    server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None
    server._lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_inherited_fork_server)


def _stop_own_group(*_: Any) -> None:
    """SIGTERM: stop this process and everything it started (p2pd), which share its process group."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(0, signal.SIGTERM)


def _stop_when_orphaned(owner: tuple[int, str] | None) -> None:
    while owner is not None and _process_identity(owner[0]) == owner:
        time.sleep(ORPHAN_POLL_SECONDS)
    logger.warning("The process that started this DHT peer is gone; shutting the peer down")
    os.killpg(0, signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_SECONDS)  # the SIGTERM handler runs on the main thread, unless it is stuck
    os.killpg(0, signal.SIGKILL)


def dht_start_error(error: Exception, initial_peers: Sequence[str], host_maddrs: Sequence[str]) -> str:
    """One line saying why a DHT peer could not start (p2pd's errors name no option)."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    text = re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", text)  # p2pd's timestamp
    if "address already in use" in text:
        return f"--host-maddrs {' '.join(host_maddrs)}: the address is already in use ({text})"
    if "failed to listen" in text:
        return f"--host-maddrs {' '.join(host_maddrs)}: cannot listen there ({text})"
    return (
        f"could not join the swarm through {', '.join(initial_peers) or 'no initial peers'}: {text}. "
        "Check the addresses (the /p2p/ part too) and that this machine can reach them."
    )


def announce_blocks(
    dht: DHT,
    prefix: str,
    block_indices: Sequence[int],
    info: ServerInfo,
    expiration_time: float,
    wait: bool = True,
) -> Any:
    """Store `info` under every block of the span, subkey = this peer's id."""
    uids = [block_uid(prefix, index) for index in block_indices]
    return dht.run_coroutine(
        partial(_store_announcements_in_dht, uids=uids, value=info.to_tuple(), expiration_time=expiration_time),
        return_future=not wait,
    )


async def _store_announcements_in_dht(
    dht: DHT, node: DHTNode, *, uids: list[str], value: tuple, expiration_time: float
) -> dict:
    peer_id = dht.peer_id.to_base58()
    return await node.store_many(
        keys=uids,
        subkeys=[peer_id] * len(uids),
        values=[value] * len(uids),
        expiration_time=expiration_time,
        num_workers=min(len(uids), 32),
    )


def announce_model(dht: DHT, prefix: str, info: ModelInfo, expiration_time: float, wait: bool = True) -> Any:
    """Add the model to the `_petals.models` index (skipped for private prefixes)."""
    if is_private_prefix(prefix):
        return None
    return dht.store(
        MODELS_INDEX_KEY, subkey=prefix, value=info.to_dict(), expiration_time=expiration_time, return_future=not wait
    )


def fetch_swarm(
    dht: DHT, prefix: str, num_blocks: int, *, start: int = 0, end: int | None = None, wait: bool = True
) -> Any:
    """Read the announcements for blocks [start, end) of a model and build per-server spans."""
    end = num_blocks if end is None else end
    return dht.run_coroutine(
        partial(fetch_swarm_in_dht, prefix=prefix, num_blocks=num_blocks, start=start, end=end),
        return_future=not wait,
    )


async def fetch_swarm_in_dht(
    dht: DHT, node: DHTNode, *, prefix: str, num_blocks: int, start: int, end: int
) -> SwarmView:
    entries = await read_block_entries(node, prefix, start, end)
    view = spans_from_entries(prefix, num_blocks, start, entries)
    view.fetched_at = get_dht_time()
    return view


async def read_block_entries(node: DHTNode, prefix: str, start: int, end: int) -> dict[str, RawEntry | str | None]:
    """Blocks [start, end) of a model as `read_raw_entries` gives them, in block order."""
    uids = [block_uid(prefix, index) for index in range(start, end)]
    return await read_raw_entries(node, uids) if uids else {}


# ----- reading block announcements, values left encoded -----
#
# hivemind's `get_many` decodes every subkey of a block into objects (a heap entry, a ValueWithExpiration
# and the decoded value per server and block: 280,000 of each for 20,000 servers), though a server announces
# the same bytes on each of its blocks. This read asks the same peers (hivemind's traversal and blacklist)
# but keeps each subkey's value as the bytes it was stored as, so that the parser decodes and validates
# each distinct value once. Like a crawler's `get` it neither caches what it read nor stores it elsewhere.

RawEntry = dict[Any, tuple[bytes, float]]  # subkey -> (encoded value, expiration time)
INVALID_ENTRY = "invalid"  # a block whose value is not a dictionary (a stranger's regular value)


async def read_raw_entries(node: DHTNode, uids: list[str]) -> dict[str, RawEntry | str | None]:
    """The latest subkeys under each key (uid -> {subkey: (value bytes, expiration)}, INVALID_ENTRY, or None
    when nothing was found), merged over this node's storage and every peer of the search as `get_many`
    with `sufficient_expiration_time=inf` does, values left encoded."""
    key_ids = {DHTID.generate(source=uid): uid for uid in uids}
    found: dict[DHTID, RawEntry] = {key_id: {} for key_id in key_ids}
    invalid: set[DHTID] = set()
    now = get_dht_time()
    for key_id in key_ids:
        for local in (node.protocol.storage.get(key_id), node.protocol.cache.get(key_id)):
            if local is not None:
                _merge_local(found[key_id], invalid, key_id, local.value, now)
    peers: dict[DHTID, PeerID] = {}
    for key_id in key_ids:
        peers.update(
            node.protocol.routing_table.get_nearest_neighbors(key_id, node.protocol.bucket_size, exclude=node.node_id)
        )

    async def get_neighbors(peer: DHTID, queries: Any) -> dict[DHTID, tuple[tuple[DHTID, ...], bool]]:
        queries = list(queries)
        response = await _find_raw(node, peers[peer], queries)
        if response is None:
            return {query: ((), False) for query in queries}
        output = {}
        for key_id, (value, nearest) in zip(queries, response):
            peers.update(nearest)
            if value is INVALID_ENTRY:
                invalid.add(key_id)
            elif value is not None:
                _merge_items(found[key_id], value, now)
            output[key_id] = tuple(nearest), False  # every peer's subkeys count: read the whole beam
        return output

    if peers:
        await traverse_dht(
            queries=list(key_ids),
            initial_nodes=list(peers),
            beam_size=node.protocol.bucket_size,
            num_workers=min(len(key_ids), node.num_workers),
            queries_per_call=1,  # one block per request: under a flood a block's value is about 1 MB
            get_neighbors=get_neighbors,
            visited_nodes={key_id: {node.node_id} for key_id in key_ids},
        )
    return {
        uid: found[key_id] if found[key_id] else INVALID_ENTRY if key_id in invalid else None
        for key_id, uid in key_ids.items()
    }


def _merge_local(entry: RawEntry, invalid: set[DHTID], key_id: DHTID, value: Any, now: float) -> None:
    if not isinstance(value, DictionaryDHTValue):
        invalid.add(key_id)
        return
    _merge_items(entry, [(subkey, item.value, item.expiration_time) for subkey, item in value.items()], now)


def _merge_items(entry: RawEntry, items: Any, now: float) -> None:
    """Add a peer's (subkey, value bytes, expiration) items: per subkey the latest unexpired value wins."""
    for item in items:
        try:
            subkey, value, expiration = item
            if not isinstance(value, bytes) or not isinstance(expiration, (int, float)) or expiration < now:
                continue  # expired, or junk from a stranger's node: hivemind would drop it as well
            known = entry.get(subkey)
            if known is None or known[1] < expiration:
                entry[subkey] = (value, expiration)
        except (TypeError, ValueError):  # not a triple, or an unhashable subkey
            continue


async def _find_raw(node: DHTNode, peer_id: PeerID, key_ids: list[DHTID]) -> list[tuple[Any, dict]] | None:
    """One rpc_find to a peer, its dictionary values decoded only down to (subkey, bytes, expiration) items;
    None when the peer is blacklisted or failed (which blacklists it, as hivemind's own reads do)."""
    if peer_id in node.blacklist:
        return None
    protocol = node.protocol
    request = dht_pb2.FindRequest(keys=[key_id.to_bytes() for key_id in key_ids], peer=protocol.node_info)
    try:
        async with protocol.rpc_semaphore:
            response = await protocol.get_stub(peer_id).rpc_find(request, timeout=protocol.wait_timeout)
        if len(response.results) != len(key_ids):
            raise ValueError("the reply does not match the request")
        output = [(_raw_value(result), _nearest(node, result)) for result in response.results]
    except Exception:  # what hivemind does on a failed call: the peer is blacklisted for a while
        logger.debug("Reading from %s failed", peer_id, exc_info=True)
        node.blacklist.register_failure(peer_id)
        return None
    node.blacklist.register_success(peer_id)
    if response.peer and response.peer.node_id:
        asyncio.create_task(protocol.update_routing_table(DHTID.from_bytes(response.peer.node_id), peer_id))
    return output


def _raw_value(result: Any) -> Any:
    if result.type == dht_pb2.NOT_FOUND:
        return None
    if result.type != dht_pb2.FOUND_DICTIONARY:
        return INVALID_ENTRY
    try:
        ext = msgpack.unpackb(result.value, raw=False)
        if not isinstance(ext, msgpack.ExtType) or ext.code != DICTIONARY_EXT_CODE:
            return INVALID_ENTRY
        _, _, items = msgpack.unpackb(ext.data, raw=False, use_list=False, strict_map_key=False)
        return items if isinstance(items, tuple) else INVALID_ENTRY
    except Exception:  # msgpack's errors, or a stranger's odd shapes
        return INVALID_ENTRY


def _nearest(node: DHTNode, result: Any) -> dict[DHTID, PeerID]:
    nearest = {}
    for node_id, peer_id in zip(result.nearest_node_ids, result.nearest_peer_ids):
        peer = PeerID(peer_id)
        if peer not in node.blacklist:
            nearest[DHTID.from_bytes(node_id)] = peer
    return nearest


def spans_from_entries(prefix: str, num_blocks: int, start: int, entries: dict[str, Any]) -> SwarmView:
    """Turn raw per-block DHT entries (uid -> {peer id: (value bytes, expiration)}, as `read_raw_entries`
    gives them, in block order from `start`) into one span per server (see `SpanBuilder`)."""
    builder = SpanBuilder(prefix, num_blocks)
    builder.add_blocks(start, entries)
    return builder.view()


class SpanBuilder:
    """One span per server of a model, from block entries fed in any order (a crawl reads a model a few
    blocks at a time, and the reads finish in any order).

    A server's span is its announced [start_block, end_block) when both are given, else the blocks it
    appears under. Its highest announced state wins; spans of the same state join. Malformed entries are
    counted and skipped. A server announces the same bytes on each of its blocks: once its announced span is
    known, seeing that value again is one dictionary lookup and one comparison of bytes, and each distinct
    value is decoded and validated once (`_cached_parser`).
    """

    def __init__(self, prefix: str, num_blocks: int):
        self.prefix, self.num_blocks = prefix, num_blocks
        self.spans: dict[str, RemoteSpanInfo] = {}
        self.invalid_entries = 0
        self._settled: dict[Any, bytes] = {}  # peer id -> the value its announced span was taken from
        self._parse = _cached_parser()

    def add_blocks(self, start: int, entries: dict[str, Any]) -> None:
        """Entries of blocks start, start + 1, ... (uid -> entry, in block order)."""
        for offset, entry in enumerate(entries.values()):
            self.add(start + offset, entry)

    def add(self, index: int, entry: Any) -> None:
        """One block's entry: {peer id: (value bytes, expiration)}, None (nothing there) or junk."""
        if entry is None:
            return
        if not isinstance(entry, dict):
            self.invalid_entries += 1
            return
        settled = self._settled
        for peer_id, record in entry.items():
            raw = record[0] if type(record) is tuple and record and type(record[0]) is bytes else None
            if raw is not None and settled.get(peer_id) == raw:
                continue  # the value this server's announced span came from: nothing new
            self._add_record(index, peer_id, raw)

    def _add_record(self, index: int, peer_id: Any, raw: bytes | None) -> None:
        spans = self.spans
        known = spans.get(peer_id)
        try:
            if known is None and len(spans) >= MAX_PEERS_PER_MODEL:
                raise ValueError("a flood: too many servers for one model")
            if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 128:
                raise ValueError("peer id must be a short string")
            if raw is None:
                raise ValueError("not a (value, expiration) record")
            info = self._parse(raw)
            if info.end_block is not None and info.end_block > self.num_blocks:
                raise ValueError("span ends past the model's last block")
        except ValueError:
            self.invalid_entries += 1
            return
        announced = info.start_block is not None and info.end_block is not None
        start, end = (info.start_block, info.end_block) if announced else (index, index + 1)
        if merge_span(spans, RemoteSpanInfo(peer_id, start, end, info)):
            if announced:
                self._settled[peer_id] = raw
            else:
                self._settled.pop(peer_id, None)

    def view(self) -> SwarmView:
        if self.invalid_entries:
            logger.warning("Skipped %d malformed DHT entries for model %s", self.invalid_entries, self.prefix)
        return SwarmView(self.prefix, self.num_blocks, self.spans, self.invalid_entries)


def merge_span(spans: dict[str, RemoteSpanInfo], span: RemoteSpanInfo) -> bool:
    """Add a server's span seen under some blocks: its highest state wins, spans of the same state join.
    True when `span` took the place of what was known (it was new, or of a higher state)."""
    known = spans.get(span.peer_id)
    if known is None or known.state < span.state:
        spans[span.peer_id] = span
        return True
    if known.state == span.state and (span.start < known.start or span.end > known.end):
        spans[span.peer_id] = dataclasses.replace(
            known, start=min(known.start, span.start), end=max(known.end, span.end)
        )
    return False


# Parsed values shared by the reads of one crawl (`shared_parsing`): a server's blocks are read a few at a
# time, so a cache per read would still parse its value once per read.
_shared_parsed: contextvars.ContextVar[dict[bytes, ServerInfo | None] | None] = contextvars.ContextVar(
    "shared_parsed", default=None
)
MAX_SHARED_PARSED = 100_000  # distinct values kept; a stranger's endless variations are parsed, not kept


@contextlib.contextmanager
def shared_parsing() -> Iterator[None]:
    """Reads started inside (tasks created here copy the context) decode each distinct value once in all."""
    token = _shared_parsed.set({})
    try:
        yield
    finally:
        _shared_parsed.reset(token)


def _cached_parser() -> Any:
    """`ServerInfo.from_tuple` of an encoded value, each distinct value decoded and validated once per read
    (or per `shared_parsing` block)."""
    shared = _shared_parsed.get()
    parsed: dict[bytes, ServerInfo | None] = shared if shared is not None else {}

    def parse(raw: bytes) -> ServerInfo:
        try:
            info = parsed[raw]
        except KeyError:
            try:
                info = ServerInfo.from_tuple(MSGPackSerializer.loads(raw))
            except Exception:  # msgpack's errors, ValueError, a hostile ext type's own
                info = None
            if len(parsed) < MAX_SHARED_PARSED:
                parsed[raw] = info
        if info is None:
            raise ValueError("not a valid announcement")
        return info

    return parse


def fetch_model_index(dht: DHT, wait: bool = True) -> Any:
    """Read `_petals.models`: returns (models by dht_prefix, number of malformed entries)."""
    return dht.run_coroutine(fetch_model_index_in_dht, return_future=not wait)


async def fetch_model_index_in_dht(dht: DHT, node: DHTNode) -> tuple[dict[str, ModelInfo], int]:
    found = await node.get(MODELS_INDEX_KEY, latest=True)
    return parse_model_index(found.value if found is not None else None)


def parse_model_index(entry: Any) -> tuple[dict[str, ModelInfo], int]:
    models: dict[str, ModelInfo] = {}
    invalid = 0
    if entry is None:
        return models, 0
    if not isinstance(entry, dict):
        return models, 1
    for prefix, record in entry.items():
        if len(models) >= MAX_INDEXED_MODELS:
            invalid += 1
            continue
        try:
            if not is_valid_dht_prefix(prefix) or is_private_prefix(prefix):
                raise ValueError("bad prefix")
            models[prefix] = ModelInfo.from_dict(getattr(record, "value", None))
        except ValueError:
            invalid += 1
    if invalid:
        logger.warning("Skipped %d malformed entries in %s", invalid, MODELS_INDEX_KEY)
    return models, invalid
