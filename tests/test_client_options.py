"""from_pretrained's keywords: transformers 5's `dtype`, Petals' `torch_dtype`, and clear errors for the rest."""

from __future__ import annotations

import pytest
import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.client.distributed import resolve_dtype as _resolve_dtype
from tests.conftest import DEMO_MODEL, start_swarm


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
    for wrong in ("int8", "float99", torch.int64, 16, object()):
        with pytest.raises(ValueError, match="floating-point"):
            _resolve_dtype(wrong)


def test_dtype_and_torch_dtype_that_disagree_are_refused_before_joining() -> None:
    with pytest.raises(ValueError, match="disagree"):
        AutoDistributedModelForCausalLM.from_pretrained(
            DEMO_MODEL, initial_peers=[], dtype=torch.bfloat16, torch_dtype="float32"
        )


@pytest.mark.integration
def test_dtype_and_torch_dtype_load_a_bfloat16_client_that_generates(make_swarm) -> None:
    swarm = start_swarm(make_swarm, "0:8")
    try:
        outputs = []
        for keywords in (
            {"dtype": torch.bfloat16},
            {"torch_dtype": "bfloat16"},
            {"dtype": "bfloat16", "torch_dtype": torch.bfloat16},
        ):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                DEMO_MODEL, initial_peers=swarm.initial_peers, **keywords
            )
            try:
                assert model.dtype == torch.bfloat16, keywords
                assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
                outputs.append(model.generate(torch.tensor([[1, 60, 61, 62]]), max_new_tokens=6, do_sample=False))
            finally:
                model.close()
        assert outputs[0].shape == (1, 10)
        assert all(torch.equal(output, outputs[0]) for output in outputs)  # the same model, whichever keyword
    finally:
        swarm.close()
