"""Hostile values stored straight into a real DHT: the crawl finishes, counts what it skipped or capped,
keeps the real server (known good from earlier crawls) over fakes that claim more, and every page escapes
what strangers wrote."""

from __future__ import annotations

import json
import math
import random

import pytest
from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from monitor.crawl import CrawlOptions, KnownGood, run_crawl
from monitor.models import ServerObservation
from monitor.snapshots import MAX_THROUGHPUT, write_snapshot
from monitor.swarm_client import start_dht
from monitor.targets import ModelTarget
from swarm.names import MODELS_INDEX_KEY, block_uid

pytestmark = pytest.mark.integration

PREFIX = "hostile-hf"
NUM_BLOCKS = 8
FAKE_PEERS = 3000
SCRIPT_NAME = "<script>alert('pwned')</script>"
BAD_PEER_ID = "<img src=x onerror=alert(1)>"
EVIL_PREFIX = "<b>evil</b>"
OPTIONS = CrawlOptions(ping_timeout=2.0, max_pings=300, max_servers_per_model=1000, max_custom_models=20)


def _bad_values() -> list:
    """Announcements that must be skipped (built in the DHT process: some are too big to send it)."""
    nan, inf = math.nan, math.inf
    return [
        "not a tuple",
        (7, 1.0, {}),
        ("2", 1.0, {}),
        (True, 1.0, {}),
        (2, "fast", {}),
        (2, 1.0, "extra"),
        (2, nan, {}),
        (2, inf, {}),
        (2, -5.0, {}),
        (2, 1.0, {"inference_rps": nan}),
        (2, 1.0, {"start_block": 0, "end_block": 1000}),
        (2, 1.0, {"start_block": 5, "end_block": 3}),
        (2, 1.0, {"start_block": -1, "end_block": 3}),
        (2, 1.0, {"public_name": "x" * 100_000}),
        (2, 1.0, {"version": "v" * 10_000}),
        (2, 1.0, {"adapters": ["a"] * 10_000}),
        (2, 1.0, {"next_pings": {f"p{i}": 0.1 for i in range(10_000)}}),
        (2, 1.0, {"cache_tokens_left": -3}),
        (2, 1.0, {"using_relay": "yes"}),
        (2, 1.0, {"quant_type": "fp3"}),
    ]


def _random_peer_id(rng: random.Random) -> str:
    return PeerID(b"\x12\x20" + rng.randbytes(32)).to_base58()  # a sha2-256 multihash, like real ids


async def _store_hostile_in_dht(dht: DHT, node: DHTNode) -> None:
    """Everything a stranger can write, stored with this peer's DHT node (which also plays the one real
    server, so that its `<script>` name is shown: it answers pings)."""
    rng = random.Random(7)
    expiration = get_dht_time() + 600
    keys, subkeys, values = [], [], []

    def add(block: int, subkey: str, value) -> None:
        keys.append(block_uid(PREFIX, block))
        subkeys.append(subkey)
        values.append(value)

    for i, value in enumerate(_bad_values()):
        add(i % NUM_BLOCKS, _random_peer_id(rng), value)
    add(3, BAD_PEER_ID, (2, 1.0, {}))
    for i in range(FAKE_PEERS):  # claiming more than the real server: every block, a huge throughput
        add(i % NUM_BLOCKS, _random_peer_id(rng), (2, 1e9, {"public_name": f"fake {i}"}))
    me = dht.peer_id.to_base58()
    for block in range(NUM_BLOCKS):
        add(block, me, (2, 5.0, {"start_block": 0, "end_block": NUM_BLOCKS, "public_name": SCRIPT_NAME}))
    for block in range(2):
        keys.append(block_uid(EVIL_PREFIX, block))
        subkeys.append(me)
        values.append((2, 5.0, {"start_block": 0, "end_block": 2, "public_name": SCRIPT_NAME}))
    for i in range(30):  # indexed models that only fakes claim to serve
        keys.append(block_uid(f"spam{i:02d}", 0))
        subkeys.append(_random_peer_id(rng))
        values.append((2, 1e9, {}))
    await node.store_many(keys, values, expiration, subkeys=subkeys)

    index = {
        PREFIX: {"num_blocks": NUM_BLOCKS, "repository": None},
        "absurd": {"num_blocks": 10**9},  # malformed
        "bad.prefix": {"num_blocks": 4},  # malformed
        "wrong": "not a dict",  # malformed
        "too-big": {"num_blocks": 50_000, "repository": "https://huggingface.co/o/big"},  # beyond the bound
        "no-url": {"num_blocks": 2, "repository": "javascript:alert(1)"},  # not a Hugging Face model: skipped
        EVIL_PREFIX: {"num_blocks": 2, "repository": "https://huggingface.co/evil/model"},  # the real server's
        **{f"spam{i:02d}": {"num_blocks": 2, "repository": f"https://huggingface.co/spam/m{i}"} for i in range(30)},
    }
    await node.store_many([MODELS_INDEX_KEY] * len(index), list(index.values()), expiration, subkeys=list(index.keys()))


@pytest.fixture(scope="module")
def hostile_swarm():
    bootstrap = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(maddr) for maddr in bootstrap.get_visible_maddrs()]
    writer = crawler = None
    try:
        writer = DHT(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        writer.run_coroutine(_store_hostile_in_dht)
        crawler = start_dht(peers)
        yield crawler, peers, writer.peer_id.to_base58()
    finally:
        for dht in (crawler, writer, bootstrap):
            if dht is not None:
                dht.shutdown()


@pytest.fixture
def hostile_snapshot(hostile_swarm, db):
    crawler, peers, writer_id = hostile_swarm
    # Earlier crawls reached the real server, on both of its models.
    known_good = KnownGood(frozenset({writer_id}), {PREFIX: 1, EVIL_PREFIX: 1})
    result = run_crawl(crawler, [ModelTarget(PREFIX, NUM_BLOCKS, "Hostile")], peers, OPTIONS, known_good=known_good)
    return write_snapshot(result)


def test_the_crawl_skips_caps_and_counts_hostile_entries(hostile_swarm, hostile_snapshot):
    _, _, writer_id = hostile_swarm
    snapshot = hostile_snapshot
    assert snapshot.invalid_entries == len(_bad_values()) + 1  # + the subkey that is no peer id
    assert snapshot.invalid_index_entries == 3
    # Too big, no Hugging Face URL, 31 candidates over the cap of 20; then the 19 spam models crawled but
    # not listed: no server that answers holds them.
    assert snapshot.skipped_models == 1 + 1 + 11 + 19
    assert snapshot.capped_servers == FAKE_PEERS + 1 - 1000
    assert snapshot.num_servers == 1000 + 1

    statuses = list(snapshot.models.order_by("position"))
    assert [status.dht_prefix for status in statuses] == [PREFIX, EVIL_PREFIX]
    assert statuses[1].repository == "https://huggingface.co/evil/model" and not statuses[1].official

    real = ServerObservation.objects.get(snapshot=snapshot, peer_id=writer_id, dht_prefix=PREFIX)
    assert (real.start, real.end, real.display_state) == (0, NUM_BLOCKS, "online")
    assert real.public_name == SCRIPT_NAME
    fakes = ServerObservation.objects.filter(snapshot=snapshot, dht_prefix=PREFIX).exclude(peer_id=writer_id)
    # The known good server was pinged first; the other 299 pings went to fakes in a salted order (a few to
    # the spam models' fakes), which were found unreachable and kept before the fakes not checked.
    pinged = fakes.filter(reachable=False).count()
    assert 299 - 19 <= pinged <= 299
    assert fakes.filter(reachable=None).count() == snapshot.unchecked_servers == 999 - pinged  # unknown
    assert fakes.filter(throughput__gt=MAX_THROUGHPUT).count() == 0  # 1e9 claimed
    # Coverage counts only the server the monitor reached.
    assert statuses[0].coverage == [1] * NUM_BLOCKS


def test_pages_and_apis_escape_what_strangers_wrote(hostile_swarm, hostile_snapshot, client):
    _, _, writer_id = hostile_swarm
    html = client.get("/").content.decode()
    assert SCRIPT_NAME not in html
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in html
    assert "<b>evil</b>" not in html and "&lt;b&gt;evil&lt;/b&gt;" in html
    assert BAD_PEER_ID not in html and 'href="javascript:' not in html

    peer_page = client.get(f"/peers/{writer_id}/").content.decode()
    assert SCRIPT_NAME not in peer_page and "&lt;script&gt;" in peer_page
    model_page = client.get("/models/%3Cb%3Eevil%3C/b%3E/")  # EVIL_PREFIX
    assert model_page.status_code == 200 and b"<b>evil</b>" not in model_page.content

    state = client.get("/api/v1/state")
    assert state.status_code == 200
    names = [
        row["span"]["server_info"]["public_name"]
        for row in json.loads(state.content)["model_reports"][0]["server_rows"]
    ]
    assert SCRIPT_NAME in names  # JSON carries the text as data; it is escaped wherever it is shown
    assert client.get("/metrics").status_code == 200
