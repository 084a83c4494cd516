"""Turning raw DHT entries into per-server spans and the model index (pure parsing; one test reads a real DHT)."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time

import swarm.dht
from swarm.data_structures import ModelInfo, ServerInfo, ServerState
from swarm.dht import SwarmView, fetch_swarm, parse_model_index, spans_from_entries
from swarm.names import block_uid

PREFIX = "Tiny-Llama-hf"
ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE


def rec(value: Any, expiration: float = 1e12) -> tuple[bytes, float]:
    """A record as `read_raw_entries` gives it: the value as stored (msgpack) and its expiration."""
    return MSGPackSerializer.dumps(value), expiration


def indexed(value: Any, expiration: float = 1e12) -> ValueWithExpiration:
    """A model index record as hivemind's `get` gives it (decoded)."""
    return ValueWithExpiration(value, expiration)


def ann(state: ServerState = ONLINE, throughput: float = 10.0, **extra: Any) -> tuple[bytes, float]:
    """A record as a server would store it: ServerInfo.to_tuple(), encoded."""
    return rec(ServerInfo(state, throughput, **extra).to_tuple())


def entries_for(per_block: list[Any], start: int = 0) -> dict[str, Any]:
    """uid -> entry, in block order (as fetch_swarm_in_dht builds it)."""
    return {block_uid(PREFIX, start + i): entry for i, entry in enumerate(per_block)}


def span_tuple(view: SwarmView, peer: str) -> tuple[int, int, ServerState]:
    span = view.spans[peer]
    return span.start, span.end, span.state


def test_spans_from_announced_start_and_end() -> None:
    a = ann(ONLINE, 5.0, start_block=0, end_block=3)
    b = ann(JOINING, 7.0, start_block=2, end_block=6)
    entries = entries_for([{"QmA": a}, {"QmA": a}, {"QmA": a, "QmB": b}, {"QmB": b}, {"QmB": b}, {"QmB": b}])
    view = spans_from_entries(PREFIX, 6, 0, entries)
    assert view.invalid_entries == 0
    assert set(view.spans) == {"QmA", "QmB"}
    assert span_tuple(view, "QmA") == (0, 3, ONLINE)
    assert span_tuple(view, "QmB") == (2, 6, JOINING)
    assert view.spans["QmB"].server_info.throughput == 7.0
    assert view.prefix == PREFIX and view.num_blocks == 6


def test_announced_span_is_trusted_even_if_seen_under_one_block() -> None:
    """The whole [start_block, end_block) is used; the reader need not see every block's entry."""
    view = spans_from_entries(PREFIX, 8, 0, entries_for([None, None, {"QmA": ann(start_block=0, end_block=8)}]))
    assert span_tuple(view, "QmA") == (0, 8, ONLINE)


def test_spans_from_runs_of_blocks_when_range_absent() -> None:
    """Without start_block/end_block a server's span is the run of blocks it appears under."""
    a, b = ann(ONLINE), ann(ONLINE, 3.0)
    entries = entries_for([{"QmA": a}, {"QmA": a, "QmB": b}, {"QmA": a, "QmB": b}, {"QmB": b}, None])
    view = spans_from_entries(PREFIX, 5, 0, entries)
    assert view.invalid_entries == 0
    assert span_tuple(view, "QmA") == (0, 3, ONLINE)
    assert span_tuple(view, "QmB") == (1, 4, ONLINE)


def test_run_indices_are_offset_by_start() -> None:
    """Fetching blocks [start, end) numbers the entries from `start`."""
    a = ann(ONLINE)
    view = spans_from_entries(PREFIX, 10, 6, entries_for([None, {"QmA": a}, {"QmA": a}], start=6))
    assert span_tuple(view, "QmA") == (7, 9, ONLINE)


def test_higher_state_wins_for_the_same_peer() -> None:
    """A peer seen OFFLINE under some blocks and ONLINE under others is taken as ONLINE there."""
    entries = entries_for([{"QmA": ann(OFFLINE)}, {"QmA": ann(ONLINE)}, {"QmA": ann(ONLINE)}, {"QmA": ann(JOINING)}])
    view = spans_from_entries(PREFIX, 4, 0, entries)
    assert span_tuple(view, "QmA") == (1, 3, ONLINE)


def test_malformed_records_are_counted_and_skipped() -> None:
    good = ann(ONLINE, start_block=0, end_block=2)
    entries = entries_for(
        [
            {
                "QmGood": good,
                "QmNaN": rec((2, float("nan"), {})),
                "QmBadState": rec((7, 1.0, {})),
                "QmNoValue": ("not", "a", "record"),
                "QmNotTuple": rec("ONLINE"),
                "QmExtraList": rec((2, 1.0, [])),
                "QmBackwards": rec((2, 1.0, {"start_block": 2, "end_block": 1})),
            },
            {"QmGood": good},
        ]
    )
    view = spans_from_entries(PREFIX, 2, 0, entries)
    assert list(view.spans) == ["QmGood"]
    assert span_tuple(view, "QmGood") == (0, 2, ONLINE)
    assert view.invalid_entries == 6


def test_end_block_past_num_blocks_is_rejected() -> None:
    entries = entries_for([{"QmA": ann(start_block=0, end_block=5), "QmB": ann(start_block=0, end_block=4)}])
    view = spans_from_entries(PREFIX, 4, 0, entries)
    assert set(view.spans) == {"QmB"}
    assert view.invalid_entries == 1


@pytest.mark.parametrize("entry", [["QmA", 1], "garbage", 42, (2, 1.0, {})])
def test_entry_that_is_not_a_dict(entry: Any) -> None:
    view = spans_from_entries(PREFIX, 2, 0, entries_for([entry, {"QmA": ann()}]))
    assert view.invalid_entries == 1
    assert span_tuple(view, "QmA") == (1, 2, ONLINE)


def test_missing_entries_are_not_errors() -> None:
    view = spans_from_entries(PREFIX, 3, 0, entries_for([None, None, None]))
    assert view.spans == {} and view.invalid_entries == 0
    assert view.missing_blocks() == [0, 1, 2]


@pytest.mark.parametrize("peer_id", [b"QmBytes", 12345, ("Qm", "x"), "", "Q" * 129])
def test_hostile_peer_ids_are_rejected(peer_id: Any) -> None:
    view = spans_from_entries(PREFIX, 1, 0, entries_for([{peer_id: ann(), "QmOk": ann()}]))
    assert list(view.spans) == ["QmOk"]
    assert view.invalid_entries == 1


def test_peer_id_of_128_characters_is_accepted() -> None:
    peer = "Q" * 128
    view = spans_from_entries(PREFIX, 1, 0, entries_for([{peer: ann()}]))
    assert list(view.spans) == [peer]


def test_peer_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_PEERS_PER_MODEL new peers are dropped (and counted); known peers still extend their runs."""
    monkeypatch.setattr(swarm.dht, "MAX_PEERS_PER_MODEL", 3)
    first = {f"QmPeer{i}": ann() for i in range(5)}
    second = {"QmPeer0": ann(), "QmNew": ann()}
    view = spans_from_entries(PREFIX, 2, 0, entries_for([first, second]))
    assert len(view.spans) == 3
    assert set(view.spans) == {"QmPeer0", "QmPeer1", "QmPeer2"}
    assert view.invalid_entries == 3  # QmPeer3, QmPeer4, QmNew
    assert span_tuple(view, "QmPeer0") == (0, 2, ONLINE)
    assert span_tuple(view, "QmPeer1") == (0, 1, ONLINE)


def test_unknown_extra_keys_are_ignored() -> None:
    value = (2, 4.0, {"start_block": 0, "end_block": 2, "brand_new_field": {"nested": [1, 2]}})
    view = spans_from_entries(PREFIX, 2, 0, entries_for([{"QmA": rec(value)}]))
    assert view.invalid_entries == 0
    assert span_tuple(view, "QmA") == (0, 2, ONLINE)


def _view() -> SwarmView:
    entries = entries_for(
        [
            {"QmA": ann(ONLINE, start_block=0, end_block=3), "QmJ": ann(JOINING, start_block=0, end_block=6)},
            None,
            None,
            {"QmB": ann(ONLINE, start_block=3, end_block=4), "QmOff": ann(OFFLINE, start_block=3, end_block=6)},
            None,
            None,
        ]
    )
    return spans_from_entries(PREFIX, 6, 0, entries)


def test_coverage_and_missing_blocks() -> None:
    view = _view()
    assert view.coverage() == [1, 1, 1, 1, 0, 0]
    assert view.coverage(ONLINE) == [1, 1, 1, 1, 0, 0]
    assert view.coverage(JOINING) == [1, 1, 1, 1, 1, 1]
    assert view.coverage(OFFLINE) == [0, 0, 0, 1, 1, 1]
    assert view.missing_blocks() == [4, 5]  # JOINING and OFFLINE servers do not count


def test_online_spans() -> None:
    spans = _view().online_spans()
    assert sorted((s.peer_id, s.start, s.end) for s in spans) == [("QmA", 0, 3), ("QmB", 3, 4)]


# ----- the `_petals.models` index -----


def test_parse_model_index_valid() -> None:
    entry = {
        "Meta-Llama-3-1-70B-hf": indexed({"num_blocks": 80, "repository": "https://huggingface.co/meta-llama/x"}),
        "bigscience/bloom-petals": indexed({"num_blocks": 70, "repository": None}),
    }
    models, invalid = parse_model_index(entry)
    assert invalid == 0
    assert models == {
        "Meta-Llama-3-1-70B-hf": ModelInfo(80, "https://huggingface.co/meta-llama/x"),
        "bigscience/bloom-petals": ModelInfo(70, None),
    }


def test_parse_model_index_empty_and_non_dict() -> None:
    assert parse_model_index(None) == ({}, 0)
    assert parse_model_index({}) == ({}, 0)
    assert parse_model_index(["Model-hf", 3]) == ({}, 1)
    assert parse_model_index(b"junk") == ({}, 1)


@pytest.mark.parametrize(
    ("prefix", "value"),
    [
        ("Model.1", {"num_blocks": 4}),  # the UID delimiter
        ("_private", {"num_blocks": 4}),  # private prefixes are never indexed
        ("has space", {"num_blocks": 4}),
        ("", {"num_blocks": 4}),
        ("x" * 129, {"num_blocks": 4}),
        (7, {"num_blocks": 4}),
        ("Model-hf", {"num_blocks": 0}),
        ("Model-hf", {"num_blocks": -1}),
        ("Model-hf", {"num_blocks": "80"}),
        ("Model-hf", {"num_blocks": True}),
        ("Model-hf", {"num_blocks": 10**9}),
        ("Model-hf", {"repository": "x"}),
        ("Model-hf", "not a dict"),
        ("Model-hf", {"num_blocks": 4, "repository": 3}),
    ],
)
def test_parse_model_index_skips_bad_entries(prefix: Any, value: Any) -> None:
    models, invalid = parse_model_index({prefix: indexed(value), "Good-hf": indexed({"num_blocks": 2})})
    assert models == {"Good-hf": ModelInfo(2)}
    assert invalid == 1


def test_parse_model_index_record_without_value() -> None:
    models, invalid = parse_model_index({"Model-hf": {"num_blocks": 4}})
    assert models == {} and invalid == 1


def test_parse_model_index_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swarm.dht, "MAX_INDEXED_MODELS", 2)
    models, invalid = parse_model_index({f"M{i}-hf": indexed({"num_blocks": 1}) for i in range(5)})
    assert len(models) == 2 and invalid == 3


# ----- encoded values (as `read_raw_entries` gives them): each distinct value decoded once -----


def test_encoded_entries_decode_each_distinct_value_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    parse = ServerInfo.from_tuple
    monkeypatch.setattr(ServerInfo, "from_tuple", lambda value: calls.append(value) or parse(value))
    fake = rec(ServerInfo(ONLINE, 1e9).to_tuple())  # a flood's one value, on every block
    real = rec(ServerInfo(ONLINE, 5.0, start_block=0, end_block=3).to_tuple())
    block = {"QmReal": real, **{f"QmFake{i}": fake for i in range(50)}}
    view = spans_from_entries(PREFIX, 3, 0, entries_for([block, block, block]))
    assert len(calls) == 2
    assert span_tuple(view, "QmReal") == (0, 3, ONLINE)
    assert span_tuple(view, "QmFake7") == (0, 3, ONLINE)  # runs of blocks still join
    assert view.invalid_entries == 0


@pytest.mark.parametrize(
    "value",
    [
        (b"\xc1", 1e12),  # not msgpack
        (MSGPackSerializer.dumps("not a tuple"), 1e12),
        (MSGPackSerializer.dumps((2, -1.0, {})), 1e12),  # negative throughput
        (b"\xc7\x03\x50abc", 1e12),  # hivemind's dictionary extension with junk inside
    ],
)
def test_encoded_hostile_values_are_counted_per_entry(value: tuple[bytes, float]) -> None:
    block = {"QmBad": value, "QmOk": rec(ServerInfo(ONLINE, 1.0).to_tuple())}
    view = spans_from_entries(PREFIX, 2, 0, entries_for([block, block]))
    assert set(view.spans) == {"QmOk"}
    assert view.invalid_entries == 2  # once per block, as for decoded values


async def _store_locally_in_dht(dht: Any, node: Any, *, items: list[tuple[str, Any, Any, float]]) -> None:
    # Straight into this node's storage: two nodes can then hold different values under the same subkey.
    for uid, subkey, value, expiration in items:
        key_id = DHTID.generate(source=uid)
        node.protocol.storage.store(key_id, MSGPackSerializer.dumps(value), expiration, subkey=subkey)


def test_reading_merges_every_peers_subkeys_and_keeps_the_latest() -> None:
    """A real DHT: each peer holds some announcements; the read joins them, the latest value of a subkey wins,
    and a regular value a stranger stored under a block on one peer hides nothing the others hold."""
    now = get_dht_time()
    old, new = ServerInfo(JOINING, 1.0, start_block=0, end_block=2), ServerInfo(ONLINE, 2.0, start_block=0, end_block=2)
    other = ServerInfo(ONLINE, 3.0, start_block=1, end_block=2)
    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first]
    try:
        peers = [str(maddr) for maddr in first.get_visible_maddrs()]
        second = DHT(initial_peers=peers, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        dhts.append(second)
        uid0, uid1 = block_uid(PREFIX, 0), block_uid(PREFIX, 1)
        first.run_coroutine(
            partial(
                _store_locally_in_dht,
                items=[
                    (uid0, "QmA", new.to_tuple(), now + 200),
                    (uid1, "QmA", old.to_tuple(), now + 100),
                    (uid1, "QmB", other.to_tuple(), now + 100),
                ],
            )
        )
        second.run_coroutine(partial(_store_locally_in_dht, items=[(uid0, "QmA", old.to_tuple(), now + 100)]))
        second.run_coroutine(partial(_store_regular_in_dht, uid=uid1, expiration=now + 300))
        reader = DHT(initial_peers=peers, start=True, client_mode=True)
        dhts.append(reader)
        view = fetch_swarm(reader, PREFIX, 2)
        assert view.invalid_entries == 0
        assert span_tuple(view, "QmA") == (0, 2, ONLINE)
        assert view.spans["QmA"].server_info.throughput == 2.0
        assert span_tuple(view, "QmB") == (1, 2, ONLINE)
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


async def _store_regular_in_dht(dht: Any, node: Any, *, uid: str, expiration: float) -> None:
    node.protocol.storage.store(DHTID.generate(source=uid), MSGPackSerializer.dumps("junk"), expiration)


# ----- values nested to crash msgpack: a stranger must not bring down a crawler or a DHT peer -----

NESTED_VALUE_CHECK = """
from functools import partial

import msgpack
from hivemind import DHT
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm.dht import spans_from_entries  # importing swarm.dht bounds the nesting in this process
from swarm.names import block_uid

nested = 1
for _ in range(3000):  # 15 KB: enough to overflow msgpack's C stack through hivemind's hook
    nested = msgpack.ExtType(MSGPackSerializer._TUPLE_EXT_TYPE_CODE, msgpack.packb([nested]))
raw = msgpack.packb(nested)
try:
    MSGPackSerializer.loads(raw)
except ValueError as error:
    print("loads:", error)
view = spans_from_entries("Tiny-hf", 1, 0, {block_uid("Tiny-hf", 0): {"QmA": (raw, 1e12)}})
print("invalid entries:", view.invalid_entries)

# A stranger's store request whose subkey is the nested value: the receiving peer decodes it in rpc_store.
async def attack(dht, node, peer_id):
    key = DHTID.generate(source="some-key")
    return await node.protocol.call_store(peer_id, [key], [b"x"], get_dht_time() + 60, subkeys=[nested])

peer = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
stranger = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peer.get_visible_maddrs())
print("store:", stranger.run_coroutine(partial(attack, peer_id=peer.peer_id), return_future=True).result(30))
print("alive:", peer.is_alive(), stranger.store("after", 1, get_dht_time() + 60))
stranger.shutdown()
peer.shutdown()
"""


def test_deeply_nested_values_are_refused_not_a_crash() -> None:
    """hivemind decodes nested extension types with recursive msgpack calls: ~500 levels (2.4 KB) of nested
    tuples overflowed the C stack and killed the process (a crawler's DHT reading one announcement, any DHT
    peer receiving one store request). Run in a child process: on failure it dies, not the test session."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", NESTED_VALUE_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "loads: msgpack value nests extension types more than 32 deep" in done.stdout
    assert "invalid entries: 1" in done.stdout
    assert "alive: True True" in done.stdout
