"""ServerInfo / ModelInfo: the DHT value shapes and their strict parsing (PROTOCOL.md, "Block announcements")."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hivemind.utils import MSGPackSerializer

from swarm.data_structures import (
    MAX_ADAPTERS,
    MAX_NEXT_PINGS,
    MAX_NUM_BLOCKS,
    MAX_STRING_LENGTH,
    ModelInfo,
    RemoteSpanInfo,
    ServerInfo,
    ServerState,
)

FULL = ServerInfo(
    state=ServerState.ONLINE,
    throughput=123.5,
    start_block=4,
    end_block=12,
    public_name="my server",
    version="2.3.0",
    network_rps=1000.0,
    forward_rps=55.5,
    inference_rps=12.25,
    adapters=("org/adapter-a", "org/adapter-b"),
    torch_dtype="bfloat16",
    quant_type="nf4",
    using_relay=False,
    cache_tokens_left=65536,
    next_pings={"QmPeerA": 0.012, "QmPeerB": math.inf},
)


def _announce(extra: dict[str, Any] | None = None, state: Any = 2, throughput: Any = 10.0) -> tuple:
    return (state, throughput, {} if extra is None else extra)


def test_to_tuple_minimal_has_only_state_and_throughput() -> None:
    value = ServerInfo(ServerState.JOINING, 3).to_tuple()
    assert value == (1, 3.0, {})
    state, throughput, extra = value
    assert type(state) is int and type(throughput) is float and type(extra) is dict


def test_to_tuple_full_uses_protocol_types() -> None:
    state, throughput, extra = FULL.to_tuple()
    assert type(state) is int and state == 2
    assert type(throughput) is float and throughput == 123.5
    assert extra == {
        "start_block": 4,
        "end_block": 12,
        "public_name": "my server",
        "version": "2.3.0",
        "network_rps": 1000.0,
        "forward_rps": 55.5,
        "inference_rps": 12.25,
        "adapters": ["org/adapter-a", "org/adapter-b"],
        "torch_dtype": "bfloat16",
        "quant_type": "nf4",
        "using_relay": False,
        "cache_tokens_left": 65536,
        "next_pings": {"QmPeerA": 0.012, "QmPeerB": math.inf},
    }
    assert type(extra["adapters"]) is list


def test_to_tuple_keeps_falsy_but_set_fields() -> None:
    """False / 0 are real values (only None and an empty adapter list are left out)."""
    _, _, extra = ServerInfo(ServerState.OFFLINE, 0.0, using_relay=False, cache_tokens_left=0, start_block=0).to_tuple()
    assert extra == {"using_relay": False, "cache_tokens_left": 0, "start_block": 0}


@pytest.mark.parametrize("info", [FULL, ServerInfo(ServerState.OFFLINE, 0.0), ServerInfo(ServerState.JOINING, 1.5)])
def test_msgpack_round_trip(info: ServerInfo) -> None:
    raw = MSGPackSerializer.dumps(info.to_tuple())
    value = MSGPackSerializer.loads(raw)
    assert isinstance(value, tuple)  # hivemind keeps tuples as tuples
    parsed = ServerInfo.from_tuple(value)
    assert parsed == info
    assert isinstance(parsed.state, ServerState)


def test_from_tuple_accepts_list_and_missing_extra() -> None:
    assert ServerInfo.from_tuple([2, 5]) == ServerInfo(ServerState.ONLINE, 5.0)
    assert ServerInfo.from_tuple((0, 0)).state is ServerState.OFFLINE


def test_from_tuple_ignores_unknown_extra_keys() -> None:
    info = ServerInfo.from_tuple(_announce({"future_field": [1, 2, 3], "start_block": 0, "end_block": 2, 7: "x"}))
    assert (info.start_block, info.end_block) == (0, 2)


def test_from_tuple_allows_inf_pings() -> None:
    info = ServerInfo.from_tuple(_announce({"next_pings": {"QmA": math.inf, "QmB": 0, "QmC": 0.5}}))
    assert info.next_pings == {"QmA": math.inf, "QmB": 0.0, "QmC": 0.5}


def test_from_tuple_accepts_limits() -> None:
    info = ServerInfo.from_tuple(
        _announce(
            {
                "public_name": "x" * MAX_STRING_LENGTH,
                "adapters": ["a"] * MAX_ADAPTERS,
                "next_pings": {f"p{i}": 0.1 for i in range(MAX_NEXT_PINGS)},
                "end_block": MAX_NUM_BLOCKS,
            }
        )
    )
    assert len(info.public_name) == MAX_STRING_LENGTH and len(info.adapters) == MAX_ADAPTERS


@pytest.mark.parametrize(
    "value",
    [
        None,
        "2, 1.0, {}",
        b"\x02",
        42,
        {"state": 2, "throughput": 1.0},
        (),
        (2,),
        [2],
    ],
)
def test_from_tuple_rejects_wrong_container(value: Any) -> None:
    with pytest.raises(ValueError):
        ServerInfo.from_tuple(value)


@pytest.mark.parametrize("state", [3, -1, True, False, "2", None, [2], 2.5])
def test_from_tuple_rejects_bad_state(state: Any) -> None:
    with pytest.raises(ValueError):
        ServerInfo.from_tuple(_announce(state=state))


@pytest.mark.parametrize("throughput", [math.nan, math.inf, -math.inf, -1.0, -1, True, "1.0", None, [1.0]])
def test_from_tuple_rejects_bad_throughput(throughput: Any) -> None:
    with pytest.raises(ValueError):
        ServerInfo.from_tuple(_announce(throughput=throughput))


@pytest.mark.parametrize("extra", [None, [], "x", ("start_block", 1), 5])
def test_from_tuple_rejects_non_dict_extra(extra: Any) -> None:
    with pytest.raises(ValueError):
        ServerInfo.from_tuple((2, 1.0, extra))


@pytest.mark.parametrize(
    "extra",
    [
        # block indices: ints only (no bools / floats / strings), in range, start < end
        {"start_block": True},
        {"start_block": 1.0},
        {"end_block": "4"},
        {"start_block": -1},
        {"end_block": MAX_NUM_BLOCKS + 1},
        {"start_block": 4, "end_block": 4},
        {"start_block": 5, "end_block": 4},
        # rates
        {"network_rps": math.nan},
        {"forward_rps": math.inf},
        {"inference_rps": -0.5},
        {"inference_rps": True},
        {"network_rps": "fast"},
        # strings
        {"public_name": "x" * (MAX_STRING_LENGTH + 1)},
        {"version": 2},
        {"torch_dtype": ["bfloat16"]},
        {"public_name": b"bytes"},
        # adapters
        {"adapters": ["a"] * (MAX_ADAPTERS + 1)},
        {"adapters": "org/adapter"},
        {"adapters": [1]},
        {"adapters": ["x" * (MAX_STRING_LENGTH + 1)]},
        # quant_type
        {"quant_type": "int4"},
        {"quant_type": "NF4"},
        {"quant_type": 0},
        # using_relay / cache_tokens_left
        {"using_relay": 1},
        {"using_relay": "yes"},
        {"cache_tokens_left": -1},
        {"cache_tokens_left": 1.5},
        {"cache_tokens_left": True},
        # next_pings
        {"next_pings": {"QmA": math.nan}},
        {"next_pings": {"QmA": -0.1}},
        {"next_pings": {"QmA": -math.inf}},
        {"next_pings": {"QmA": True}},
        {"next_pings": {"QmA": "0.1"}},
        {"next_pings": {1: 0.1}},
        {"next_pings": {"x" * (MAX_STRING_LENGTH + 1): 0.1}},
        {"next_pings": [["QmA", 0.1]]},
        {"next_pings": {f"p{i}": 0.1 for i in range(MAX_NEXT_PINGS + 1)}},
    ],
)
def test_from_tuple_rejects_bad_extra(extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerInfo.from_tuple(_announce(extra))


def test_from_tuple_treats_none_extra_values_as_absent() -> None:
    info = ServerInfo.from_tuple(_announce({"start_block": None, "public_name": None, "next_pings": None}))
    assert info == ServerInfo(ServerState.ONLINE, 10.0)


def test_remote_span_info_properties() -> None:
    span = RemoteSpanInfo("QmPeer", 3, 7, ServerInfo(ServerState.JOINING, 1.0))
    assert span.length == 4
    assert span.state is ServerState.JOINING


def test_model_info_round_trip() -> None:
    for info in [ModelInfo(80, "https://huggingface.co/meta-llama/Meta-Llama-3.1-70B"), ModelInfo(1)]:
        raw = MSGPackSerializer.dumps(info.to_dict())
        assert ModelInfo.from_dict(MSGPackSerializer.loads(raw)) == info
    assert ModelInfo(3).to_dict() == {"num_blocks": 3, "repository": None}


def test_model_info_ignores_unknown_keys() -> None:
    assert ModelInfo.from_dict({"num_blocks": 2, "something": "else"}) == ModelInfo(2)


@pytest.mark.parametrize(
    "value",
    [
        None,
        [80, None],
        "80",
        {},
        {"num_blocks": 0},
        {"num_blocks": -3},
        {"num_blocks": MAX_NUM_BLOCKS + 1},
        {"num_blocks": True},
        {"num_blocks": 80.0},
        {"num_blocks": "80"},
        {"num_blocks": 80, "repository": 5},
        {"num_blocks": 80, "repository": "x" * (MAX_STRING_LENGTH + 1)},
    ],
)
def test_model_info_from_dict_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        ModelInfo.from_dict(value)
