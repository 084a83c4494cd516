"""Crawl speed on a simulated swarm: 2000 servers announcing spans of an 80-block model.

The announcements are stored straight into a local DHT (one bootstrap peer on 127.0.0.1), then:
- the monitor's crawl (no pings: the servers are simulated) is timed, including writing its snapshot, and
  its memory reported (tracemalloc's peak in one extra, untimed crawl; RSS of this process and of the DHT's);
- the same fetch done the naive way, one `get` per block with every entry validated by a pydantic
  model, is timed in the same run, and the ratio printed;
- the status page for that snapshot is rendered and timed.

    .venv/bin/python bench/bench_crawl.py [--servers 2000] [--models 1] [--blocks 80] [--repeats 5] [--fakes 0]

`--models M` spreads the servers evenly over M models of `--blocks` blocks each (the issue's scale:
`--servers 20000 --models 10`, targets: crawl and snapshot under 2 s, status page under 200 ms).

`--fakes N` adds a stranger's flood to the first model: N fake servers (valid peer ids, ONLINE on every
block, throughput 1e9, no process behind them) next to 2 real ones (short spans, modest throughput). The
real ones are known good (earlier crawls reached them: the bench passes them as `KnownGood`, since no
server here answers pings); prints the crawl time and `real_servers_kept=<k>/2`.

Prints `crawl_seconds_<n>=<x>` (target: under 1 s for 2000), `naive_seconds_<n>=<x>`, `naive_over_crawl=<x>`,
`status_page_ms_<n>=<x>` (target: under 200 ms) and `crawl_memory_peak_mb=<x>` (tracemalloc's peak during one
crawl in this process; the line adds the RSS growth over the timed crawls and writes, and the crawler's DHT
process's resident size). Medians of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREFIX = "bench-model-hf"
REAL = 2  # real servers next to the fakes of --fakes


def model_prefix(index: int) -> str:
    return PREFIX if index == 0 else f"{PREFIX}-{index}"


def configure_django(workdir: Path) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["DEBUG"] = "0"
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    os.environ["VAR_DIR"] = str(workdir)
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["LOG_LEVEL"] = "WARNING"
    (workdir / "staticfiles").mkdir(exist_ok=True)  # STATIC_ROOT; whitenoise warns when it is missing
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def simulated_announcements(num_servers: int, num_blocks: int, seed: int = 0):
    """(peer id, start, end, value) per server, shaped like real announcements (PROTOCOL.md)."""
    from hivemind.p2p import PeerID

    from swarm.data_structures import ServerInfo, ServerState

    rng = random.Random(seed)
    peers = [PeerID(rng.randbytes(34)).to_base58() for _ in range(num_servers)]
    servers = []
    for index, peer in enumerate(peers):
        length = rng.randint(min(4, num_blocks), min(24, num_blocks))  # spans fit small models too
        start = rng.randint(0, num_blocks - length)
        info = ServerInfo(
            state=ServerState.ONLINE if rng.random() < 0.9 else rng.choice([ServerState.JOINING, ServerState.OFFLINE]),
            throughput=rng.uniform(50, 5000),
            start_block=start,
            end_block=start + length,
            public_name=f"contributor-{index % 300}" if rng.random() < 0.5 else None,
            version="2.3.0",
            network_rps=rng.uniform(100, 10000),
            forward_rps=rng.uniform(100, 10000),
            inference_rps=rng.uniform(50, 5000),
            torch_dtype="bfloat16",
            quant_type=rng.choice(["none", "nf4", "int8"]),
            using_relay=rng.random() < 0.2,
            cache_tokens_left=rng.randint(0, 200_000),
            next_pings={rng.choice(peers): rng.uniform(0.001, 0.3) for _ in range(3)},
        )
        servers.append((peer, start, start + length, info.to_tuple()))
    return servers


def flood_announcements(num_fakes: int, num_blocks: int, seed: int = 1):
    """A stranger's flood: fakes claiming everything, and REAL modest servers (short spans) among them."""
    from hivemind.p2p import PeerID

    from swarm.data_structures import ServerInfo, ServerState

    rng = random.Random(seed)
    fake = ServerInfo(
        state=ServerState.ONLINE, throughput=1e9, start_block=0, end_block=num_blocks, public_name="fake"
    ).to_tuple()
    servers = [(PeerID(rng.randbytes(34)).to_base58(), 0, num_blocks, fake) for _ in range(num_fakes)]
    for index in range(REAL):
        start, end = index * num_blocks // REAL, (index + 1) * num_blocks // REAL
        info = ServerInfo(state=ServerState.ONLINE, throughput=100.0, start_block=start, end_block=end)
        servers.append((PeerID(rng.randbytes(34)).to_base58(), start, end, info.to_tuple()))
    return servers


async def _store_in_dht(dht, node, *, prefix, servers, expiration_time):
    # Straight into this peer's own storage, as a store request from the servers would put them there (the
    # crawler is not started yet, so this peer is the only one): each server's value under each of its blocks.
    from hivemind.dht.routing import DHTID
    from hivemind.utils import MSGPackSerializer

    from swarm.names import block_uid

    for peer, start, end, value in servers:
        encoded = MSGPackSerializer.dumps(value)
        for block in range(start, end):
            key_id = DHTID.generate(source=block_uid(prefix, block))
            node.protocol.storage.store(key_id, encoded, expiration_time, subkey=peer)


def store_announcements(dht, servers, expiration_time: float, prefix: str = PREFIX) -> None:
    chunk = 10  # servers per call (~4 KB): a larger message may reach the DHT process in parts, which breaks it
    for offset in range(0, len(servers), chunk):
        batch = servers[offset : offset + chunk]
        dht.run_coroutine(partial(_store_in_dht, prefix=prefix, servers=batch, expiration_time=expiration_time))
    blocks = sum(end - start for _, start, end, _ in servers)
    print(f"stored {blocks} block announcements of {len(servers)} servers of {prefix}")


def naive_fetch(dht, num_blocks: int, prefix: str = PREFIX):
    """The straightforward way: one DHT lookup per block, each entry validated by a pydantic model."""
    from typing import Literal

    import pydantic

    from swarm.names import block_uid

    class Extra(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="ignore", strict=True)
        start_block: pydantic.NonNegativeInt | None = None
        end_block: pydantic.NonNegativeInt | None = None
        public_name: pydantic.constr(max_length=256) | None = None
        version: pydantic.constr(max_length=256) | None = None
        network_rps: pydantic.NonNegativeFloat | None = None
        forward_rps: pydantic.NonNegativeFloat | None = None
        inference_rps: pydantic.NonNegativeFloat | None = None
        adapters: list[pydantic.constr(max_length=256)] = []
        torch_dtype: pydantic.constr(max_length=256) | None = None
        quant_type: Literal["none", "int8", "nf4"] | None = None
        using_relay: bool | None = None
        cache_tokens_left: pydantic.NonNegativeInt | None = None
        next_pings: dict[str, pydantic.NonNegativeFloat] | None = None

    class Announcement(pydantic.BaseModel):
        state: Literal[0, 1, 2]
        throughput: pydantic.NonNegativeFloat
        extra: Extra

    spans: dict[str, tuple[int, int, Announcement]] = {}
    invalid = 0
    for block in range(num_blocks):
        found = dht.get(block_uid(prefix, block), latest=True)
        if found is None or not isinstance(found.value, dict):
            continue
        for peer, record in found.value.items():
            try:
                state, throughput, extra = record.value
                entry = Announcement(state=state, throughput=throughput, extra=Extra.model_validate(extra))
            except (pydantic.ValidationError, ValueError, TypeError):
                invalid += 1
                continue
            start = entry.extra.start_block if entry.extra.start_block is not None else block
            end = entry.extra.end_block if entry.extra.end_block is not None else block + 1
            known = spans.get(peer)
            if known is None or known[2].state < entry.state:
                spans[peer] = (start, end, entry)
    return spans, invalid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=2000)
    parser.add_argument("--models", type=int, default=1, help="models the servers are spread over")
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fakes", type=int, default=0, help="fake servers flooding the first model (+2 real)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    configure_django(workdir)

    import psutil
    from django.test import Client
    from hivemind import DHT
    from hivemind.utils import get_dht_time

    from monitor import conf
    from monitor.crawl import CrawlOptions, KnownGood, run_crawl
    from monitor.models import ServerObservation
    from monitor.snapshots import write_snapshot
    from monitor.swarm_client import start_dht
    from monitor.targets import ModelTarget

    n, num_models = args.servers, max(args.models, 1)
    bootstrap = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    crawler = None
    try:
        peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
        servers = simulated_announcements(n, args.blocks)
        expiration = get_dht_time() + 3600
        targets = [ModelTarget(model_prefix(i), args.blocks, f"Bench model {i}") for i in range(num_models)]
        for i, target in enumerate(targets):
            store_announcements(bootstrap, servers[i::num_models], expiration, target.dht_prefix)
        flood = flood_announcements(args.fakes, args.blocks) if args.fakes else []
        if flood:
            store_announcements(bootstrap, flood, expiration, targets[0].dht_prefix)
        real = {peer for peer, *_ in flood[len(flood) - REAL :]}
        expected = n + len(flood)
        crawler = start_dht(peers)
        options = CrawlOptions(ping=False)
        known_good = KnownGood(frozenset(real))
        rss_before = psutil.Process().memory_info().rss / 2**20
        run_crawl(crawler, targets, [], options, known_good=known_good)  # warm up connections

        crawl_times, write_times, snapshot = [], [], None
        for _ in range(args.repeats):
            began = time.perf_counter()
            result = run_crawl(crawler, targets, [], options, known_good=known_good)
            crawled = time.perf_counter()
            snapshot = write_snapshot(result)
            crawl_times.append(time.perf_counter() - began)
            write_times.append(time.perf_counter() - crawled)
        rss_growth = psutil.Process().memory_info().rss / 2**20 - rss_before
        dht_rss = psutil.Process(crawler.pid).memory_info().rss / 2**20  # where the announcements are parsed
        kept = sum(len(model.spans) for model in result.models)
        capped = sum(model.capped_servers for model in result.models)
        assert kept + capped == expected, f"the crawl found {kept} + {capped} capped of {expected} servers"
        stored = ServerObservation.objects.filter(snapshot=snapshot).count()
        assert stored == kept, f"the snapshot has {stored} of {kept} servers"

        tracemalloc.start()
        run_crawl(crawler, targets, [], options, known_good=known_good)
        traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()

        naive_times = []
        for _ in range(max(1, args.repeats // 2)):
            began = time.perf_counter()
            naive_found = sum(len(naive_fetch(crawler, args.blocks, t.dht_prefix)[0]) for t in targets)
            naive_times.append(time.perf_counter() - began)
        assert naive_found == expected, f"the naive fetch found {naive_found} of {expected} servers"

        client = Client(HTTP_HOST="localhost")
        assert client.get("/").status_code == 200  # warm up templates
        render_times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            response = client.get("/")
            render_times.append(time.perf_counter() - began)
        rows = response.content.count(b'<tr class="server ')
        listed = sum(min(len(model.spans), conf.page_servers_per_model()) for model in result.models)
        assert rows == listed, f"the status page lists {rows} of {listed} servers (of {kept})"

        crawl, naive = statistics.median(crawl_times), statistics.median(naive_times)
        announcements = sum(e - s for _, s, e, _ in servers) + sum(e - s for _, s, e, _ in flood)
        print(f"servers={n} models={num_models} blocks={args.blocks} fakes={args.fakes} announcements={announcements}")
        print(f"crawl_seconds_{n}={crawl:.3f}  (of which snapshot write {statistics.median(write_times):.3f} s)")
        print(f"naive_seconds_{n}={naive:.3f}")
        print(f"naive_over_crawl={naive / crawl:.1f}")
        print(f"status_page_ms_{n}={statistics.median(render_times) * 1000:.0f}  ({len(response.content)} bytes)")
        print(
            f"crawl_memory_peak_mb={traced_peak:.1f}  (tracemalloc, one crawl; this process grew by "
            f"{rss_growth:.1f} MB over the crawls and writes; the crawler's DHT process: {dht_rss:.0f} MB resident)"
        )
        if flood:
            first = result.models[0]
            found_real = sum(peer in first.spans for peer in real)
            print(f"fakes={args.fakes} kept={len(first.spans)} capped={first.capped_servers}")
            print(f"flood_crawl_seconds={crawl:.3f}")
            print(f"real_servers_kept={found_real}/{REAL}")
    finally:
        if crawler is not None:
            crawler.shutdown()
        bootstrap.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
