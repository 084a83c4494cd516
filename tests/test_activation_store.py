"""Forwards kept for their backward: the store's budgets, time limits and matching, and the handler
reusing a kept forward only for the same peer and inputs."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoConfig

from swarm.checkpoint import CheckpointFiles
from swarm.models.registry import family_for, prepare_config
from swarm.names import block_uids, join_chain
from swarm.server.activations import ActivationStore, KeptForward
from swarm.server.backend import load_span
from swarm.server.handler import TransformerConnectionHandler
from swarm.server.memory_cache import KVCachePool
from swarm.wire import dumps_metadata, pack_args
from tests.conftest import DEMO_MODEL


def _kept(value: float = 1.0, prompts: torch.Tensor | None = None) -> KeptForward:
    hidden = torch.full((1, 2, 4), value)
    return KeptForward(0, 2, hidden, prompts, hidden * 2)


def test_a_kept_forward_is_returned_once_to_its_peer_only():
    store = ActivationStore(max_bytes=100, max_bytes_per_peer=100)
    assert store.put("alice", "a", _kept(), 10)
    assert store.pop("bob", "a") is None
    assert store.pop("alice", "a") is not None
    assert store.pop("alice", "a") is None
    assert store.bytes_used == 0


def test_budgets_drop_the_oldest_first_and_refuse_what_never_fits():
    store = ActivationStore(max_bytes=100, max_bytes_per_peer=60)
    assert not store.put("alice", "huge", _kept(), 61)
    for index in range(4):
        assert store.put("alice", str(index), _kept(), 20)
    assert store.bytes_used == 60 and store.pop("alice", "0") is None  # alice's own oldest went first
    assert store.put("bob", "b", _kept(), 50)
    assert store.bytes_used <= 100 and store.pop("bob", "b") is not None


def test_entries_expire(monkeypatch):
    now = [1000.0]  # the store's clock, moved by the test
    monkeypatch.setattr("swarm.server.activations.time.monotonic", lambda: now[0])
    store = ActivationStore(max_bytes=100, max_bytes_per_peer=100, ttl=60.0)
    store.put("alice", "a", _kept(), 10)
    store.put("alice", "b", _kept(), 10)
    now[0] += 59.0
    assert store.pop("alice", "a") is not None  # still there before its time
    now[0] += 1.5
    assert store.pop("alice", "b") is None and store.bytes_used == 0


def test_a_backward_matches_only_the_same_blocks_and_inputs():
    prompts = torch.ones(2, 1, 1, 4)
    kept = _kept(prompts=prompts)
    hidden = torch.ones(1, 2, 4)
    assert kept.matches(0, 2, hidden, prompts)
    assert not kept.matches(0, 1, hidden, prompts)
    assert not kept.matches(0, 2, hidden + 1e-6, prompts)
    assert not kept.matches(0, 2, hidden, None)
    assert not kept.matches(0, 2, hidden, prompts * 2)
    assert not kept.matches(0, 2, torch.ones(1, 3, 4), prompts)
    assert not kept.matches(0, 2, hidden, prompts, adapter="other")


# ----- the handler keeps a training client's forward for its backward -----


@pytest.fixture(scope="module")
def backend():
    config = prepare_config(AutoConfig.from_pretrained(DEMO_MODEL))
    return load_span(CheckpointFiles(DEMO_MODEL), family_for(config), config, 0, 2, torch.float32, torch.device("cpu"))


def _handler(backend, budget: int = 2**28) -> TransformerConnectionHandler:
    return TransformerConnectionHandler(
        backend, "demo_model-hf", KVCachePool(2**20), max_length=64, max_kept_activation_bytes=budget
    )


def _request(tensors: list[torch.Tensor], **metadata) -> tuple[runtime_pb2.ExpertRequest, list[torch.Tensor]]:
    tensors, structure = pack_args(tensors)
    uid = join_chain(block_uids("demo_model-hf", 0, 2))
    request = runtime_pb2.ExpertRequest(uid=uid, metadata=dumps_metadata({"args_structure": structure, **metadata}))
    return request, tensors


def _peer(name: str) -> SimpleNamespace:
    return SimpleNamespace(remote_id=name)  # what the handler reads of hivemind's P2PContext


def _train_step(handler, hidden, grad, forward_peer="alice", backward_peer="alice", backward_hidden=None):
    async def run():
        forward = await handler._forward(
            *_request([hidden, torch.empty(0)], keep_for_backward="k"), _peer(forward_peer)
        )
        inputs = hidden if backward_hidden is None else backward_hidden
        request = _request([inputs, grad, torch.empty(0)], keep_for_backward="k")
        return forward, await handler._backward(*request, _peer(backward_peer))

    return asyncio.run(run())


def test_a_backward_reuses_the_kept_forward_and_gets_the_same_gradients(backend):
    hidden = torch.randn(2, 7, backend.hidden_size, generator=torch.Generator().manual_seed(0))
    grad = torch.randn_like(hidden)
    expected_output = backend.forward(hidden, 0, 2)
    expected_grad, _ = backend.backward(hidden, grad, 0, 2)

    handler = _handler(backend)
    output, (grad_hidden,) = _train_step(handler, hidden, grad)
    assert handler.activations.hits == 1 and len(handler.activations) == 0
    torch.testing.assert_close(output, expected_output, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_hidden, expected_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "case", ["another peer", "other inputs", "no budget"], ids=["another-peer", "other-inputs", "no-budget"]
)
def test_a_backward_that_does_not_match_recomputes(backend, case):
    hidden = torch.randn(1, 5, backend.hidden_size, generator=torch.Generator().manual_seed(1))
    grad = torch.randn_like(hidden)
    other = hidden + 1.0
    handler = _handler(backend, budget=0 if case == "no budget" else 2**28)
    _, (grad_hidden,) = _train_step(
        handler,
        hidden,
        grad,
        backward_peer="mallory" if case == "another peer" else "alice",
        backward_hidden=other if case == "other inputs" else None,
    )
    assert handler.activations.hits == 0
    expected, _ = backend.backward(other if case == "other inputs" else hidden, grad, 0, 2)
    torch.testing.assert_close(grad_hidden, expected, atol=1e-6, rtol=0)
