"""Blocks nobody serves: a clear error naming the model and the uncovered blocks, after a bounded wait."""

from __future__ import annotations

import time

import pytest
import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.client.routing import MissingBlocksError
from tests.conftest import DEMO_MODEL, start_swarm

pytestmark = pytest.mark.integration


def test_uncovered_blocks_are_named(make_swarm):
    swarm = start_swarm(make_swarm, "0:4", "6:8")
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=swarm.initial_peers, missing_blocks_timeout=3.0
        )
        try:
            began = time.monotonic()
            with pytest.raises(MissingBlocksError, match=r"blocks 4–5 of .*demo_model are not served"):
                model.generate(torch.tensor([[1, 40, 50]]), max_new_tokens=2)
            assert 3.0 <= time.monotonic() - began < 30
            with pytest.raises(MissingBlocksError, match="blocks 4–5"):
                model(torch.tensor([[1, 40, 50]]))
        finally:
            model.close()
    finally:
        swarm.close()
