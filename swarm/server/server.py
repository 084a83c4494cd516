"""A block server: joins the swarm, loads its span of blocks, serves them and announces itself.

Lifecycle (PROTOCOL.md, "Block announcements"): JOINING while loading, ONLINE when serving
(re-announced every `update_period`), OFFLINE after a graceful shutdown on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import random
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from hivemind import DHT
from hivemind.utils import get_dht_time
from transformers import AutoConfig

from swarm import __version__
from swarm.checkpoint import CheckpointFiles, is_local_checkpoint, missing_local_path
from swarm.data_structures import MAX_ADAPTERS, MAX_STRING_LENGTH, ModelInfo, ServerInfo, ServerState
from swarm.dht import (
    RelaySettings,
    announce_blocks,
    announce_model,
    create_dht,
    dht_start_error,
    fetch_swarm,
    start_fork_server,
)
from swarm.models.registry import dht_prefix_for, family_for, prepare_config
from swarm.names import is_private_prefix, is_valid_dht_prefix
from swarm.ping import ping_server
from swarm.relays import circuit_addresses, dial_through_relays
from swarm.server.adapters import AdapterError, adapter_folder, load_block_loras, read_lora_config
from swarm.server.backend import SpanBackend, kv_cache_bytes, load_span, span_cache_layout
from swarm.server.block_selection import block_throughputs, blocks_that_fit, choose_best_start, choose_rebalance
from swarm.server.handler import INFERENCE_HANDLE, TransformerConnectionHandler
from swarm.server.memory_cache import KVCachePool
from swarm.server.quantization import block_bytes, log_quantization, resolve_quant_type
from swarm.server.reachability import ReachabilityService, check_direct_reachability, check_reachability
from swarm.server.throughput import DEFAULT_BANDWIDTH_MBPS, loading_weights, measure_throughput

logger = logging.getLogger(__name__)

MAX_NEXT_PINGS = 8
SESSION_MOVED = "this server moved to other blocks; open the session on another server"
T = TypeVar("T")


@dataclasses.dataclass
class ServerConfig:
    model: str
    initial_peers: Sequence[str] = ()
    new_swarm: bool = False
    block_indices: tuple[int, int] | None = None
    num_blocks: int | None = None
    device: str = "auto"
    torch_dtype: str = "auto"
    quant_type: str = "auto"  # none, int8, nf4; auto: nf4 on a GPU, none on the CPU (as Petals)
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: Sequence[str] = ()
    identity_path: str | None = None
    public_name: str | None = None
    dht_prefix: str | None = None
    throughput: str | float = "auto"
    bandwidth_mbps: float = DEFAULT_BANDWIDTH_MBPS
    max_length: int = 8192
    cache_tokens: int = 16384
    update_period: float = 120.0
    max_alloc_timeout: float = 600.0
    step_timeout: float = 300.0
    session_timeout: float = 3600.0  # a whole inference session's lifetime
    max_sessions_per_peer: int = 64  # inference sessions one peer may hold open (a chat gateway is one peer)
    shutdown_timeout: float = 5.0
    revision: str | None = None
    token: str | None = None
    health_url: str | None = None  # a swarm monitor that checks we are reachable from outside
    relay: str = "auto"  # auto: serve through a relay when peers cannot dial us; always; never (nor dial relays)
    relay_timeout: float = 60.0  # seconds to get a working relay reservation before giving up
    adapters: Sequence[str] = ()  # LoRA adapters (local folders or Hub repositories) requests may choose
    balance_quality: float = 0.75  # move when the swarm's weakest block would gain past 1/this; 0: never move
    balance_check_period: float = 120.0  # mean seconds between balance checks (jittered)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"torch dtype must be one of auto, {', '.join(dtypes)}")
    return dtypes[name]


class SwarmUnreachableError(RuntimeError):
    """None of the initial peers answered, or nobody can reach this server."""


RELAY_MODES = ("auto", "always", "never")
RELAY_CHECK_PERIOD = 10.0  # seconds between a relayed server's checks that clients can still reach it
PORT_ADVICE = (
    "Forward a TCP port of your router to this machine (for example 31337) and run with "
    "--host-maddrs /ip4/0.0.0.0/tcp/31337 --announce-maddrs /ip4/YOUR_PUBLIC_IP/tcp/31337"
)


class BlockServer:
    def __init__(self, config: ServerConfig):
        if not config.new_swarm and not config.initial_peers:
            raise ValueError("give --initial-peers to join a swarm, or --new-swarm to start one")
        if config.num_blocks is not None and config.num_blocks < 1:
            raise ValueError(f"--num-blocks must be at least 1, got {config.num_blocks}")
        if config.block_indices is not None and config.block_indices[0] >= config.block_indices[1]:
            start, end = config.block_indices
            raise ValueError(f"--block-indices {start}:{end}: START must be less than END (END is exclusive)")
        if not 0.0 <= config.balance_quality <= 1.0:
            raise ValueError(f"--balance-quality must be between 0 and 1 (0: never move), got {config.balance_quality}")
        if config.relay not in RELAY_MODES:
            raise ValueError(f"--relay must be one of {', '.join(RELAY_MODES)}, got {config.relay!r}")
        if config.relay == "always" and not config.initial_peers:
            raise ValueError("--relay always needs --initial-peers: the relays are the swarm's initial peers")
        if not config.balance_check_period > 0:
            raise ValueError(f"--balance-check-period must be positive, got {config.balance_check_period}")
        missing = missing_local_path(config.model)
        if missing is not None:
            where = "" if Path(missing) == Path(config.model).expanduser() else f": there is no {missing}"
            raise ValueError(f"the model path {config.model} does not exist{where}")
        self.config = config
        self.model_config = prepare_config(
            AutoConfig.from_pretrained(config.model, revision=config.revision, token=config.token)
        )
        self.family = family_for(self.model_config)
        self.total_blocks = self.family.num_blocks(self.model_config)
        if config.block_indices is not None:  # checked before joining: nothing to announce OFFLINE
            start, end = config.block_indices
            if not 0 <= start < end <= self.total_blocks:
                raise ValueError(
                    f"--block-indices {start}:{end} must lie within 0:{self.total_blocks} "
                    f"(the model has {self.total_blocks} blocks)"
                )
        self.dht_prefix = config.dht_prefix or dht_prefix_for(config.model, self.model_config.model_type)
        if not is_valid_dht_prefix(self.dht_prefix):
            raise ValueError(f"invalid DHT prefix {self.dht_prefix!r}: it may contain neither '.' nor spaces")
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.torch_dtype, self.device)
        self.quant_type = resolve_quant_type(config.quant_type, self.device)
        self.repository = None if is_local_checkpoint(config.model) else config.model  # a Hub repository name
        self.adapters = self._find_adapters()  # before joining: a bad adapter fails fast
        self.dht: DHT | None = None
        self.using_relay = False
        self._run_identity: tempfile.TemporaryDirectory | None = None
        self.reachability_service: ReachabilityService | None = None
        self.handler: TransformerConnectionHandler | None = None
        self.start = self.end = 0
        self.rates: dict[str, float] = {}
        self.next_pings: dict[str, float] = {}
        self._stopping: asyncio.Event | None = None

    # ----- lifecycle -----

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM, then shut down gracefully."""
        asyncio.run(self._serve())

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        start_fork_server()  # (imports in the background while the reachability check runs)
        self.using_relay = await self._needs_relay()
        try:
            self.dht = self._join_swarm()
        except Exception as e:
            raise SwarmUnreachableError(dht_start_error(e, self.config.initial_peers, self.config.host_maddrs)) from e
        try:
            if self.using_relay:
                await self._confirm_relay()
            else:  # answer other peers' reachability checks, as Petals' direct servers do
                self.reachability_service = ReachabilityService(self.dht)
            for maddr in self.dht.get_visible_maddrs():
                logger.info("Server peer: %s", maddr)
            self.start, self.end = self._choose_blocks()
            logger.info(
                "Serving blocks %d:%d of %s (prefix %s) on %s in %s",
                self.start,
                self.end,
                self.config.model,
                self.dht_prefix,
                self.device,
                str(self.dtype).split(".")[-1],
            )
            await self._announce(ServerState.JOINING)
            backend = await loop.run_in_executor(None, self._load_backend)
            self.rates = await loop.run_in_executor(None, self._throughput, backend)
            await self._start_handler(backend, await self.dht.replicate_p2p())
            del backend  # the handler holds it: a move to other blocks must be able to free it
            await self._announce(ServerState.ONLINE)
            logger.info("Server is ONLINE: blocks %d:%d, peer id %s", self.start, self.end, self.dht.peer_id)
            if self.config.health_url:
                loop.run_in_executor(None, check_reachability, self.config.health_url, self.dht.peer_id.to_base58())
            await self._announce_until_stopped()
        finally:
            await self._shutdown()

    # ----- reachability -----

    async def _needs_relay(self) -> bool:
        """Should this server serve through a relay? Asks peers of the swarm to dial it back (Petals' check)."""
        config = self.config
        if config.relay == "always":
            logger.info("Serving through a relay, as --relay always asks")
            return True
        if config.new_swarm or not config.initial_peers:
            return False
        try:
            direct, checks = await check_direct_reachability(
                config.initial_peers, config.host_maddrs, config.announce_maddrs
            )
        except Exception as e:
            logger.warning("Could not check whether peers can reach this server (%s); assuming they can", e)
            return False
        if direct is None:
            logger.info("No peer answered a reachability check; assuming this server is reachable directly")
            return False
        if direct:
            logger.info("Peers of the swarm can reach this server directly (%s checks)", checks)
            return False
        if config.relay == "never":
            raise SwarmUnreachableError(
                f"peers of the swarm cannot connect to this server ({checks} could), and --relay never "
                f"forbids serving through a relay. {PORT_ADVICE}"
            )
        logger.info("Behind NAT or a firewall: peers could not connect to this server (%s could)", checks)
        return True

    def _join_swarm(self) -> DHT:
        config = self.config
        if self.using_relay:  # announce the relays' circuit addresses: ours cannot be dialed
            relay = RelaySettings(serve_through=tuple(config.initial_peers))
            announce = circuit_addresses(config.initial_peers)
        else:
            relay = RelaySettings(use_relay=config.relay != "never", public=True)
            announce = list(config.announce_maddrs)
        return create_dht(
            config.initial_peers,
            client_mode=self.using_relay,  # nobody can dial us for DHT requests either
            host_maddrs=config.host_maddrs,
            announce_maddrs=announce,
            identity_path=self._identity_path(),
            relay=relay,
        )

    def _identity_path(self) -> str | None:
        """--identity-path, or behind NAT a key of this run's own: a rejoin must keep our peer id."""
        if self.config.identity_path or not self.using_relay:
            return self.config.identity_path
        if self._run_identity is None:
            self._run_identity = tempfile.TemporaryDirectory(prefix="swarm-identity-")
        return str(Path(self._run_identity.name) / "peer.key")

    async def _confirm_relay(self) -> None:
        """Dial ourselves through our relays, as a client would; stop with advice if none carries us in time."""
        relay = await dial_through_relays(self.dht.peer_id, self.config.initial_peers, self.config.relay_timeout)
        if relay is None:
            raise SwarmUnreachableError(
                "peers of the swarm cannot connect to this server, and no relay among the initial peers took it "
                f"within {self.config.relay_timeout:.0f} s (they may not offer a relay service). {PORT_ADVICE}"
            )
        logger.info("Behind NAT: serving through relay %s (clients reach this server through it)", relay)

    async def _relay_works(self) -> bool:
        """Does a relay still carry us? One dial through each relay, as a client would."""
        try:
            return await dial_through_relays(self.dht.peer_id, self.config.initial_peers, timeout=0) is not None
        except Exception as e:
            logger.debug("Relay check failed: %r", e)
            return True  # our own probe failed, not the relay: check again later

    async def _rejoin_through_relay(self) -> None:
        """Start our DHT peer (and its p2pd) again with the same identity: a fresh reservation on the relays.

        p2pd does not reserve again by itself once its relay restarts or drops us. Inference sessions open
        through the old peer end here; their clients replay them, as after any server failure.
        """
        if self.dht is not None:
            logger.warning("Lost the relay: clients cannot reach this server. Joining the swarm again through a relay")
        loop = asyncio.get_running_loop()
        handler = self.handler  # its handlers go with the old p2pd
        old, self.dht = self.dht, None
        if old is not None:
            await loop.run_in_executor(None, old.shutdown)
        try:
            self.dht = await loop.run_in_executor(None, self._join_swarm)
        except Exception as e:
            error = dht_start_error(e, self.config.initial_peers, self.config.host_maddrs)
            logger.warning("Could not join the swarm again (%s); trying again in %.0f s", error, RELAY_CHECK_PERIOD)
            return
        if handler is not None:
            await handler.start(await self.dht.replicate_p2p())
        relay = await dial_through_relays(self.dht.peer_id, self.config.initial_peers, self.config.relay_timeout)
        if relay is None:
            logger.warning("No relay took this server yet; trying again in %.0f s", RELAY_CHECK_PERIOD)
            return
        await self._announce(ServerState.ONLINE)
        logger.info("Behind NAT: serving through relay %s again", relay)

    async def _start_handler(self, backend: SpanBackend, p2p: Any) -> None:
        pool = KVCachePool(backend.cache_bytes(self.end - self.start, 1, self.config.cache_tokens))
        self.handler = TransformerConnectionHandler(
            backend,
            self.dht_prefix,
            pool,
            max_length=self.config.max_length,
            max_alloc_timeout=self.config.max_alloc_timeout,
            step_timeout=self.config.step_timeout,
            session_timeout=self.config.session_timeout,
            max_sessions_per_peer=self.config.max_sessions_per_peer,
        )
        await self.handler.start(p2p)

    async def _announce_until_stopped(self) -> None:
        """Re-announce ONLINE every `update_period`; between, check the swarm's balance and move if it pays, and
        (behind NAT) that a relay still carries us."""
        loop = asyncio.get_running_loop()
        next_announce = loop.time() + self.config.update_period
        next_check = self._next_balance_check() if self._may_move() else math.inf
        next_relay_check = loop.time() + RELAY_CHECK_PERIOD if self.using_relay else math.inf
        while not self._stopping.is_set():
            wake = min(next_announce, next_check, next_relay_check)
            try:
                await asyncio.wait_for(self._stopping.wait(), max(wake - loop.time(), 0.0))
                break
            except TimeoutError:
                pass
            if loop.time() >= next_relay_check:
                if self.dht is None or not await self._relay_works():
                    await self._rejoin_through_relay()
                next_relay_check = loop.time() + RELAY_CHECK_PERIOD
            if self.dht is None:  # a rejoin failed: nothing to announce through until the next one works
                continue
            if loop.time() >= next_check:
                if await self._check_balance():
                    next_announce = loop.time() + self.config.update_period  # the move announced ONLINE
                next_check = self._next_balance_check()
            if loop.time() >= next_announce:
                await self._measure_next_pings()
                await self._announce(ServerState.ONLINE)
                next_announce = loop.time() + self.config.update_period

    async def _shutdown(self) -> None:
        logger.info("Shutting down: finishing requests in flight, then announcing OFFLINE")
        if self.handler is not None:
            await self.handler.drain(self.config.shutdown_timeout)
        if self.dht is not None:
            try:
                if self.end > self.start:
                    await self._announce(ServerState.OFFLINE)
                    logger.info("Announced OFFLINE: blocks %d:%d", self.start, self.end)
            except Exception as e:
                logger.warning("Could not announce OFFLINE: %s", e)
            if self.handler is not None:
                self.handler.executor.shutdown(wait=False, cancel_futures=True)
            if self.reachability_service is not None:
                self.reachability_service.shutdown()
            self.dht.shutdown()
        if self._run_identity is not None:
            self._run_identity.cleanup()
        logger.info("Server stopped")

    # ----- blocks -----

    def _choose_blocks(self) -> tuple[int, int]:
        if self.config.block_indices is not None:
            start, end = self.config.block_indices
            if not 0 <= start < end <= self.total_blocks:
                raise ValueError(f"--block-indices must lie within 0:{self.total_blocks}")
            return start, end
        count = self.config.num_blocks
        if count is None:
            layout = span_cache_layout(self.family, self.model_config, 0, 1)
            cache = kv_cache_bytes(layout, self.total_blocks, 1, self.config.cache_tokens, self.dtype)
            block = block_bytes(self.model_config, self.dtype, self.quant_type)
            count = blocks_that_fit(block, cache, self.device, self.total_blocks)
        count = max(1, min(count, self.total_blocks))
        view = fetch_swarm(self.dht, self.dht_prefix, self.total_blocks)
        start = choose_best_start(block_throughputs(view), count)
        return start, start + count

    # ----- rebalancing -----

    def _may_move(self) -> bool:
        """A span pinned with --block-indices stays; --balance-quality 0 turns moving off."""
        return self.config.block_indices is None and self.config.balance_quality > 0

    def _next_balance_check(self) -> float:
        # Jitter, so that servers started together do not check (and all move) at the same moment.
        return asyncio.get_running_loop().time() + self.config.balance_check_period * random.uniform(0.5, 1.5)

    async def _check_balance(self) -> bool:
        """Read the swarm and move to other blocks if that helps its weakest block enough; True if moved."""
        try:
            view = await fetch_swarm(self.dht, self.dht_prefix, self.total_blocks, wait=False)
        except Exception as e:
            logger.warning("Balance check: could not read the swarm: %s", e)
            return False
        others = block_throughputs(view, exclude=self.dht.peer_id.to_base58())
        throughput = float(self.rates.get("throughput", 0.0))
        decision = choose_rebalance(others, self.start, self.end, throughput, self.config.balance_quality)
        if not decision.move:
            logger.info("Balance check: staying on blocks %d:%d (%s)", self.start, self.end, decision.reason)
            return False
        return await self._move(decision.start, decision.reason)

    async def _move(self, new_start: int, reason: str) -> bool:
        """Serve the same number of blocks from `new_start` on, as the same peer; False if a rival got there first.

        Announcements stay consistent for readers, who keep each server's best state over its blocks:
        OFFLINE where we leave and JOINING where we go, ONLINE there once the new blocks are served.
        """
        old_start, old_end = self.start, self.end
        new_end = new_start + old_end - old_start
        logger.info(
            "Balance check: moving from blocks %d:%d to %d:%d: %s", old_start, old_end, new_start, new_end, reason
        )
        left = [i for i in range(old_start, old_end) if not new_start <= i < new_end]
        await self._announce(ServerState.OFFLINE, blocks=left)
        self.start, self.end = new_start, new_end
        await self._announce(ServerState.JOINING)
        # Our claim is stored; one that raced with ours is now visible to at least one of the two servers.
        # Whoever sees a rival backs off (maybe both: they try again at their next, jittered, check).
        rivals = await self._rivals_joining(new_start, new_end)
        if rivals is None or rivals:
            why = "could not read the swarm" if rivals is None else f"{', '.join(rivals)} is joining there too"
            logger.info("Balance check: staying on blocks %d:%d after all (%s)", old_start, old_end, why)
            self.start, self.end = old_start, old_end
            await self._announce(ServerState.ONLINE)
            gained = [i for i in range(new_start, new_end) if not old_start <= i < old_end]
            await self._announce(ServerState.OFFLINE, blocks=gained)
            return False
        await self._stop_handler()
        backend = await self._announcing_while(ServerState.JOINING, self._load_backend)
        await self._start_handler(backend, await self.dht.replicate_p2p())
        await self._measure_next_pings()
        await self._announce(ServerState.ONLINE)
        logger.info("Server is ONLINE again (moved): blocks %d:%d, peer id %s", self.start, self.end, self.dht.peer_id)
        return True

    async def _rivals_joining(self, start: int, end: int) -> list[str] | None:
        """Other servers joining blocks that overlap [start, end); None if the swarm could not be read."""
        try:
            view = await fetch_swarm(self.dht, self.dht_prefix, self.total_blocks, wait=False)
        except Exception as e:
            logger.warning("Balance check: could not read the swarm: %s", e)
            return None
        me = self.dht.peer_id.to_base58()
        return [
            peer
            for peer, span in view.spans.items()
            if peer != me and span.state == ServerState.JOINING and span.start < end and start < span.end
        ]

    async def _stop_handler(self) -> None:
        """Finish requests in flight (up to `shutdown_timeout`), stop serving, and free the old blocks."""
        handler, self.handler = self.handler, None
        if handler is None:
            return
        await handler.drain(self.config.shutdown_timeout)
        await handler.remove_p2p_handlers(handler.p2p)
        await handler.p2p.remove_binary_stream_handler(INFERENCE_HANDLE)
        # Sessions still open hold the old blocks and their caches: end them before the new blocks load.
        await handler.end_sessions(SESSION_MOVED)
        handler.executor.shutdown(wait=False, cancel_futures=True)
        del handler
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    async def _announcing_while(self, state: ServerState, work: Callable[[], T]) -> T:
        """Run blocking `work` in a thread, re-announcing `state` every `update_period` until it is done."""
        task = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(None, work))
        while not (await asyncio.wait({task}, timeout=self.config.update_period))[0]:
            await self._announce(state)
        return task.result()

    def _find_adapters(self) -> dict[str, tuple[Path, Any]]:
        """Each adapter's folder (downloaded if it names a Hub repository) and LoRA config, by name."""
        names = list(dict.fromkeys(self.config.adapters))
        if len(names) > MAX_ADAPTERS:
            raise AdapterError(f"at most {MAX_ADAPTERS} adapters can be announced, got {len(names)}")
        adapters = {}
        for name in names:
            if not 0 < len(name) <= MAX_STRING_LENGTH:
                raise AdapterError(f"an adapter's name (its path) must be 1 to {MAX_STRING_LENGTH} characters")
            folder = adapter_folder(name, token=self.config.token)
            adapters[name] = (folder, read_lora_config(name, folder))
        return adapters

    @loading_weights()  # no throughput measurement on this machine meanwhile
    def _load_backend(self) -> SpanBackend:
        began = time.perf_counter()
        files = CheckpointFiles(self.config.model, revision=self.config.revision, token=self.config.token)
        backend = load_span(
            files,
            self.family,
            self.model_config,
            self.start,
            self.end,
            self.dtype,
            self.device,
            progress=True,
            quant_type=self.quant_type,
        )
        log_quantization(self.quant_type, backend.blocks)
        logger.info("Loaded %d blocks in %.1f s", self.end - self.start, time.perf_counter() - began)
        names = self.family.checkpoint
        for name, (folder, lora_config) in self.adapters.items():
            loras = load_block_loras(name, folder, lora_config, names, self.start, self.end, self.dtype, self.device)
            backend.add_adapter(name, loras)
            logger.info("Serving adapter %s: LoRA on %d layers of blocks %d:%d", name, len(loras), self.start, self.end)
        return backend

    def _throughput(self, backend: SpanBackend) -> dict[str, float]:
        if self.config.throughput != "auto":
            value = float(self.config.throughput)
            return {"throughput": value, "inference_rps": value, "forward_rps": value}
        where = f"{self.device}|{self.dtype}|{self.quant_type}"  # quantized matmuls run at other speeds
        key = f"{self.config.model}|{self.end - self.start} blocks|{where}|torch {torch.__version__}"  # any span
        return measure_throughput(backend, cache_key=key, bandwidth_mbps=self.config.bandwidth_mbps)

    # ----- announcements -----

    def server_info(self, state: ServerState) -> ServerInfo:
        rates = self.rates
        return ServerInfo(
            state=state,
            throughput=float(rates.get("throughput", 0.0)),
            start_block=self.start,
            end_block=self.end,
            public_name=self.config.public_name,
            version=__version__,
            network_rps=rates.get("network_rps"),
            forward_rps=rates.get("forward_rps"),
            inference_rps=rates.get("inference_rps"),
            adapters=tuple(self.adapters),
            torch_dtype=str(self.dtype).split(".")[-1],
            quant_type=self.quant_type,
            using_relay=self.using_relay,
            cache_tokens_left=self.handler.announced_cache_tokens() if self.handler is not None else None,
            next_pings=dict(self.next_pings) if self.next_pings else None,
        )

    def _expiration(self) -> float:
        return get_dht_time() + max(2 * self.config.update_period, 10.0)

    async def _announce(self, state: ServerState, blocks: Sequence[int] | None = None) -> None:
        """Announce `state` for our span, under its blocks or only under `blocks` (while moving)."""
        info = self.server_info(state)
        expiration = self._expiration()
        blocks = range(self.start, self.end) if blocks is None else blocks
        if blocks:
            await announce_blocks(self.dht, self.dht_prefix, blocks, info, expiration, wait=False)
        if state != ServerState.OFFLINE and not is_private_prefix(self.dht_prefix):
            model = ModelInfo(num_blocks=self.total_blocks, repository=self._repository_url())
            await announce_model(self.dht, self.dht_prefix, model, expiration, wait=False)

    def _repository_url(self) -> str | None:
        return f"https://huggingface.co/{self.repository}" if self.repository else None

    async def _measure_next_pings(self) -> None:
        """Round-trip times to servers that can take over after our last block (used for routing)."""
        if self.end >= self.total_blocks or self.handler is None:
            self.next_pings = {}
            return
        try:
            view = await fetch_swarm(self.dht, self.dht_prefix, self.total_blocks, start=self.end, wait=False)
        except Exception as e:
            logger.debug("Could not read the swarm for pings: %s", e)
            return
        candidates = [s for s in view.online_spans() if s.start <= self.end < s.end][:MAX_NEXT_PINGS]
        pings = await asyncio.gather(*(ping_server(self.handler.p2p, span.peer_id, 5.0) for span in candidates))
        self.next_pings = {span.peer_id: result.round_trip for span, result in zip(candidates, pings)}
