"""Every supported model family, served by real block servers, computes what local transformers computes.

Each family gets a tiny random checkpoint built with transformers' own config and model classes, two
servers (blocks 0:2 and 2:4) on one DHT shared by the module, and a distributed client. Greedy tokens,
logits, input gradients and a two-turn inference session are compared with the local model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from swarm import AutoDistributedModelForCausalLM
from swarm.local_swarm import LocalSwarm, SwarmProcess
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SPANS = ("0:2", "2:4")
# float32 everywhere (the comparisons are at 1e-4); a fixed throughput skips the measurement at start-up.
SERVER_OPTIONS = ("--torch-dtype", "float32", "--throughput", "100")
ATOL = 1e-4
NEW_TOKENS = 24
WINDOW = 6  # sliding window of the sliding families: every prompt below is longer

# Shapes shared by the Llama-like configs: tiny, GQA (4 query heads, 2 KV heads), no special tokens,
# so that generation never stops early.
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, max_position_embeddings=256)
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_LIKE = dict(TINY, **NO_SPECIAL_TOKENS, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
WITH_HEAD_DIM = dict(LLAMA_LIKE, head_dim=16)


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny checkpoint of one architecture and the weight scales that make its greedy output vary."""

    name: str  # pytest id and checkpoint folder name (so also the DHT prefix)
    make_config: Callable[[], PretrainedConfig]
    layer_std: float = 0.2  # std of every 2-D weight except the embeddings
    embed_std: float | None = None  # None: keep transformers' initialisation
    adjust: Callable[[PreTrainedModel], object] | None = None  # last touch to the weights, under no_grad


FAMILIES = [
    Family(
        "llama",
        lambda: transformers.LlamaConfig(
            **WITH_HEAD_DIM,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
        ),
    ),
    Family("mistral", lambda: transformers.MistralConfig(**WITH_HEAD_DIM, sliding_window=WINDOW)),
    Family(
        "mixtral",
        lambda: transformers.MixtralConfig(
            **WITH_HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        ),
    ),
    Family(
        "falcon-7b",
        lambda: transformers.FalconConfig(
            **TINY,
            **NO_SPECIAL_TOKENS,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            alibi=False,
        ),
        layer_std=0.5,
        embed_std=0.5,
    ),
    Family(
        "falcon-40b",
        lambda: transformers.FalconConfig(
            **TINY,
            **NO_SPECIAL_TOKENS,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            alibi=False,
        ),
    ),
    Family(
        "bloom",
        lambda: transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=4, n_head=4, **NO_SPECIAL_TOKENS),
        layer_std=0.5,
        embed_std=0.5,
    ),
    # Layer 0 attends to everything, layers 1-3 slide: each server holds a sliding layer.
    Family(
        "qwen2",
        lambda: transformers.Qwen2Config(
            **LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
        ),
    ),
    Family("qwen3", lambda: transformers.Qwen3Config(**WITH_HEAD_DIM)),
    Family(
        "qwen3_moe",
        lambda: transformers.Qwen3MoeConfig(
            **WITH_HEAD_DIM, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True
        ),
    ),
    # Default soft-capping (attention 50, final logits 30), sliding and global layers alternating. The final
    # norm's gain (Gemma scales by 1 + weight) lifts the logits to about 30, where the final cap bends them.
    Family(
        "gemma2",
        lambda: transformers.Gemma2Config(**WITH_HEAD_DIM, sliding_window=WINDOW, query_pre_attn_scalar=16),
        adjust=lambda model: model.model.norm.weight.fill_(49.0),
    ),
    Family(
        "gemma3_text",
        lambda: transformers.Gemma3TextConfig(
            **WITH_HEAD_DIM,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
    ),
    # Multi-head latent attention; layer 0 dense, layers 1-3 mixtures of 4 routed experts in 2 groups.
    Family(
        "deepseek_v3",
        lambda: transformers.DeepseekV3Config(
            **dict(LLAMA_LIKE, num_key_value_heads=4),  # MLA: one latent K/V per query head, as in DeepSeek
            moe_intermediate_size=32,
            n_shared_experts=1,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    ),
]
FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}


def token_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


PROMPT = token_ids(10, seed=1)
LONG_PROMPT = token_ids(16, seed=2)  # longer than the sliding window
FOLLOW_UP = token_ids(4, seed=3)


def build_model(family: Family) -> PreTrainedModel:
    """A random model whose weights are large enough for attention and routing to matter."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.make_config(), dtype=torch.float32).eval()
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter is embeddings:
                if family.embed_std is not None:
                    parameter.normal_(0.0, family.embed_std)
            elif parameter.dim() >= 2:
                parameter.normal_(0.0, family.layer_std)
        if family.adjust is not None:
            family.adjust(model)
    return model


def load_local(path: Path) -> PreTrainedModel:
    """The reference: transformers' eager attention, the most literal implementation of each family."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], Path]:
    """Builds each family's checkpoint once per session, on first use."""
    built: dict[str, Path] = {}

    def get(family: Family) -> Path:
        if family.name not in built:
            path = tmp_path_factory.mktemp("families") / family.name
            model = build_model(family)
            new_tokens = greedy(model, PROMPT)[0, PROMPT.shape[1] :].tolist()
            assert len(set(new_tokens)) > 1, f"{family.name}: greedy output is one repeated token, scale the weights"
            model.save_pretrained(path)
            built[family.name] = path
        return built[family.name]

    return get


@pytest.fixture(scope="module")
def dht(make_swarm: Callable[[], LocalSwarm]) -> Iterator[LocalSwarm]:
    """One bootstrap peer for the whole module; every family's servers join it."""
    swarm = make_swarm()
    try:
        swarm.start_dht()
        yield swarm
    finally:
        swarm.close()


def stop_all(processes: list[SwarmProcess]) -> None:
    with ThreadPoolExecutor(max(len(processes), 1)) as pool:
        list(pool.map(SwarmProcess.stop, processes))


def start_servers(swarm: LocalSwarm, paths: list[Path], spans: tuple[str, ...] = SPANS) -> list[SwarmProcess]:
    """Starts all servers at once and waits until every one is ONLINE; on failure none is left running."""
    processes: list[SwarmProcess] = []
    try:
        for path, span in zip(paths, spans, strict=True):
            processes.append(swarm.start_server(str(path), "--block-indices", span, *SERVER_OPTIONS, wait=False))
        for process in processes:
            process.wait_until_online()
    except BaseException:
        stop_all(processes)
        raise
    return processes


@pytest.fixture(scope="module", params=[pytest.param(family, id=family.name) for family in FAMILIES])
def family(request: pytest.FixtureRequest) -> Family:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family: Family, checkpoints: Callable[[Family], Path]) -> Path:
    return checkpoints(family)


@pytest.fixture(scope="module")
def local_model(checkpoint: Path) -> PreTrainedModel:
    return load_local(checkpoint)


@pytest.fixture(scope="module")
def servers(checkpoint: Path, dht: LocalSwarm) -> Iterator[list[SwarmProcess]]:
    """This family's two servers, stopped when its tests are done (pytest groups the tests by family)."""
    processes = start_servers(dht, [checkpoint, checkpoint])
    try:
        yield processes
    finally:
        stop_all(processes)


@pytest.fixture(scope="module")
def model(checkpoint: Path, servers: list[SwarmProcess], dht: LocalSwarm) -> Iterator[PreTrainedModel]:
    model = AutoDistributedModelForCausalLM.from_pretrained(str(checkpoint), initial_peers=dht.initial_peers)
    try:
        yield model
    finally:
        model.close()


def test_greedy_generation_matches_local(model, local_model) -> None:
    expected = greedy(local_model, PROMPT)
    actual = greedy(model, PROMPT)
    assert actual.tolist() == expected.tolist()


def test_forward_logits_match_local(model, local_model) -> None:
    with torch.no_grad():
        expected = local_model(LONG_PROMPT).logits
        actual = model(LONG_PROMPT).logits
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_input_gradients_match_local(model, local_model) -> None:
    """Backward through the servers gives the gradient local autograd gives, w.r.t. the input embeddings."""
    with torch.no_grad():
        embeddings = local_model.get_input_embeddings()(LONG_PROMPT)
    weights = torch.randn(embeddings.shape[:2] + (256,), generator=torch.Generator().manual_seed(4))

    def input_gradient(network, weights: torch.Tensor) -> torch.Tensor:
        inputs = embeddings.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = network(inputs_embeds=inputs).logits
            (logits * weights).sum().backward()
        return inputs.grad

    # The loss is linear in the weights: scale them so that the largest gradient is 1 and ATOL is relative to it.
    peak = input_gradient(local_model, weights).abs().max()
    assert peak > 0
    weights = weights / peak
    expected = input_gradient(local_model, weights)
    torch.testing.assert_close(input_gradient(model, weights), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("draft", ["prompt_lookup", "always_wrong"])
def test_speculative_greedy_matches_local(model, local_model, draft) -> None:
    """Drafted tokens verified in one step and rolled back where rejected (tests/test_speculative.py): the
    servers' caches of every family end up holding exactly the kept tokens."""
    from tests.test_speculative import always_wrong

    options = (
        {"prompt_lookup_num_tokens": 3} if draft == "prompt_lookup" else {"assistant_model": always_wrong(local_model)}
    )
    prompt = torch.cat([PROMPT, PROMPT], dim=1)  # repeats, so that prompt lookup finds something to propose
    assert greedy(model, prompt, **options).tolist() == greedy(local_model, prompt).tolist()


def test_two_turn_session_matches_local(model, local_model) -> None:
    """The second turn reuses the servers' caches (past the sliding window) and still equals a fresh local run."""
    with model.inference_session(max_length=128) as session:
        reply = model.generate(LONG_PROMPT, max_new_tokens=8, do_sample=False, session=session)
        conversation = torch.cat([reply, FOLLOW_UP], dim=1)
        second = model.generate(conversation, max_new_tokens=8, do_sample=False, session=session)
    assert reply.tolist() == local_model.generate(LONG_PROMPT, max_new_tokens=8, do_sample=False).tolist()
    expected = local_model.generate(conversation, max_new_tokens=8, do_sample=False)
    assert second.tolist() == expected.tolist()


def test_server_reads_only_its_shards(dht: LocalSwarm, tmp_path: Path) -> None:
    """A server of blocks 2:4 comes online from a folder missing every shard it does not need."""
    full = tmp_path / "full" / "llama-sharded"
    build_model(FAMILIES_BY_NAME["llama"]).save_pretrained(full, max_shard_size=100_000)
    weight_map: dict[str, str] = json.loads((full / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {file for name, file in weight_map.items() if name.startswith(("model.layers.2.", "model.layers.3."))}
    unneeded = set(weight_map.values()) - needed
    block_0 = {file for name, file in weight_map.items() if name.startswith("model.layers.0.")}
    assert unneeded and block_0 <= unneeded, f"shards do not separate the blocks: {sorted(set(weight_map.values()))}"

    partial = tmp_path / "partial" / full.name  # same folder name, so the same DHT prefix
    shutil.copytree(full, partial)
    for file in unneeded:
        (partial / file).unlink()

    processes = start_servers(dht, [full, partial])
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(str(full), initial_peers=dht.initial_peers)
        try:
            actual = greedy(model, PROMPT)
        finally:
            model.close()
    finally:
        stop_all(processes)
    assert actual.tolist() == greedy(load_local(full), PROMPT).tolist()


def test_unsupported_model_type_is_refused_clearly(swarm_env: dict[str, str], tmp_path: Path) -> None:
    """A server given an architecture no family handles says which ones it knows instead of crashing."""
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64})
    )
    argv = [sys.executable, str(ROOT / "manage.py"), "runblockserver", str(tmp_path), "--new-swarm"]
    argv += ["--host-maddrs", "/ip4/127.0.0.1/tcp/0"]
    result = subprocess.run(argv, env={**swarm_env, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "gpt2" in output
    assert all(name in output for name in ("llama", "mixtral", "bloom")), output
    assert "Traceback" not in output, output
