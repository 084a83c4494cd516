"""from_pretrained's keywords: transformers 5's `dtype`, Petals' `torch_dtype`, and clear errors for the rest."""

from __future__ import annotations

import pytest
import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.client.distributed import resolve_dtype as _resolve_dtype
from tests.conftest import DEMO_MODEL


def test_unknown_keyword_names_the_accepted_ones() -> None:
    with pytest.raises(TypeError) as error:
        AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=[], dtyp=torch.bfloat16)
    message = str(error.value)
    assert "dtyp" in message
    for accepted in ("dtype", "torch_dtype", "request_timeout", "use_server_to_server"):
        assert accepted in message
    assert message.count("dht_prefix") == 1


def test_dtype_names_and_objects_resolve() -> None:
    assert _resolve_dtype(None) is torch.float32
    assert _resolve_dtype("auto") is torch.float32
    assert _resolve_dtype("bfloat16") is torch.bfloat16
    assert _resolve_dtype("torch.float16") is torch.float16
    assert _resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="floating-point"):
        _resolve_dtype("int8")
