"""A server dies mid-generation: the client replays the session elsewhere and the tokens do not change."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.client.inference_session import SessionError
from tests.conftest import DEMO_MODEL, start_swarm

pytestmark = pytest.mark.integration


class KillAfter(BaseStreamer):
    """Kills the server that holds the session's first span once `count` tokens have streamed."""

    def __init__(self, count: int, session, processes_by_peer):
        self.count, self.session, self.processes_by_peer = count, session, processes_by_peer
        self.seen = 0
        self.killed: str | None = None

    def put(self, value):
        self.seen += 1
        if self.seen == self.count and self.killed is None:
            self.killed = self.session.route[0].peer_id
            self.processes_by_peer[self.killed].kill()

    def end(self):
        pass


@pytest.mark.parametrize("spans", [("0:8", "0:8"), ("0:5", "3:8", "0:8")], ids=["twins", "overlapping"])
def test_generation_survives_a_killed_server(make_swarm, spans):
    swarm = start_swarm(make_swarm, *spans)
    try:
        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
        local = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
        inputs = tokenizer("Assignment statements are used to", return_tensors="pt").input_ids
        expected = local.generate(inputs, max_new_tokens=32, do_sample=False, min_new_tokens=32)

        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=swarm.initial_peers, request_timeout=10.0
        )
        try:
            by_peer = {p.peer_id: p for p in swarm.processes if p.peer_id}
            with model.inference_session(max_length=inputs.shape[1] + 32) as session:
                killer = KillAfter(12, session, by_peer)
                actual = model.generate(
                    inputs, max_new_tokens=32, do_sample=False, min_new_tokens=32, session=session, streamer=killer
                )
                assert killer.killed is not None
                assert killer.killed not in {span.peer_id for span in session.route}
            assert actual.tolist() == expected.tolist()
        finally:
            model.close()
    finally:
        swarm.close()


def test_a_server_gone_before_the_session_opens_is_avoided(make_swarm, caplog):
    """The DHT still lists a server that has died: opening its stream fails, the client picks the other."""
    swarm = start_swarm(make_swarm, "0:8", "0:8")
    try:
        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
        local = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
        inputs = tokenizer("The for statement is used to", return_tensors="pt").input_ids
        expected = local.generate(inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)

        model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
        try:
            (first_choice,) = run_sync(model.manager.make_route(0, 8), timeout=60)
            victim = next(p for p in swarm.processes if p.peer_id == first_choice.peer_id)
            victim.kill()
            with caplog.at_level(logging.WARNING, logger="swarm.client.inference_session"):
                actual = model.generate(inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
            assert f"Server {first_choice.peer_id} cannot be reached" in caplog.text
            assert actual.tolist() == expected.tolist()
        finally:
            model.close()
    finally:
        swarm.close()


def test_a_server_that_fails_every_step_is_given_up_on_with_a_clear_error(make_swarm, caplog):
    """A server that refuses every session (here: its max length is below the session's) costs each retry a
    WARNING naming it and its error; after max_retries the step fails with a SessionError that says why, and
    the session refuses further steps instead of feeding servers tokens at different positions."""
    swarm = start_swarm(make_swarm, "0:8", extra=("--max-length", "16"))
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=swarm.initial_peers, max_retries=2, ban_seconds=0.2, missing_blocks_timeout=5
        )
        try:
            peer = swarm.processes[-1].peer_id
            with model.inference_session(max_length=64) as session:
                failing = pytest.raises(SessionError, match=r"failed 3 times \(max_retries=2\).*max_length")
                with caplog.at_level(logging.WARNING, logger="swarm.client.inference_session"), failing:
                    session.step(torch.zeros(1, 2, model.config.hidden_size))
                assert caplog.text.count(f"Server {peer} failed on blocks 0:8") == 2  # the retries; then it gives up
                with pytest.raises(SessionError, match="open a new one"):
                    session.step(torch.zeros(1, 2, model.config.hidden_size))
        finally:
            model.close()
    finally:
        swarm.close()


def test_a_replacement_that_fails_while_replaying_counts_as_a_failure(make_swarm):
    """The server of a session dies; the only replacement refuses the replay: the client retries within
    max_retries and fails with a SessionError, not with the replacement's raw error."""
    swarm = start_swarm(make_swarm, "0:8")
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=swarm.initial_peers, max_retries=2, ban_seconds=0.2, missing_blocks_timeout=5
        )
        try:
            with model.inference_session(max_length=64) as session:
                session.step(torch.zeros(1, 4, model.config.hidden_size))
                first = swarm.processes[-1]
                swarm.start_server(DEMO_MODEL, "--block-indices", "0:8", "--max-length", "16")
                first.kill()
                run_sync(model.manager.refresh(force=True), timeout=60)
                with pytest.raises(SessionError, match=r"max_retries=2"):
                    session.step(torch.zeros(1, 1, model.config.hidden_size))
        finally:
            model.close()
    finally:
        swarm.close()
