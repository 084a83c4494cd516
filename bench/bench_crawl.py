"""Crawl speed on a simulated swarm: 2000 servers announcing spans of an 80-block model.

The announcements are stored straight into a local DHT (one bootstrap peer on 127.0.0.1), then:
- the monitor's crawl (no pings: the servers are simulated) is timed, including writing its snapshot;
- the same fetch done the naive way, one `get` per block with every entry validated by a pydantic
  model, is timed in the same run, and the ratio printed;
- the status page for that snapshot is rendered and timed.

    .venv/bin/python bench/bench_crawl.py [--servers 2000] [--blocks 80] [--repeats 5]

Prints `crawl_seconds_2000=<x>` (target: under 1 s), `naive_seconds_2000=<x>`, `naive_over_crawl=<x>`
and `status_page_ms_2000=<x>` (target: under 200 ms). Medians of `--repeats` runs.
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
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PREFIX = "bench-model-hf"


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


async def _store_in_dht(dht, node, *, keys, subkeys, values, expiration_time):
    return await node.store_many(keys, values, expiration_time, subkeys=subkeys, num_workers=32)


def store_announcements(dht, servers, expiration_time: float) -> None:
    from swarm.names import block_uid

    keys, subkeys, values = [], [], []
    for peer, start, end, value in servers:
        for block in range(start, end):
            keys.append(block_uid(PREFIX, block))
            subkeys.append(peer)
            values.append(value)
    chunk = 40  # keep each call small (~16 KB): arguments over ~60 KB break the pipe into the DHT process
    for offset in range(0, len(keys), chunk):
        dht.run_coroutine(
            partial(
                _store_in_dht,
                keys=keys[offset : offset + chunk],
                subkeys=subkeys[offset : offset + chunk],
                values=values[offset : offset + chunk],
                expiration_time=expiration_time,
            )
        )
    print(f"stored {len(keys)} block announcements of {len(servers)} servers")


def naive_fetch(dht, num_blocks: int):
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
        found = dht.get(block_uid(PREFIX, block), latest=True)
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
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    configure_django(workdir)

    from django.test import Client
    from hivemind import DHT
    from hivemind.utils import get_dht_time

    from monitor.crawl import CrawlOptions, run_crawl
    from monitor.models import ServerObservation
    from monitor.snapshots import write_snapshot
    from monitor.swarm_client import start_dht
    from monitor.targets import ModelTarget

    n = args.servers
    bootstrap = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    crawler = None
    try:
        peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
        servers = simulated_announcements(n, args.blocks)
        store_announcements(bootstrap, servers, get_dht_time() + 3600)
        crawler = start_dht(peers)
        target = ModelTarget(PREFIX, args.blocks, "Bench model")
        options = CrawlOptions(ping=False)
        run_crawl(crawler, [target], [], options)  # warm up connections

        crawl_times, write_times, snapshot = [], [], None
        for _ in range(args.repeats):
            began = time.perf_counter()
            result = run_crawl(crawler, [target], [], options)
            crawled = time.perf_counter()
            snapshot = write_snapshot(result)
            crawl_times.append(time.perf_counter() - began)
            write_times.append(time.perf_counter() - crawled)
        found = len(result.models[0].spans)
        assert found == n, f"the crawl found {found} of {n} servers"
        assert ServerObservation.objects.filter(snapshot=snapshot).count() == n

        naive_times = []
        for _ in range(max(1, args.repeats // 2)):
            began = time.perf_counter()
            naive_spans, _ = naive_fetch(crawler, args.blocks)
            naive_times.append(time.perf_counter() - began)
        assert len(naive_spans) == n, f"the naive fetch found {len(naive_spans)} of {n} servers"

        client = Client(HTTP_HOST="localhost")
        assert client.get("/").status_code == 200  # warm up templates
        render_times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            response = client.get("/")
            render_times.append(time.perf_counter() - began)
        rows = response.content.count(b'<tr class="server ')
        assert rows == n, f"the status page lists {rows} of {n} servers"

        crawl, naive = statistics.median(crawl_times), statistics.median(naive_times)
        print(f"servers={n} blocks={args.blocks} announcements={sum(e - s for _, s, e, _ in servers)}")
        print(f"crawl_seconds_{n}={crawl:.3f}  (of which snapshot write {statistics.median(write_times):.3f} s)")
        print(f"naive_seconds_{n}={naive:.3f}")
        print(f"naive_over_crawl={naive / crawl:.1f}")
        print(f"status_page_ms_{n}={statistics.median(render_times) * 1000:.0f}  ({len(response.content)} bytes)")
    finally:
        if crawler is not None:
            crawler.shutdown()
        bootstrap.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
