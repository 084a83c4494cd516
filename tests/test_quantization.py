"""`--quant-type int8|nf4`: bitsandbytes layers in the served blocks, announced, counted, and shown.

A quantized server is checked against the same quantization applied locally: transformers' own
demo model whose decoder layers went through `quantize_block`. bitsandbytes' CPU kernels run here,
so these tests run the real int8 and nf4 matmuls.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hivemind import DHT
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.checkpoint import CheckpointFiles
from swarm.demo_models import DEMO_MOE_MODEL_PATH
from swarm.dht import fetch_swarm
from swarm.models.registry import bytes_per_block, family_for, prepare_config
from swarm.server import quantization
from swarm.server.backend import load_span
from swarm.server.block_selection import blocks_that_fit
from swarm.server.quantization import (
    block_bytes,
    measured_bytes,
    quantize_block,
    quantized_linear_bytes,
    resolve_quant_type,
)
from tests.conftest import DEMO_MODEL, start_swarm

bnb = pytest.importorskip("bitsandbytes")  # a pinned requirement: only a broken install lacks it

PREFIX = "demo_model-hf"
PROMPT = "The function returns the value of"
TEXT = "Numbers are created by numeric literals or as the result of built-in functions and operators"
PLAN = {"0:4": "int8", "4:8": "nf4"}  # one swarm serves both modes: int8 blocks feed the nf4 ones
CPU = torch.device("cpu")


def demo_config(path=DEMO_MODEL):
    return prepare_config(AutoConfig.from_pretrained(path))


def quantized_local_model(layer_types: list[str]) -> nn.Module:
    """The demo model in transformers, its decoder layer i quantized to layer_types[i] as a server would."""
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    for i, quant_type in enumerate(layer_types):
        model.model.layers[i] = quantize_block(model.model.layers[i], quant_type, torch.float32).to(CPU)
    return model


# ----- units: which layers, how many bytes -----


def test_quant_type_names_and_resolution():
    assert resolve_quant_type("auto", CPU) == "none"
    assert resolve_quant_type("auto", torch.device("cuda")) == "nf4"  # Petals' default on GPUs
    assert resolve_quant_type("int8", CPU) == "int8" and resolve_quant_type("nf4", CPU) == "nf4"
    with pytest.raises(ValueError, match="fp4"):
        resolve_quant_type("fp4", CPU)


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_only_the_linear_layers_are_quantized(quant_type):
    config = demo_config()
    family = family_for(config)
    files = CheckpointFiles(DEMO_MODEL)
    backend = load_span(files, family, config, 0, 2, torch.float32, CPU, quant_type=quant_type)
    block = backend.blocks[0]
    expected = bnb.nn.Linear8bitLt if quant_type == "int8" else bnb.nn.Linear4bit
    linears = {name: type(m) for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 7 and set(linears.values()) == {expected}, linears
    assert block.self_attn.q_proj.weight.dtype == (torch.int8 if quant_type == "int8" else torch.uint8)
    assert block.input_layernorm.weight.dtype == torch.float32  # norms stay in the span's dtype

    moe = demo_config(DEMO_MOE_MODEL_PATH)
    backend = load_span(
        CheckpointFiles(str(DEMO_MOE_MODEL_PATH)), family_for(moe), moe, 0, 1, torch.float32, CPU, quant_type=quant_type
    )
    block = backend.blocks[0]
    assert type(block.self_attn.o_proj) is expected
    # MoE experts are fused tensors, not nn.Linear: they, and the router, stay unquantized.
    assert block.mlp.experts.gate_up_proj.dtype == torch.float32 and block.mlp.gate.weight.dtype == torch.float32
    output = backend.forward(torch.randn(1, 5, moe.hidden_size), 0, 1)
    assert output.shape == (1, 5, moe.hidden_size) and torch.isfinite(output).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["none", "int8", "nf4"])
@pytest.mark.parametrize("path", [DEMO_MODEL, str(DEMO_MOE_MODEL_PATH)], ids=["llama", "mixtral"])
def test_block_bytes_estimate_is_what_the_blocks_hold(path, quant_type, dtype):
    config = demo_config(path)
    backend = load_span(CheckpointFiles(path), family_for(config), config, 0, 1, dtype, CPU, quant_type=quant_type)
    backend.forward(torch.randn(1, 3, config.hidden_size), 0, 1)  # int8 moves its scales at the first call
    assert block_bytes(config, dtype, quant_type) == measured_bytes(backend.blocks[0])
    if quant_type == "none":
        assert block_bytes(config, dtype, quant_type) == bytes_per_block(config, dtype)


def test_llama_3_8b_shaped_block_bytes():
    """From shapes alone (no weights built): the figures bench/bench_quant.py reports."""
    config = AutoConfig.for_model(
        "llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=32, vocab_size=128256,
    )  # fmt: skip
    shapes = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    weights = sum(i * o for i, o in shapes)
    norms = 2 * 4096
    assert block_bytes(config, torch.bfloat16, "none") == 2 * (weights + norms)
    int8 = block_bytes(config, torch.bfloat16, "int8")
    assert int8 == weights + 4 * sum(o for _, o in shapes) + 2 * norms  # int8 + a float32 scale per row
    nf4 = block_bytes(config, torch.bfloat16, "nf4")
    assert nf4 == sum(quantized_linear_bytes(i, o, "nf4", torch.bfloat16) for i, o in shapes) + 2 * norms
    # 4 bits, plus a uint8 absmax per 64 weights (0.125 bit) and a float32 per 256 absmaxes
    assert 4.12 < 8 * nf4 / weights < 4.14
    assert 0.50 < int8 / (2 * weights) < 0.51


def test_quantized_blocks_fit_more_per_machine():
    config = demo_config()
    counts = {
        quant_type: blocks_that_fit(block_bytes(config, torch.float32, quant_type), 0, CPU, 10**12)
        for quant_type in ("none", "int8", "nf4")
    }
    # The same free memory: float32 blocks are 3.9x (int8) and 7.5x (nf4) the size of quantized ones.
    assert counts["int8"] >= 3.5 * counts["none"] and counts["nf4"] >= 7 * counts["none"], counts


# ----- accuracy, locally -----


def test_quantized_span_stays_close_to_float_and_trains():
    """Quantization error of the whole 8-block demo span, and gradients after inference (both paths)."""
    config = demo_config()
    family = family_for(config)
    files = CheckpointFiles(DEMO_MODEL)
    torch.manual_seed(0)
    hidden = torch.randn(1, 12, config.hidden_size)
    reference = load_span(files, family, config, 0, 8, torch.float32, CPU).forward(hidden, 0, 8)
    for quant_type, bound in (("int8", 0.03), ("nf4", 0.12)):
        backend = load_span(files, family, config, 0, 8, torch.float32, CPU, quant_type=quant_type)
        output = backend.forward(hidden, 0, 8)
        error = ((output - reference).norm() / reference.norm()).item()
        # Measured 1.3% (int8) and 6.2% (nf4) for these 8 blocks; bounds ~2x that.
        assert 0 < error < bound, (quant_type, error)

        fresh = load_span(files, family, config, 0, 8, torch.float32, CPU, quant_type=quant_type)
        expected, _ = fresh.backward(hidden, torch.ones_like(hidden), 0, 8)
        cache = backend.new_cache(0, 8, 1, 16)
        backend.inference_step(hidden[:, :4], cache)  # on AVX512-BF16 CPUs this once repacked nf4 weights
        backend.inference_step(hidden[:, 4:5], cache)
        grads, _ = backend.backward(hidden, torch.ones_like(hidden), 0, 8)
        torch.testing.assert_close(grads, expected, atol=1e-5, rtol=1e-4)


# ----- through the wire -----


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm)
    try:
        for span, quant_type in PLAN.items():
            swarm.start_server(DEMO_MODEL, "--block-indices", span, "--quant-type", quant_type, "--throughput", "10")
    except BaseException:
        swarm.close()
        raise
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.mark.integration
def test_servers_announce_their_quant_type(swarm):
    dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        view = fetch_swarm(dht, PREFIX, 8)
        announced = {(span.start, span.end): span.server_info.quant_type for span in view.spans.values()}
    finally:
        dht.shutdown()
    assert announced == {(0, 4): "int8", (4, 8): "nf4"}
    int8_server, nf4_server = swarm.processes[1:]
    assert "Quantized 7 of 7 linear layers per block to int8" in int8_server.output()
    assert "Quantized 7 of 7 linear layers per block to nf4" in nf4_server.output()


@pytest.mark.integration
def test_served_logits_equal_the_same_quantization_applied_locally(model, tokenizer):
    inputs = tokenizer(TEXT, return_tensors="pt").input_ids
    local = quantized_local_model(["int8"] * 4 + ["nf4"] * 4)
    floats = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        served = model(inputs).logits
        expected = local(inputs).logits
        unquantized = floats(inputs).logits
    # Quantization is deterministic: same weights, same kernels, same call shapes, float32 on the wire.
    # The served logits are the local ones (bitwise, measured), so the tolerance is the one of the
    # unquantized comparison in test_generation.py, 1e-4, i.e. 1000x below the quantization error
    # itself. It is no looser because int8 also rounds activations (per token, to 127 steps of the
    # row's largest value): a last-bit difference upstream could flip a rounding and show up here.
    torch.testing.assert_close(served, expected, atol=1e-4, rtol=0)
    quantization_error = (unquantized - expected).abs().max().item()
    assert quantization_error > 0.1  # the comparison above is a real one: quantized != float
    # Against float: the quantized model still predicts mostly the same next tokens.
    agreement = (served.argmax(-1) == unquantized.argmax(-1)).float().mean().item()
    assert agreement >= 0.8, agreement


@pytest.mark.integration
def test_greedy_generation_matches_local_quantized_model(model, tokenizer):
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    local = quantized_local_model(["int8"] * 4 + ["nf4"] * 4)
    options = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = local.generate(inputs, **options)[0, inputs.shape[1] :].tolist()
    actual = model.generate(inputs, **options)[0, inputs.shape[1] :].tolist()
    # One token per step after the prompt on both sides, so int8's per-step activation rounding sees the
    # same rows. Greedy decoding snowballs once a near-tie flips, hence "mostly equal", not "equal".
    same = sum(a == b for a, b in zip(actual, expected, strict=True))
    assert same >= 20, (actual, expected)


@pytest.mark.integration
@pytest.mark.django_db
def test_status_page_shows_the_quant_types(swarm, client):
    from monitor.conf import CrawlOptions
    from monitor.crawl import run_crawl
    from monitor.snapshots import write_snapshot
    from monitor.targets import ModelTarget

    dht = DHT(initial_peers=swarm.initial_peers, client_mode=True, start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        write_snapshot(run_crawl(dht, [ModelTarget(PREFIX, 8, "Demo")], swarm.initial_peers, CrawlOptions()))
    finally:
        dht.shutdown()
    html = client.get("/").content.decode()
    section = html.split(f'data-dht-prefix="{PREFIX}"', 1)[1].split("</section>", 1)[0]
    assert "float32 (int8)" in section and "float32 (nf4)" in section
    peer_id = swarm.processes[2].peer_id
    assert "quantized to nf4" in client.get(f"/peers/{peer_id}/").content.decode()


def test_quantize_block_leaves_unquantized_layers_alone():
    layer = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    same = quantize_block(copy.deepcopy(layer), "none", torch.float32)
    assert type(same[0]) is nn.Linear
    quantized = quantize_block(copy.deepcopy(layer), "nf4", torch.float32).to(CPU)
    assert isinstance(quantized[0], bnb.nn.Linear4bit) and type(quantized[1]) is nn.LayerNorm
    again = quantize_block(quantized, "nf4", torch.float32)  # already quantized: untouched
    assert again[0] is quantized[0]


# ----- loading: one block's float weights at a time -----


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_now_in_chunks_equals_bitsandbytes_own(quant_type, dtype, monkeypatch):
    """What loading does (each layer quantized at once, a few rows at a time) gives bitsandbytes' own bytes."""
    monkeypatch.setattr(quantization, "QUANTIZE_CHUNK_BYTES", 3000)  # several chunks per layer, odd sizes
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(96, 70), nn.Linear(70, 33, bias=False))
    released: list[torch.Tensor] = []
    reference = quantize_block(copy.deepcopy(block), quant_type, dtype).to(CPU)
    now = quantize_block(copy.deepcopy(block), quant_type, dtype, CPU, released.append)
    assert len(released) > 2 * len(block)  # each layer's rows went chunk by chunk
    for expected, layer in zip(reference, now):
        assert torch.equal(expected.weight.data, layer.weight.data)
        if quant_type == "int8":
            assert torch.equal(expected.weight.SCB, layer.weight.SCB)
        else:
            a, b = expected.weight.quant_state, layer.weight.quant_state
            assert (a.shape, a.dtype, a.blocksize) == (b.shape, b.dtype, b.blocksize)
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.offset, b.offset)
            assert torch.equal(a.state2.absmax, b.state2.absmax) and torch.equal(a.state2.code, b.state2.code)
    hidden = torch.randn(4, 96, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(reference(hidden), now(hidden))


PEAK_SCRIPT = """
import json, sys, gc, torch
from pathlib import Path
from transformers import AutoConfig
from swarm.checkpoint import CheckpointFiles, trim_heap
from swarm.models.registry import family_for, prepare_config
from swarm.server import quantization
from swarm.server.backend import load_span

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

path = sys.argv[1]
config = prepare_config(AutoConfig.from_pretrained(path))
layer = quantization.quantize_block(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4", torch.float32)
quantization.quantize_block(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8", torch.float32).to("cpu")
layer.to("cpu")(torch.randn(1, 64))  # bitsandbytes' first-use setup is not the loader's
figures = {}
for mode in sys.argv[2:]:
    dtype, quant = (torch.float32, mode) if mode in ("int8", "nf4") else (getattr(torch, mode), "none")
    gc.collect(); trim_heap()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    before = status("VmRSS")
    files, family = CheckpointFiles(path), family_for(config)
    backend = load_span(files, family, config, 0, 6, dtype, torch.device("cpu"), quant_type=quant)
    weights = sum(quantization.measured_bytes(block) for block in backend.blocks)
    figures[mode] = status("VmHWM") - before - weights
    del backend
print(json.dumps(figures))
"""


def test_loading_holds_at_most_one_block_of_float_weights_besides_the_served_ones(tmp_path):
    """The server's peak while loading (a fresh process's VmHWM) over the weights it ends up serving stays below
    one block of checkpoint bytes, whatever the span's length: cast and quantized a block (a few rows) at a time."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="200MB")
    one_block = block_bytes(config, torch.float32, "none")  # 61 MB; the span's six blocks: 366 MB
    modes = ["bfloat16", "int8", "nf4"]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), *modes],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    overheads = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in modes:
        assert overheads[mode] < one_block, f"{mode}: {overheads[mode] / 2**20:.0f} MB over the served weights"
