"""Prompt tuning through real servers: losses and gradients equal local autograd, also when a server
dies in the middle of a backward pass; generation with tuned prompts equals the local model's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import swarm.client.remote_sequential as remote_sequential
from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from tests.conftest import DEMO_MODEL, start_swarm
from tests.prompt_reference import causal_lm_loss, local_logits_with_prompts

pytestmark = pytest.mark.integration

PRE_SEQ_LEN = 3


@pytest.fixture(scope="module")
def swarm(make_swarm):
    """A whole-model server and two ways of covering it in halves, so a retry has somewhere to go."""
    swarm = start_swarm(make_swarm, "0:8", "0:4", "0:4", "4:8")
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def local_model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


def _distributed(swarm, tuning_mode: str):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        DEMO_MODEL, initial_peers=swarm.initial_peers, tuning_mode=tuning_mode, pre_seq_len=PRE_SEQ_LEN
    )
    torch.manual_seed(0)
    with torch.no_grad():  # deep prompts start at zero; make them matter
        for parameter in model.prompt_tuning.parameters():
            parameter.normal_(std=0.5)
    return model


def _reference(local_model, model, input_ids):
    """Loss and prompt gradients of the same prompts on the local model."""
    tuning = model.prompt_tuning
    prefix = tuning.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep_weight = None
    if tuning.intermediate_prompt_embeddings is not None:
        deep_weight = tuning.intermediate_prompt_embeddings.weight.detach().clone().requires_grad_(True)
    batch = input_ids.shape[0]
    deep = None
    if deep_weight is not None:
        deep = deep_weight.view(PRE_SEQ_LEN, tuning.num_blocks, -1).permute(1, 0, 2).unsqueeze(1)
        deep = deep.expand(-1, batch, -1, -1)
    logits = local_logits_with_prompts(local_model, input_ids, prefix.unsqueeze(0).expand(batch, -1, -1), deep)
    loss = causal_lm_loss(logits, input_ids)
    loss.backward()
    return loss.detach(), prefix.grad, (deep_weight.grad if deep_weight is not None else None)


def _assert_matches_local(local_model, model, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    expected_loss, expected_prefix, expected_deep = _reference(local_model, model, input_ids)
    torch.testing.assert_close(loss.detach(), expected_loss, atol=1e-4, rtol=0)
    tuning = model.prompt_tuning
    torch.testing.assert_close(tuning.prompt_embeddings.weight.grad, expected_prefix, atol=1e-4, rtol=0)
    if expected_deep is not None:
        assert expected_deep.abs().max() > 1e-3  # the comparison below means something
        torch.testing.assert_close(tuning.intermediate_prompt_embeddings.weight.grad, expected_deep, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tuning_mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_equal_local_autograd(swarm, local_model, tuning_mode):
    model = _distributed(swarm, tuning_mode)
    try:
        assert {name for name, p in model.named_parameters() if p.requires_grad} == {
            f"prompt_tuning.{name}" for name, _ in model.prompt_tuning.named_parameters()
        }
        input_ids = torch.randint(3, 2000, (2, 11), generator=torch.Generator().manual_seed(1))
        _assert_matches_local(local_model, model, input_ids)
    finally:
        model.close()


def _local_greedy(local_model, model, input_ids, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of the local model with the distributed model's prompts (no cache: short runs)."""
    tuning = model.prompt_tuning
    with torch.no_grad():
        prefix, deep = tuning(input_ids.shape[0])
        for _ in range(new_tokens):
            logits = local_logits_with_prompts(local_model, input_ids, prefix, deep)
            input_ids = torch.cat([input_ids, logits[:, -1:].argmax(dim=-1)], dim=1)
    return input_ids


@pytest.mark.parametrize("tuning_mode", ["ptune", "deep_ptune"])
def test_generation_with_tuned_prompts_equals_local(swarm, local_model, tuning_mode):
    model = _distributed(swarm, tuning_mode)
    greedy = {"do_sample": False, "repetition_penalty": 1.0}  # plain argmax, as the reference decodes
    try:
        inputs = torch.tensor([[0, 485, 299, 88, 2070]])
        expected = _local_greedy(local_model, model, inputs, 12)
        untuned = AutoModelForCausalLM.from_pretrained(DEMO_MODEL).generate(inputs, max_new_tokens=12, **greedy)
        assert expected.tolist() != untuned.tolist()  # the prompts change the output
        assert model.generate(inputs, max_new_tokens=12, **greedy).tolist() == expected.tolist()

        # A session keeps the prefix on the servers: a second turn sends only its new tokens.
        with model.inference_session(max_length=40) as session:
            first = model.generate(inputs, max_new_tokens=6, session=session, **greedy)
            assert session.prefix_length == PRE_SEQ_LEN and session.token_position == first.shape[1] - 1
            sent = session.tokens_sent
            more = torch.cat([first, torch.tensor([[298, 342]])], dim=1)
            second = model.generate(more, max_new_tokens=6, session=session, **greedy)
            assert session.tokens_sent - sent == 2 + 1 + 5  # the last generated token, two new ones, then steps
        assert second.tolist() == _local_greedy(local_model, model, more, 6).tolist()
    finally:
        model.close()


def test_a_server_killed_mid_backward_does_not_count_prompt_gradients_twice(swarm, local_model, monkeypatch):
    """Forward on the whole-model server, which then dies. The backward's retry goes through two half
    servers: the second half answers, then the first half is killed as the client calls it. The
    next attempt must not add the second half's deep-prompt gradients a second time."""
    model = _distributed(swarm, "deep_ptune")
    manager = model.manager
    by_peer = {p.peer_id: p for p in swarm.processes if p.peer_id}
    spans = {info.peer_id: (info.start, info.end) for info in _online_spans(manager)}
    whole = next(peer for peer, span in spans.items() if span == (0, 8))
    halves = [peer for peer in spans if peer != whole]
    killed: list[str] = []
    original_call = remote_sequential._call

    async def call_and_kill(manager, span, method, tensors, *args):
        if method == "rpc_backward" and span.start == 0 and span.end == 4 and not killed:
            killed.append(span.peer_id)
            by_peer[span.peer_id].kill()
        return await original_call(manager, span, method, tensors, *args)

    monkeypatch.setattr(remote_sequential, "_call", call_and_kill)
    try:
        input_ids = torch.randint(3, 2000, (1, 9), generator=torch.Generator().manual_seed(2))
        for peer in halves:  # the forward pass goes through the whole-model server only
            manager.ban(peer)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        manager._banned_until.clear()
        by_peer[whole].kill()
        loss.backward()
        assert len(killed) == 1
        _, expected_prefix, expected_deep = _reference(local_model, model, input_ids)
        tuning = model.prompt_tuning
        torch.testing.assert_close(tuning.prompt_embeddings.weight.grad, expected_prefix, atol=1e-4, rtol=0)
        torch.testing.assert_close(tuning.intermediate_prompt_embeddings.weight.grad, expected_deep, atol=1e-4, rtol=0)
    finally:
        model.close()


def _online_spans(manager):
    return run_sync(manager.refresh(force=True), timeout=60).online_spans()
