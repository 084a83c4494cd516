"""Served LoRA adapters (`runblockserver --adapters`): requests pick one by name and get peft's outputs."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoTokenizer, LlamaForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client.event_loop import run_sync
from swarm.dht import fetch_swarm
from swarm.models.bloom import BLOOM
from swarm.models.llama import LLAMA
from swarm.names import block_uids, join_chain
from swarm.server.adapters import lora_scaling, parse_lora_tensor_name
from swarm.wire import deserialize, dumps_metadata, pack_args, serialize
from tests.conftest import DEMO_MODEL, ROOT, start_swarm

PREFIX = "demo_model-hf"
PROMPT = "The function returns the value of"
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


# ----- pure parts -----


def test_lora_tensor_names_map_to_blocks_and_layers():
    llama = LLAMA.checkpoint
    parsed = parse_lora_tensor_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", llama)
    assert (parsed.block, parsed.module, parsed.kind) == (3, "self_attn.q_proj", "lora_A.weight")
    assert parsed.key == "model.layers.3.self_attn.q_proj"
    # An adapter trained on the bare base model (LlamaModel) has no `model.` part.
    parsed = parse_lora_tensor_name("base_model.model.layers.12.mlp.down_proj.lora_B.bias", llama)
    assert (parsed.block, parsed.module, parsed.kind) == (12, "mlp.down_proj", "lora_B.bias")
    bloom = parse_lora_tensor_name(
        "base_model.model.transformer.h.0.self_attention.query_key_value.lora_B.weight", BLOOM.checkpoint
    )
    assert (bloom.block, bloom.module) == (0, "self_attention.query_key_value")
    # Outside the blocks: not the server's business.
    assert parse_lora_tensor_name("base_model.model.lm_head.lora_A.weight", llama) is None
    assert parse_lora_tensor_name("base_model.model.model.embed_tokens.lora_embedding_A", llama) is None
    # Inside a block but not LoRA (DoRA magnitudes, trained biases): recognised, to be refused.
    other = parse_lora_tensor_name("base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector", llama)
    assert (other.block, other.kind) == (1, None)


def test_lora_scaling_follows_peft():
    config = types.SimpleNamespace(r=8, lora_alpha=16, use_rslora=False, rank_pattern={}, alpha_pattern={})
    assert lora_scaling(config, "model.layers.0.self_attn.q_proj") == (8, 2.0)
    config.use_rslora = True
    assert lora_scaling(config, "model.layers.0.self_attn.q_proj") == (8, 16 / 8**0.5)
    config = types.SimpleNamespace(
        r=8, lora_alpha=16, use_rslora=False, rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.1\.mlp.*": 4}
    )
    assert lora_scaling(config, "model.layers.0.self_attn.q_proj") == (4, 4.0)
    assert lora_scaling(config, "model.layers.1.mlp.down_proj") == (8, 0.5)
    assert lora_scaling(config, "model.layers.0.self_attn.v_proj") == (8, 2.0)


def test_a_playground_model_may_name_an_adapter():
    from django.core.exceptions import ImproperlyConfigured

    from playground.catalog import parse_models

    specs = parse_models({"lora": {"path": DEMO_MODEL, "adapter": "org/lora"}, "base": DEMO_MODEL})
    assert specs["lora"].adapter == "org/lora" and specs["base"].adapter is None
    with pytest.raises(ImproperlyConfigured, match="'adapter' must be a string"):
        parse_models({"lora": {"path": DEMO_MODEL, "adapter": ["org/lora"]}})
    with pytest.raises(ImproperlyConfigured, match="'client' may only set"):  # one way to say it
        parse_models({"lora": {"path": DEMO_MODEL, "client": {"active_adapter": "org/lora"}}})


# ----- a swarm with adapters -----


def make_adapter(path, seed: int) -> str:
    """A LoRA adapter of the demo model whose lora_B weights are random, so that it changes the outputs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapter(root / "lora-a", 0), make_adapter(root / "lora-b", 1)


def local_peft(path: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32), path).eval()


@pytest.fixture(scope="module")
def references(adapters):
    return {
        None: LlamaForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval(),
        adapters[0]: local_peft(adapters[0]),
        adapters[1]: local_peft(adapters[1]),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def swarm(make_swarm, adapters):
    """Blocks 0:4 and 4:8 with both adapters, and one server of all blocks with none."""
    swarm = start_swarm(make_swarm, "0:4", "4:8", extra=("--adapters", *adapters))
    try:
        swarm.start_server(DEMO_MODEL, "--block-indices", "0:8", name="plain")
    except BaseException:
        swarm.close()
        raise
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def servers(swarm) -> dict[str, str]:
    """Peer ids: first (0:4), second (4:8), plain (0:8, no adapters)."""
    first, second, plain = (process.peer_id for process in swarm.processes[1:4])
    return {"first": first, "second": second, "plain": plain}


@pytest.fixture(scope="module")
def model(swarm, adapters):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        DEMO_MODEL, initial_peers=swarm.initial_peers, active_adapter=adapters[0]
    )
    yield model
    model.close()


@pytest.mark.integration
def test_announcements_carry_the_adapter_names(model, servers, adapters):
    view = fetch_swarm(model.dht, PREFIX, 8)
    announced = {peer: span.server_info.adapters for peer, span in view.spans.items()}
    assert announced[servers["first"]] == announced[servers["second"]] == adapters
    assert announced[servers["plain"]] == ()


@pytest.mark.integration
def test_greedy_generation_with_an_adapter_matches_peft(model, references, tokenizer, servers, adapters):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = references[adapters[0]].generate(inputs, max_new_tokens=24, do_sample=False)
    base = references[None].generate(inputs, max_new_tokens=24, do_sample=False)
    assert expected.tolist() != base.tolist()  # the adapter matters, so this test can fail
    with model.inference_session(max_length=64) as session:
        actual = model.generate(inputs, max_new_tokens=24, do_sample=False, session=session)
        route = [span.peer_id for span in session.route]
    assert actual.tolist() == expected.tolist()
    # The single server of all blocks is one hop, so the route would take it if it could.
    assert servers["plain"] in {span.peer_id for span in model.manager.view.online_spans()}
    assert route == [servers["first"], servers["second"]]


@pytest.mark.integration
def test_forward_and_backward_with_an_adapter_match_peft(model, references, tokenizer, adapters):
    inputs = tokenizer("Numbers are created by numeric literals", return_tensors="pt").input_ids
    local = references[adapters[0]]
    weights = torch.randn(1, inputs.shape[1], model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    results = []
    for forward, embeddings in ((model, model.embed_tokens), (local, local.get_input_embeddings())):
        embeds = embeddings(inputs).detach().requires_grad_(True)
        logits = forward(inputs_embeds=embeds).logits
        (logits * weights).sum().backward()
        results.append((logits.detach(), embeds.grad))
    (logits, grad), (expected_logits, expected_grad) = results
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert (references[None](inputs).logits - expected_logits).abs().max() > 0.1  # the adapter matters


def rpc_forward(model, peer_id: str, start: int, end: int, hidden: torch.Tensor, **metadata) -> torch.Tensor:
    tensors, structure = pack_args([hidden, torch.empty(0)])
    request = runtime_pb2.ExpertRequest(
        uid=join_chain(block_uids(PREFIX, start, end)),
        tensors=[serialize(t) for t in tensors],
        metadata=dumps_metadata({"args_structure": structure, **metadata}),
    )
    response = run_sync(model.manager.stub(peer_id).rpc_forward(request, timeout=30), timeout=60)
    return deserialize(response.tensors)[0]


@pytest.mark.integration
def test_each_request_picks_its_adapter_or_none(model, references, tokenizer, servers, adapters):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = {
            name: reference(inputs, output_hidden_states=True).hidden_states for name, reference in references.items()
        }
    embeds = expected[None][0]
    for name in (None, adapters[1], adapters[0], None):  # interleaved on the same server
        hidden = rpc_forward(model, servers["first"], 0, 4, embeds, active_adapter=name)
        torch.testing.assert_close(hidden, expected[name][4], atol=1e-5, rtol=0)
    assert (expected[adapters[0]][4] - expected[None][4]).abs().max() > 0.1
    hidden = rpc_forward(model, servers["second"], 4, 8, expected[adapters[1]][4], active_adapter=adapters[1])
    torch.testing.assert_close(
        references[adapters[1]].base_model.model.model.norm(hidden), expected[adapters[1]][8], atol=1e-5, rtol=0
    )

    with pytest.raises(Exception, match="adapter 'org/unknown' is not served here"):
        rpc_forward(model, servers["first"], 0, 4, embeds, active_adapter="org/unknown")
    with pytest.raises(Exception, match=r"is not served here \(this server serves: none\)"):
        rpc_forward(model, servers["plain"], 0, 4, embeds, active_adapter=adapters[0])
    with pytest.raises(Exception, match="active_adapter must be a string"):
        rpc_forward(model, servers["first"], 0, 4, embeds, active_adapter=3)


@pytest.mark.integration
def test_no_server_with_the_adapter_is_a_clear_routing_error(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        DEMO_MODEL, initial_peers=swarm.initial_peers, active_adapter="org/nobody-serves-this", missing_blocks_timeout=1
    )
    try:
        with pytest.raises(Exception, match="server with adapter 'org/nobody-serves-this'"):
            model.generate(torch.tensor([[1, 60, 61]]), max_new_tokens=2)
    finally:
        model.close()


# ----- refused at startup -----


def runblockserver(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "runblockserver", DEMO_MODEL, "--new-swarm", *args],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        (str(ROOT / "no-such-adapter"), "no such folder"),
        (DEMO_MODEL, "has no adapter_config.json"),  # a model, not an adapter
    ],
)
def test_a_bad_adapter_fails_before_going_online(swarm_env, adapter, message):
    result = runblockserver("--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--adapters", adapter, env=swarm_env)
    assert result.returncode != 0
    assert message in result.stderr and adapter in result.stderr
    assert "ONLINE" not in result.stdout + result.stderr
