"""The client keeps to the servers' request limits, and does not blame a server for its own mistakes.

Our servers take at most 8192 tokens (rows x new tokens) per request. A longer prefill (or the replay
of a long history to a replacement server) goes out in several steps, which the caller sees as one;
a request that no server would take is refused with a clear error and bans nobody (the client of a
chat site is shared by all its users: a ban there hides a healthy server from everyone).
"""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import P2PHandlerError
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.routing import Rejection, RequestRejected, rejection
from swarm.server.handler import MAX_BATCH_SIZE
from swarm.streams import RemoteError
from tests.conftest import DEMO_MODEL, start_swarm

integration = pytest.mark.integration

SERVER_TOKENS_PER_REQUEST = 8192  # our servers' limit (TransformerConnectionHandler's default)
ROWS, PROMPT_TOKENS, NEW_TOKENS = 5, 1700, 3  # 5 x 1700 = 8500 tokens: more than one request holds
# Quick failures where a client would ban the only server of a span and wait for another (15 s, not less:
# a lookup under a loaded CI machine once took longer than 5 s to see blocks 0:4).
FAST = {"missing_blocks_timeout": 15.0}


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:4", "4:8")  # a chain of two: steps may be pushed from one to the other
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def local_model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt(local_model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(12)
    return torch.randint(3, local_model.config.vocab_size, (ROWS, PROMPT_TOKENS), generator=generator)


@pytest.fixture(scope="module")
def expected(local_model, prompt) -> torch.Tensor:
    assert ROWS * PROMPT_TOKENS > SERVER_TOKENS_PER_REQUEST
    with torch.no_grad():
        return local_model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def client(swarm, **options):
    return AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers, **options)


@pytest.mark.parametrize(
    "error, rows, tokens, expected",
    [
        (RemoteError("at most 8192 tokens per request"), 5, 1700, Rejection("at most 8192 tokens per request", 8192)),
        (
            P2PHandlerError("Failed to call handler `rpc_forward` at X: BadRequest('at most 8192 tokens per request')"),
            5,
            1700,
            Rejection("at most 8192 tokens per request", 8192),
        ),
        (RemoteError("batch size must be between 1 and 64"), 65, 1, Rejection("batch size must be between 1 and 64")),
        (RemoteError("at most 8192 tokens per request"), 4, 1700, None),  # 6800 tokens were sent: a false claim
        (RemoteError("at most 16 tokens per request"), 5, 1700, None),  # no server of ours is that small
        (RemoteError("batch size must be between 1 and 1"), 2, 1, None),
        (ConnectionError("at most 8192 tokens per request"), 5, 1700, None),  # not the server's answer
    ],
)
def test_a_server_is_believed_to_refuse_our_request_only_when_the_claim_holds(error, rows, tokens, expected):
    """Otherwise a faulty or hostile server would escape its ban by blaming the client."""
    assert rejection(error, rows, tokens) == expected


@integration
@pytest.mark.parametrize(
    "options",
    [{}, {"use_server_to_server": True}, {"max_tokens_per_request": 2 * SERVER_TOKENS_PER_REQUEST}],
    ids=["default", "pushed", "limit-learned-from-the-server"],
)
def test_a_prefill_longer_than_a_request_generates_as_locally(swarm, prompt, expected, options):
    """The prompt goes out in steps of at most 8192 tokens (pushed from server to server, too); a client
    that assumes a higher limit learns the server's from its refusal, without banning it."""
    model = client(swarm, **options, **FAST)
    try:
        actual = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert actual.tolist() == expected.tolist()
        assert model.manager.banned() == set()
    finally:
        model.close()


@integration
def test_a_forward_longer_than_a_request_matches_local(swarm, local_model, prompt):
    """A forward pass cannot be split along the sequence, but its rows can go in several requests."""
    model = client(swarm, **FAST)
    try:
        with torch.no_grad():
            actual = model(prompt).logits[:, -1]
            expected = local_model(prompt).logits[:, -1]
        torch.testing.assert_close(actual, expected, atol=1e-3, rtol=0)
        assert model.manager.banned() == set()
    finally:
        model.close()


@integration
def test_a_request_no_server_takes_is_refused_without_banning_anyone(swarm):
    """A batch larger than our servers take: the caller hears why at once, and no server is avoided."""
    model = client(swarm, **FAST)
    try:
        with model.inference_session(max_length=4) as session:
            hidden = torch.zeros(MAX_BATCH_SIZE + 1, 1, model.config.hidden_size)
            with pytest.raises(RequestRejected, match=f"batch size must be between 1 and {MAX_BATCH_SIZE}"):
                session.step(hidden)
        assert model.manager.banned() == set()
    finally:
        model.close()


@integration
def test_a_step_with_another_batch_size_is_refused_before_it_is_sent(swarm):
    model = client(swarm, **FAST)
    try:
        with model.inference_session(max_length=8) as session:
            session.step(torch.zeros(2, 3, model.config.hidden_size))
            with pytest.raises(ValueError, match=r"batch size is 2 .*got 3 rows"):
                session.step(torch.zeros(3, 1, model.config.hidden_size))
            assert session.tokens_sent == 3
            assert session.step(torch.zeros(2, 1, model.config.hidden_size)).shape == (2, 1, model.config.hidden_size)
        assert model.manager.banned() == set()
    finally:
        model.close()


@integration
def test_the_replay_of_a_long_history_is_split_too(swarm, local_model):
    """A replacement server is rebuilt from a history of 9 x 1000 tokens: in requests of at most 8192.
    (Last in this file: the twin it starts and kills stays listed in the DHT for a while.)"""
    rows, tokens = 9, 1000  # in two steps of 9 x 500 tokens, each of which fits one request
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, local_model.config.vocab_size, (rows, tokens + 2), generator=generator)
    twin = swarm.start_server(DEMO_MODEL, "--block-indices", "0:4")
    model = client(swarm, ban_seconds=10.0, missing_blocks_timeout=60.0)
    try:
        hidden = model.embed_tokens(ids)
        first = next(s.peer_id for s in swarm.processes if s is not twin and "0:4" in s.argv)
        model.manager.ban(first)  # the session starts on the twin; when the twin dies, the
        # replacement route waits for this ban to end
        with torch.no_grad(), model.inference_session(max_length=tokens + 2) as session:
            outputs = [session.step(hidden[:, :500]), session.step(hidden[:, 500:tokens])]
            assert session.route[0].peer_id == twin.peer_id
            twin.kill()
            outputs.append(session.step(hidden[:, tokens:]))  # replayed on the first server
            assert session.route[0].peer_id == first
        assert model.manager.banned() <= {twin.peer_id}
        with torch.no_grad():
            expected = local_model(ids, output_hidden_states=True).hidden_states[-1]
            actual = model.norm(torch.cat(outputs, dim=1))
        torch.testing.assert_close(actual, expected, atol=1e-3, rtol=0)
    finally:
        model.close()
