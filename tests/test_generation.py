"""Distributed generation equals local transformers generation on the demo model, token for token."""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.server.handler import fetch_server_info
from tests.conftest import DEMO_MODEL, start_swarm

pytestmark = pytest.mark.integration

PROMPT = "The function returns the value of"


@pytest.fixture(scope="module")
def local_model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module", params=[("0:8",), ("0:4", "4:8")], ids=["one-server", "two-servers"])
def swarm(request, make_swarm):
    swarm = start_swarm(make_swarm, *request.param)
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.close()


def test_greedy_generation_matches_local(model, local_model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = local_model.generate(inputs, max_new_tokens=32, do_sample=False)
    actual = model.generate(inputs, max_new_tokens=32, do_sample=False)
    assert actual.tolist() == expected.tolist()


def test_forward_logits_and_hidden_states_match_local(model, local_model, tokenizer):
    inputs = tokenizer("Numbers are created by numeric literals", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = local_model(inputs, output_hidden_states=True)
        actual = model(inputs, output_hidden_states=True)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=0)
    # Our last hidden state is after the final norm, like transformers' last entry.
    torch.testing.assert_close(actual.hidden_states[-1], expected.hidden_states[-1], atol=1e-4, rtol=0)


def test_dtype_keyword_of_transformers_5_and_torch_dtype_of_petals(swarm, model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    for keyword in ("dtype", "torch_dtype"):
        half = AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=swarm.initial_peers, **{keyword: torch.bfloat16}
        )
        try:
            assert half.lm_head.weight.dtype == torch.bfloat16
            assert half.generate(inputs, max_new_tokens=4, do_sample=False).shape[1] == inputs.shape[1] + 4
        finally:
            half.close()


def test_sampling_with_seed_matches_local(model, local_model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    options = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2)
    torch.manual_seed(7)
    expected = local_model.generate(inputs, **options)
    torch.manual_seed(7)
    actual = model.generate(inputs, **options)
    assert actual.tolist() == expected.tolist()


def test_session_reuse_sends_only_new_tokens(model, local_model, tokenizer):
    first = tokenizer(PROMPT, return_tensors="pt").input_ids
    with model.inference_session(max_length=128) as session:
        reply = model.generate(first, max_new_tokens=8, do_sample=False, session=session)
        sent_after_first = session.tokens_sent
        assert sent_after_first == reply.shape[1] - 1  # the last token was sampled, not yet sent
        follow_up = tokenizer(" and the list", return_tensors="pt", add_special_tokens=False).input_ids
        conversation = torch.cat([reply, follow_up], dim=1)
        second = model.generate(conversation, max_new_tokens=8, do_sample=False, session=session)
        # Only the last generated token, the follow-up and the new tokens cross the network.
        new_tokens = second.shape[1] - conversation.shape[1]
        assert session.tokens_sent - sent_after_first == 1 + follow_up.shape[1] + new_tokens - 1
    expected = local_model.generate(conversation, max_new_tokens=8, do_sample=False)
    assert second.tolist() == expected.tolist()


def test_stop_strings_and_streamer(model, tokenizer, local_model):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    streamer = Collect()
    output = model.generate(inputs, max_new_tokens=12, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] == "end"
    assert sum(len(c) for c in streamer.chunks[:-1]) == output.shape[1]  # prompt first, then each token

    # A word from early in the reply: generation must end right after it, well before max_new_tokens.
    text = tokenizer.decode(output[0, inputs.shape[1] :])
    stop = text.split()[1]
    options = dict(max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    expected = local_model.generate(inputs, **options)
    assert expected.shape[1] < output.shape[1], "the stop string must end the reference early"
    stopped = model.generate(inputs, **options)
    assert stopped.tolist() == expected.tolist()  # ignoring the stop string would give all 12 tokens
    assert tokenizer.decode(stopped[0, inputs.shape[1] :]).rstrip().endswith(stop)


def test_gradients_flow_through_remote_blocks(model, local_model, tokenizer):
    inputs = tokenizer("Assignment statements", return_tensors="pt").input_ids
    embeddings = local_model.model.embed_tokens(inputs).detach()

    remote_input = embeddings.clone().requires_grad_(True)
    with torch.enable_grad():
        remote_logits = model(inputs_embeds=remote_input).logits
        remote_logits.square().mean().backward()

    local_input = embeddings.clone().requires_grad_(True)
    with torch.enable_grad():
        local_logits = local_model(inputs_embeds=local_input).logits
        local_logits.square().mean().backward()
    torch.testing.assert_close(remote_input.grad, local_input.grad, atol=1e-5, rtol=1e-3)


def pushes_received(model, swarm) -> list[int]:
    """Each block server's count of pushed steps it computed (its rpc_info), in the order they started."""
    counts = []
    for server in (process for process in swarm.processes if process.peer_id):
        info = run_sync(fetch_server_info(model.manager.p2p, PeerID.from_base58(server.peer_id)), timeout=30)
        counts.append(info["pushes_received"])
    return counts


def test_server_to_server_push_gives_the_same_tokens(swarm, model, local_model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = local_model.generate(inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    default = model.manager.config.use_server_to_server
    before = pushes_received(model, swarm)
    model.manager.config.use_server_to_server = False
    try:
        relayed = model.generate(inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert pushes_received(model, swarm) == before  # switched off: the client relays every step
        before = pushes_received(model, swarm)
        model.manager.config.use_server_to_server = True
        actual = model.generate(inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    finally:
        model.manager.config.use_server_to_server = default
    assert relayed.tolist() == expected.tolist()
    assert actual.tolist() == expected.tolist()
    pushed = [after - earlier for after, earlier in zip(pushes_received(model, swarm), before)]
    if len(pushed) == 1:
        assert pushed == [0]  # one server holds the whole chain: nobody to push to
    else:
        # The first server pushes each step after the prompt's to the second (the client's own copy of a step
        # that arrives after the push is a duplicate, not counted): some pushes must have been computed there.
        assert pushed[0] == 0 and pushed[1] >= 1, pushed


def test_long_forward_streams_and_matches_local(model, local_model):
    # 1100 tokens of hidden states exceed a unary message: rpc_forward_stream carries them.
    inputs = torch.randint(5, 4000, (1, 1100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = local_model(inputs).logits[:, -5:]
        actual = model(inputs).logits[:, -5:]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
