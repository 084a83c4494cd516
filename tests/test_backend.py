"""SpanBackend against the reference transformers model: full forward, sub-spans, cached inference, backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarm.models.registry import family_for, prepare_config
from swarm.server.backend import SpanBackend, kv_cache_bytes

ATOL = 1e-5
NUM_LAYERS = 4


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def make_backend(model: LlamaForCausalLM, start: int, end: int) -> SpanBackend:
    """As swarm/server/server.py builds it: only the span's tensors, a prepared config."""
    config = prepare_config(LlamaConfig.from_dict(model.config.to_dict()))
    family = family_for(config)
    weights = model.state_dict()
    blocks = []
    for index in range(start, end):
        prefix = f"model.layers.{index}."
        blocks.append({k[len(prefix) :]: v.clone() for k, v in weights.items() if k.startswith(prefix)})
    return SpanBackend(family, config, start, end, blocks, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def backend(model: LlamaForCausalLM) -> SpanBackend:
    return make_backend(model, 0, NUM_LAYERS)


def embed(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.embed_tokens(ids)


def reference_span(
    model: LlamaForCausalLM,
    hidden: torch.Tensor,
    first: int,
    last: int,
    prompts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of the reference model's layers [first, last) fed `hidden` (autograd-friendly), via hooks.

    Optional deep prompts (last - first, batch, prefix, hidden) are added to each layer's leading tokens.
    """
    layers = model.model.layers
    captured: dict[str, torch.Tensor] = {}

    def pre_hook(index: int) -> Callable:
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if index == first:
                h = hidden
            if prompts is not None:
                p = prompts[index - first]
                n = p.shape[1]
                h = torch.cat([h[:, :n] + p, h[:, n:]], dim=1)
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        return hook

    def post_hook(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in range(first, last)]
    handles.append(layers[last - 1].register_forward_hook(post_hook))
    try:
        model.model(inputs_embeds=torch.zeros_like(hidden))
    finally:
        for handle in handles:
            handle.remove()
    return captured["out"]


def test_full_span_reproduces_the_model(model, backend) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 10))
    out = backend.forward(embed(model, ids), 0, NUM_LAYERS)
    assert out.shape == (2, 10, 64) and out.dtype == torch.float32
    with torch.no_grad():
        expected = model.model(ids).last_hidden_state
        torch.testing.assert_close(model.model.norm(out), expected, atol=ATOL, rtol=0)


def test_hidden_states_of_the_reference_model(model, backend) -> None:
    """forward(h_i, i, j) maps the input of layer i to the input of layer j."""
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        hs = model.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(backend.forward(hs[1], 1, 3), hs[3], atol=ATOL, rtol=0)
    torch.testing.assert_close(backend.forward(hs[0], 0, 1), hs[1], atol=ATOL, rtol=0)


def test_sub_span_backend_equals_layers_1_and_2(model) -> None:
    span = make_backend(model, 1, 3)
    assert len(span.blocks) == 2
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 64)
    with torch.no_grad():
        expected = reference_span(model, hidden, 1, 3)
    torch.testing.assert_close(span.forward(hidden, 1, 3), expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        expected_one = reference_span(model, hidden, 2, 3)
    torch.testing.assert_close(span.forward(hidden, 2, 3), expected_one, atol=ATOL, rtol=0)


def test_missing_block_weights_are_an_error(model) -> None:
    config = prepare_config(LlamaConfig.from_dict(model.config.to_dict()))
    prefix = "model.layers.1."
    block_1 = {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    with pytest.raises(RuntimeError):  # block 2's tensors are missing
        SpanBackend(family_for(config), config, 1, 3, [block_1, {}], torch.float32, torch.device("cpu"))


def test_chunked_inference_equals_full_forward(model, backend) -> None:
    """5, 3, 1, 1 tokens through the cache == one forward of all 10 (checks the cached-prefix causal mask)."""
    torch.manual_seed(4)
    hidden = embed(model, torch.randint(0, 128, (2, 10)))
    expected = backend.forward(hidden, 0, NUM_LAYERS)
    cache = backend.new_cache(0, NUM_LAYERS, batch_size=2, max_length=16)
    outputs, position = [], 0
    for n in (5, 3, 1, 1):
        outputs.append(backend.inference_step(hidden[:, position : position + n], cache))
        position += n
        assert cache.position == position
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=ATOL, rtol=0)


def test_inference_on_a_sub_chain_of_the_span(model, backend) -> None:
    """A session may run only blocks [1, 3) of a server holding [0, 4)."""
    torch.manual_seed(5)
    hidden = torch.randn(1, 6, 64)
    cache = backend.new_cache(1, 2, batch_size=1, max_length=8)
    out = torch.cat([backend.inference_step(hidden[:, :4], cache), backend.inference_step(hidden[:, 4:], cache)], 1)
    torch.testing.assert_close(out, backend.forward(hidden, 1, 3), atol=ATOL, rtol=0)


def test_rewind_equals_fresh_forward(model, backend) -> None:
    torch.manual_seed(6)
    first = embed(model, torch.randint(0, 128, (1, 9)))
    other = embed(model, torch.randint(0, 128, (1, 4)))
    cache = backend.new_cache(0, NUM_LAYERS, batch_size=1, max_length=12)
    backend.inference_step(first[:, :5], cache)
    backend.inference_step(first[:, 5:], cache)
    assert cache.position == 9
    cache.position = 6  # start_from_position: keep the first 6 tokens, replace the rest
    out = torch.cat([backend.inference_step(other[:, :3], cache), backend.inference_step(other[:, 3:], cache)], 1)
    assert cache.position == 10
    fresh = backend.forward(torch.cat([first[:, :6], other], dim=1), 0, NUM_LAYERS)
    torch.testing.assert_close(out, fresh[:, 6:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("hypo_ids", [[1, 0], [1, 1], [0, 0]])
def test_hypo_ids_reorder_the_cache(model, backend, hypo_ids: list[int]) -> None:
    """Row i continues hypothesis hypo_ids[i] (beam search)."""
    torch.manual_seed(7)
    prefix = embed(model, torch.randint(0, 128, (2, 6)))
    new = embed(model, torch.randint(0, 128, (2, 2)))
    cache = backend.new_cache(0, NUM_LAYERS, batch_size=2, max_length=10)
    backend.inference_step(prefix, cache)
    ids = torch.tensor(hypo_ids, dtype=torch.int64)
    out = backend.inference_step(new[:, :1], cache, hypo_ids=ids)
    out2 = backend.inference_step(new[:, 1:], cache)
    expected = backend.forward(torch.cat([prefix[ids], new], dim=1), 0, NUM_LAYERS)
    torch.testing.assert_close(torch.cat([out, out2], dim=1), expected[:, 6:], atol=ATOL, rtol=0)


def test_deep_prompts_forward_and_inference(model, backend) -> None:
    """Prompts are added to each block's leading tokens; in inference only the first step carries them."""
    torch.manual_seed(8)
    hidden = torch.randn(2, 8, 64)
    prompts = torch.randn(2, 2, 3, 64) * 0.5  # blocks 1 and 2, batch 2, prefix 3
    with torch.no_grad():
        expected = reference_span(model, hidden, 1, 3, prompts)
    out = backend.forward(hidden, 1, 3, prompts)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(out, backend.forward(hidden, 1, 3), atol=1e-3)  # prompts did something

    cache = backend.new_cache(1, 2, batch_size=2, max_length=8)
    steps = [backend.inference_step(hidden[:, :4], cache, prompts)]
    steps += [backend.inference_step(hidden[:, i : i + 1], cache, prompts) for i in range(4, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=ATOL, rtol=0)


def test_backward_equals_autograd(model, backend) -> None:
    torch.manual_seed(9)
    hidden = torch.randn(2, 5, 64)
    grad_out = torch.randn(2, 5, 64)
    for first, last in [(0, NUM_LAYERS), (1, 3)]:
        leaf = hidden.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(reference_span(model, leaf, first, last), leaf, grad_out)
        grad, grad_prompts = backend.backward(hidden, grad_out, first, last)
        assert grad_prompts is None
        assert grad.shape == hidden.shape
        torch.testing.assert_close(grad, expected, atol=ATOL, rtol=0)
    assert all(not p.requires_grad for p in backend.blocks.parameters())  # server weights stay frozen


def test_backward_with_prompts(model, backend) -> None:
    torch.manual_seed(10)
    hidden = torch.randn(1, 6, 64)
    prompts = torch.randn(2, 1, 2, 64)
    grad_out = torch.randn(1, 6, 64)
    leaf_h = hidden.clone().requires_grad_(True)
    leaf_p = prompts.clone().requires_grad_(True)
    expected_h, expected_p = torch.autograd.grad(
        reference_span(model, leaf_h, 2, 4, leaf_p), (leaf_h, leaf_p), grad_out
    )
    grad_h, grad_p = backend.backward(hidden, grad_out, 2, 4, prompts)
    torch.testing.assert_close(grad_h, expected_h, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad_p, expected_p, atol=ATOL, rtol=0)


def test_cache_sizes(model, backend) -> None:
    config = backend.config
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * 3 * 2 * config.num_key_value_heads * 16 * head_dim * 4
    assert backend.cache_bytes(3, 2, 16) == expected
    assert kv_cache_bytes(backend.cache_layout, 3, 2, 16, torch.bfloat16) == expected // 2
    cache = backend.new_cache(1, 3, batch_size=2, max_length=16)
    assert cache.keys.shape == (3, 2, config.num_key_value_heads, 16, head_dim)
    assert cache.keys.nbytes + cache.values.nbytes == expected
    assert cache.position == 0 and cache.first_block == 1
