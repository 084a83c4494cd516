"""Serving real-shaped blocks: a Llama-3-8B-shaped span and a Mixtral-8x7B-shaped block, random weights.

    python bench/bench_real_shape.py [--blocks 2] [--positions 16 2048] [--quick] [--only memory]

Builds the blocks with transformers' own config classes (Llama-3-8B: hidden 4096, 32 heads, 8 KV
heads, intermediate 14336; Mixtral-8x7B: the same with 8 experts, 2 per token) and random weights,
with a small vocabulary (256: the client's embeddings and LM head do not matter here), and saves
each as a sharded Hugging Face checkpoint (config.json, model-0000x-of-0000y.safetensors and the
index; the Llama checkpoint in `--checkpoint-dtype`, float32 by default). Real `runblockserver`
processes serve them, one at a time (each under a DHT prefix of its own), on one local swarm. Prints,
each ratio measured within this run:

- `ratio_1server=`: tokens/s of greedy generation through one server ÷ local transformers on the
  same blocks (float32, the whole tiny-vocab model), the median of the ratios within rounds; the
  tokens must be equal. `ratio_1server_vs_engine=`: the swarm over the server's own engine
  (`SpanBackend`) stepping the same blocks in this process, without wire nor client: what the
  serving machinery costs, apart from how fast transformers' generate() is.
  `ratio_1server_mixtral=`: swarm over local for the Mixtral block in bfloat16.
- `server_ratio_16_short=` / `server_ratio_16_long=`: tokens/s of 16 raw inference sessions
  stepping at once on one server ÷ one session, at short positions and after a prefill of
  `--positions LONG` tokens, with `steps_per_batch_16_*=` (steps the server stacked per forward,
  from its rpc_info). Short positions run on the float32 server through the whole span; the long
  ones (16 prefills of 2048 tokens, most of this bench's time) through the first block of the
  `--long-dtype` server (bfloat16 by default: float32 prefills take 5x longer on CPUs). The served
  outputs of the float32 short sessions are checked against each session computed alone.
  `matmul_ratio_16_<dtype>=` is the same ratio for one bare MLP matmul: the most batching can gain
  on this CPU, whatever the server does.
- `memory_overhead_pct_<mode>=` for float32, bfloat16, int8 and nf4 (`--quant-type`, float32 span):
  the server's peak RSS (VmHWM, after its measurements) over the import floor (a process that
  imports what a server imports), the blocks' weight bytes and the attention cache its sessions held
  at the fullest (from rpc_info; one peer may hold 75% of the announced pool, so the pool itself is
  never full), as a percentage of weights + cache. Also for the Mixtral block (`_mixtral`). The peak
  includes the load: a server that casts or quantizes holds the checkpoint's bytes for a while too.
  With `--only memory`, `memory_overhead_after_load_pct_<mode>=` is the same at the end of the load,
  before the first request (bitsandbytes' CPU matmuls unpack a layer's weights to float for each call).
- `load_gb_per_s=`: checkpoint bytes per second of loading the span in this process as a server
  does (`load_span`) and reading every weight once (safetensors maps what needs no cast lazily), in
  the stored dtype; `load_cast_gb_per_s=` the same with a cast. The files were just written, so
  they come from the page cache, not the disk. Each server's own load time is printed from its log
  (with its casting or quantization; 0.1 s resolution).

Then what each figure would mean per token for a Llama-3-70B-shaped model (80 blocks of hidden 8192)
on this machine: a decode step reads every weight once, so a block's decode time is scaled by its
weight bytes, (8192 / hidden)^2, times 80 blocks. Attention over the cache grows only with the KV
width, the same for both models, so the scaled figures at long positions are pessimistic.

Within 24 GiB of RAM (at most ~7 GB at once with the default shapes: servers of real shapes start
one after the other, int8 and nf4 together) and about 10-15 minutes on 2 cores. `--quick` (fewer
tokens, steps and rounds, positions 8 and 128) with tiny shapes (`--hidden 256 --intermediate 512`)
is the smoke test's setting. `--only memory` prints only the memory and load figures (each server
serves one short decode probe instead of the speed measurements): a few minutes at the default shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_server_load import Session, check_exact  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MixtralConfig  # noqa: E402

from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.checkpoint import CheckpointFiles  # noqa: E402
from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.dht import create_dht  # noqa: E402
from swarm.local_swarm import LocalSwarm, SwarmProcess  # noqa: E402
from swarm.models.registry import dht_prefix_for, family_for, prepare_config  # noqa: E402
from swarm.names import block_uids, join_chain  # noqa: E402
from swarm.server.backend import SpanBackend, load_span  # noqa: E402
from swarm.server.handler import fetch_server_info  # noqa: E402
from swarm.server.quantization import block_bytes  # noqa: E402

MB = 2**20
GB = 1e9  # for GB/s
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("float32", "bfloat16", "int8", "nf4")
PEER_SHARE = 0.75  # of a server's cache pool one peer may hold (TransformerConnectionHandler's default)
KEEP_ALIVE_FROM = 256  # prefills this long: step the sessions already open after each (see Load.open)
LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8}
LLAMA_70B_BLOCKS = 80
MIXTRAL_BLOCKS = 32
RUN_TIMEOUT = 3600.0
PROMPT_TOKENS = 8  # of greedy generation
SMALL_CHECKPOINT_BYTES = 2**28  # below this, all servers start at once (see run)
failures: list[str] = []
STARTED = time.perf_counter()


def stamp() -> str:
    """Seconds since the bench started, to see where its time goes."""
    return f"[{time.perf_counter() - STARTED:.0f} s]"


# ----- checkpoints -----


def llama_config(args: argparse.Namespace, blocks: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=blocks,
        vocab_size=args.vocab,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},  # Llama 3's base
        bos_token_id=None,
        eos_token_id=None,
    )


def mixtral_config(args: argparse.Namespace) -> MixtralConfig:
    return MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=1,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=args.vocab,
        bos_token_id=None,
        eos_token_id=None,
    )


def build_checkpoint(
    config, dtype: torch.dtype, folder: Path, shard_size: str | None, saved: torch.dtype | None = None
) -> torch.nn.Module:
    """Random weights saved (in `saved`, default `dtype`) as a sharded HF checkpoint; returns the model in
    `dtype`, the local reference (rounded to `saved` first, so that it holds what servers load, exactly)."""
    began = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.to(saved or dtype)
    if shard_size is None:  # 1 GB shards, or halves of a smaller checkpoint: sharded either way
        shard_size = min(10**9, sum(p.nbytes for p in model.parameters()) // 2)
    model.save_pretrained(folder, max_shard_size=shard_size)
    model.to(dtype)
    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    if not (folder / "model.safetensors.index.json").exists():
        raise SystemExit(f"{folder}: expected a sharded checkpoint, got {shards} (lower --shard-size)")
    seconds = time.perf_counter() - began
    print(f"{stamp()} built {folder.name}: {len(shards)} shards ({shards[0]} ...) in {seconds:.1f} s")
    return model


# ----- local figures -----


def matmul_ratio_16(hidden: int, intermediate: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Tokens/s of one MLP-shaped matmul with 16 rows ÷ with one row: what batching can gain at most here."""
    weight = torch.randn(intermediate, hidden, dtype=dtype)

    def seconds(rows: int) -> float:
        x = torch.randn(rows, hidden, dtype=dtype)
        torch.nn.functional.linear(x, weight)
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            torch.nn.functional.linear(x, weight)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    return 16 * seconds(1) / seconds(16)


def load_gb_per_s(path: Path, dtype: torch.dtype, blocks: int) -> float:
    """Checkpoint GB/s of loading blocks 0:N in this process as a server does (`load_span`: only their shards,
    one tensor at a time), then reading every weight once: safetensors maps tensors that need no cast from the
    file, and their bytes are read only when first used."""
    config = prepare_config(AutoConfig.from_pretrained(path))
    began = time.perf_counter()
    backend = load_span(CheckpointFiles(str(path)), family_for(config), config, 0, blocks, dtype, torch.device("cpu"))
    loaded = time.perf_counter() - began
    for block in backend.blocks:
        for tensor in block.state_dict().values():
            tensor.sum()
    elapsed = time.perf_counter() - began
    stored = blocks * block_bytes(config, checkpoint_dtype(config), "none")
    print(
        f"load_span of {stored / MB:.0f} MB to {str(dtype).split('.')[-1]}: {loaded:.2f} s, "
        f"{elapsed:.2f} s with the first read of every weight"
    )
    return stored / elapsed / GB


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint was saved in (its config.json's)."""
    return DTYPES[str(config.dtype).split(".")[-1]]


def sharing_backend(path: Path, local: torch.nn.Module, blocks: int) -> SpanBackend:
    """A float32 backend on the local model's own weight tensors (no copy): sessions computed alone."""
    config = prepare_config(AutoConfig.from_pretrained(path))
    weights = [dict(local.model.layers[index].state_dict()) for index in range(blocks)]
    return SpanBackend(family_for(config), config, 0, blocks, weights, torch.float32, torch.device("cpu"))


def start_import_floor() -> subprocess.Popen:
    """A process that imports what a server imports and prints its peak RSS, then again with bitsandbytes
    (int8/nf4 servers import it): the floor under every server, before any weights. Started early: it runs
    while the checkpoint is built."""
    peak = "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], flush=True)"
    code = (
        "import os, django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings'); django.setup(); "
        "import config.management.commands.runblockserver, swarm.server.server, swarm.models.registry; "
        f"{peak}; import bitsandbytes; {peak}"
    )
    env = {**os.environ, "DEBUG": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def import_floors(process: subprocess.Popen) -> list[int]:
    """(without bitsandbytes, with it), bytes."""
    output, _ = process.communicate(timeout=600)
    if process.returncode:
        raise RuntimeError(f"the import floor's process failed ({process.returncode})")
    return [int(line) * 1024 for line in output.split()[-2:]]


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


# ----- raw sessions on one server -----


class Load:
    """Raw inference sessions on one server (bench_server_load's Session), stepped concurrently."""

    def __init__(self, p2p, peer_id: PeerID, uid: str, hidden_size: int, max_length: int, record: bool):
        self.p2p, self.peer_id, self.uid = p2p, peer_id, uid
        self.hidden_size, self.max_length, self.record = hidden_size, max_length, record
        self.sessions: list[Session] = []
        self.inputs: list[list[torch.Tensor]] = []
        self.outputs: list[list[torch.Tensor]] = []
        self.generator = torch.Generator().manual_seed(0)

    def _hidden(self, tokens: int) -> torch.Tensor:
        return torch.randn(1, tokens, self.hidden_size, generator=self.generator)

    async def _step(self, index: int, hidden: torch.Tensor) -> None:
        output = await self.sessions[index].step(hidden)
        if self.record:
            self.inputs[index].append(hidden)
            self.outputs[index].append(output)

    async def open(self, prefills: list[int]) -> float:
        """Open a session per prefill length, one after the other; returns the prefills' seconds."""
        prefill_seconds = 0.0
        for length in prefills:
            self.sessions.append(Session(self.p2p, self.peer_id, self.uid, self.max_length))
            self.inputs.append([])
            self.outputs.append([])
            await self.sessions[-1].open()
            hidden = self._hidden(length)
            began = time.perf_counter()
            await self._step(len(self.sessions) - 1, hidden)
            prefill_seconds += time.perf_counter() - began
            if length >= KEEP_ALIVE_FROM:
                # A server ends a session that sends no step for its step timeout (300 s); at real sizes the
                # later prefills take longer than that on a CPU. One more token for each keeps them open.
                await asyncio.gather(*(self._step(i, self._hidden(1)) for i in range(len(self.sessions) - 1)))
        return prefill_seconds

    async def run(self, indices: list[int], steps: int) -> float:
        """`steps` one-token steps of each session in `indices`, all at once; returns the seconds taken."""
        tokens = {index: [self._hidden(1) for _ in range(steps)] for index in indices}

        async def drive(index: int) -> None:
            for hidden in tokens[index]:
                await self._step(index, hidden)

        began = time.perf_counter()
        await asyncio.gather(*(drive(index) for index in indices))
        return time.perf_counter() - began

    async def close(self) -> None:
        for session in self.sessions:
            await session.close()


@dataclasses.dataclass
class Server:
    """One running block server and what the bench knows of it."""

    name: str  # float32, bfloat16, int8, nf4, mixtral
    process: SwarmProcess | None
    path: Path
    config: object
    blocks: int
    dtype: torch.dtype
    quant_type: str
    pool_bytes: int = 0
    cache_used: int = 0  # the most attention cache its sessions held at once, bytes
    online: bool = False

    @property
    def peer_id(self) -> PeerID:
        return PeerID.from_base58(self.process.peer_id)

    @property
    def dht_prefix(self) -> str:
        """Its own: servers of the same checkpoint in other dtypes may be online at the same time."""
        return f"{dht_prefix_for(str(self.path), self.config.model_type)}-{self.name}"

    def uid(self, blocks: int) -> str:
        return join_chain(block_uids(self.dht_prefix, 0, blocks))

    def token_bytes(self) -> int:
        """Attention cache bytes of one token in one block (keys and values)."""
        heads = self.config.num_key_value_heads
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        return 2 * heads * head_dim * (torch.finfo(self.dtype).bits // 8)

    def weight_bytes(self) -> int:
        return self.blocks * block_bytes(self.config, self.dtype, self.quant_type)

    def info(self, p2p) -> dict:
        return run_sync(fetch_server_info(p2p, self.peer_id), timeout=60)

    def note_cache(self, p2p) -> None:
        """Remember how much of its pool the open sessions hold now."""
        left = self.info(p2p)["cache_tokens_available"] * self.token_bytes()
        self.cache_used = max(self.cache_used, self.pool_bytes - left)

    def load_seconds(self) -> float | None:
        for line in self.process.lines:
            found = re.search(r"Loaded \d+ blocks in ([\d.]+) s", line)
            if found:
                return float(found.group(1))
        return None


def spawn_server(
    swarm: LocalSwarm, name: str, path: Path, config, blocks: int, dtype: str, quant: str, cache_tokens: int
) -> Server:
    """A server process starting (see `ready`): a throughput given, so that it measures none."""
    server = Server(name, None, path, config, blocks, DTYPES[dtype], quant)
    server.process = swarm.start_server(
        str(path),
        *("--block-indices", f"0:{blocks}", "--throughput", "1", "--torch-dtype", dtype, "--quant-type", quant),
        *("--cache-tokens", str(cache_tokens), "--dht-prefix", server.dht_prefix),
        name=name,
        wait=False,
    )
    return server


def ready(server: Server, p2p) -> Server:
    """Wait until the server is ONLINE; read its announced pool and how fast it loaded."""
    if server.online:
        return server
    server.process.wait_until_online(timeout=900)
    server.online = True
    server.pool_bytes = server.info(p2p)["cache_tokens_available"] * server.token_bytes()
    seconds = server.load_seconds()
    on_disk = server.blocks * block_bytes(server.config, checkpoint_dtype(server.config), "none")
    speed = f"{on_disk / seconds / GB:.2f}" if seconds else "n/a (under 0.1 s)"
    print(f"{stamp()} {server.name} server: loaded {on_disk / MB:.0f} MB of checkpoint in {seconds} s: {speed} GB/s")
    return server


def session_length(args: argparse.Namespace, position: int) -> int:
    """max_length of a load phase's sessions: its longest prefill, the keep-alive steps and every run's steps."""
    return position + args.sessions - 1 + args.sessions + 2 * args.rounds * args.steps + 1


def pool_tokens(sessions: int, max_length: int, session_blocks: int, span_blocks: int) -> int:
    """--cache-tokens (tokens of the whole span) for `sessions` sessions of one peer on `session_blocks` blocks."""
    return math.ceil(sessions * max_length * session_blocks / span_blocks / PEER_SHARE) + max_length


@dataclasses.dataclass
class LoadFigures:
    ratio: float
    steps_per_batch: float
    lone_tokens_per_s: float
    batch_tokens_per_s: float
    blocks: int
    prefill_tokens_per_s: float


def load_phase(server: Server, p2p, args, position: int, blocks: int, label: str, check: SpanBackend | None):
    """`args.sessions` sessions prefilled to about `position` tokens, then 1 and all of them stepping, alternately."""
    count = args.sessions
    prefills = [position + index for index in range(count)]  # sessions at different positions, as chats are
    max_length = session_length(args, position)
    load = Load(p2p, server.peer_id, server.uid(blocks), server.config.hidden_size, max_length, check is not None)
    began = time.perf_counter()
    prefill_seconds = run_sync(load.open(prefills), timeout=RUN_TIMEOUT)
    seconds = time.perf_counter() - began
    print(f"{stamp()} {server.name} {label}: {count} prefills of ~{position} tokens in {seconds:.1f} s")
    server.note_cache(p2p)
    lone, batch, ratios, per_batch = [], [], [], []
    for index in range(args.rounds):
        for sessions in (1, count) if index % 2 == 0 else (count, 1):
            before = server.info(p2p)["batches"]
            elapsed = run_sync(load.run(list(range(sessions)), args.steps), timeout=RUN_TIMEOUT)
            (lone if sessions == 1 else batch).append(sessions * args.steps / elapsed)
            if sessions > 1:
                per_batch.append(sessions * args.steps / max(server.info(p2p)["batches"] - before, 1))
        ratios.append(batch[-1] / lone[-1])
        print(f"  round {index + 1}: 1 session {lone[-1]:.2f} tokens/s, {count} sessions {batch[-1]:.2f} tokens/s")
    run_sync(load.close(), timeout=60)
    if check is not None:
        # Recomputing a session alone costs as much as serving it: the first (it stepped alone and stacked) and
        # the last (the longest prefill), unless --check-sessions asks for more.
        chosen = sorted({*range(min(args.check_sessions, count) - 1), count - 1})
        inputs, outputs = [load.inputs[i] for i in chosen], [load.outputs[i] for i in chosen]
        worst = check_exact(check, inputs, outputs)
        print(f"  max_abs_diff_vs_alone={worst:.2e} (sessions {', '.join(map(str, chosen))} recomputed alone)")
        if worst > 1e-4:
            failures.append(f"{label}: served outputs differ from each session alone by {worst:.2e}")
    prefill_rate = sum(prefills) / prefill_seconds
    figures = LoadFigures(
        statistics.median(ratios),
        statistics.median(per_batch),
        statistics.median(lone),
        statistics.median(batch),
        blocks,
        prefill_rate,
    )
    print(f"server_ratio_{count}_{label}={figures.ratio:.2f} ({server.name}, position ~{position}, {blocks} blocks)")
    print(f"steps_per_batch_{count}_{label}={figures.steps_per_batch:.1f}")
    return figures


def decode_probe(server: Server, p2p, args) -> float:
    """One session's decode tokens/s through the whole span (a short prefill first)."""
    max_length = args.positions[0] + args.steps + 1
    load = Load(p2p, server.peer_id, server.uid(server.blocks), server.config.hidden_size, max_length, False)
    run_sync(load.open([args.positions[0]]), timeout=RUN_TIMEOUT)
    server.note_cache(p2p)
    elapsed = run_sync(load.run([0], args.steps), timeout=RUN_TIMEOUT)
    run_sync(load.close(), timeout=60)
    return args.steps / elapsed


# ----- greedy generation -----


def greedy_ratio(server: Server, local, swarm: LocalSwarm, args, dtype: torch.dtype, backend=None) -> tuple:
    """Greedy tokens/s of local transformers and of the swarm (and, given a backend on the same weights, of the
    server's own engine in this process, without wire nor client), alternating within rounds; returns
    ({name: rates}, {name: median of its ratios to local within rounds}, whether the swarm's tokens equal local's)."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, args.vocab, (1, PROMPT_TOKENS), generator=generator)
    kwargs = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "do_sample": False}

    def timed(generate) -> tuple[float, torch.Tensor]:
        began = time.perf_counter()
        output = generate(inputs, **kwargs)
        return args.tokens / (time.perf_counter() - began), output

    def engine() -> float:
        """The same steps (the prompt, then one token at a time) straight through the backend."""
        cache = backend.new_cache(0, backend.end, 1, PROMPT_TOKENS + args.tokens)
        hidden = [torch.randn(1, PROMPT_TOKENS, backend.hidden_size)]
        hidden += [torch.randn(1, 1, backend.hidden_size) for _ in range(args.tokens - 1)]
        began = time.perf_counter()
        for step in hidden:
            backend.inference_step(step, cache)
        return args.tokens / (time.perf_counter() - began)

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(server.path), initial_peers=swarm.initial_peers, dtype=dtype, dht_prefix=server.dht_prefix
    )
    names = ["local", "swarm"] + (["backend"] if backend is not None else [])
    rates: dict[str, list[float]] = {name: [] for name in names}
    equal = True
    try:
        _, expected = timed(local.generate)  # also the warm-up
        model.generate(inputs, max_new_tokens=2, do_sample=False)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                if name == "local":
                    rates[name].append(timed(local.generate)[0])
                elif name == "backend":
                    rates[name].append(engine())
                else:  # a chat's session is open already when it generates: its opening is not a per-token cost
                    with model.inference_session(max_length=inputs.shape[1] + args.tokens) as session:
                        rate, output = timed(lambda ids, **kw: model.generate(ids, session=session, **kw))
                    rates[name].append(rate)
                    equal = equal and torch.equal(output, expected)
            print(f"  round {index + 1}: " + ", ".join(f"{name} {rates[name][-1]:.2f} tokens/s" for name in names))
    finally:
        model.close()
    ratios = {name: statistics.median(a / b for a, b in zip(rates[name], rates["local"])) for name in names}
    return rates, ratios, equal


# ----- memory -----


def memory_figures(server: Server, floor: int, peak: int | None = None, label: str = "") -> float:
    """The server's overhead now (or at `peak`, an earlier VmHWM: `label` says which) over weights and cache."""
    peak = peak_rss_bytes(server.process.pid) if peak is None else peak
    weights, cache = server.weight_bytes(), server.cache_used
    overhead = peak - floor - weights - cache
    pct = 100 * overhead / (weights + cache)
    print(
        f"memory{label} {server.name}: peak_rss_mb={peak / MB:.0f} import_floor_mb={floor / MB:.0f} "
        f"weights_mb={weights / MB:.0f} cache_used_mb={cache / MB:.1f} "
        f"(announced pool {server.pool_bytes / MB:.1f} MB) overhead_mb={overhead / MB:.0f}"
    )
    print(f"memory_overhead{label}_pct_{server.name}={pct:.1f}")
    return pct


# ----- the 70B reading -----


def seventy_b(args, figures: dict) -> None:
    """What the figures mean per token for a Llama-3-70B-shaped model on this machine."""
    scale = (LLAMA_70B["hidden_size"] / args.hidden) ** 2
    per_token = scale * LLAMA_70B_BLOCKS  # block decode seconds -> 70B seconds per token
    big = LlamaConfig(**LLAMA_70B, num_hidden_layers=LLAMA_70B_BLOCKS, vocab_size=args.vocab)
    print(
        f"\nPer token for a Llama-3-70B shape ({LLAMA_70B_BLOCKS} blocks of hidden {LLAMA_70B['hidden_size']}) on "
        f"this machine: a block's decode time here x (8192/{args.hidden})^2 = x{scale:g} (a decode step reads "
        f"every weight once; a 70B block holds {block_bytes(big, torch.float32, 'none') / 4:.3g} parameters, "
        f"this one {block_bytes(llama_config(args, 1), torch.float32, 'none') / 4:.3g}), x {LLAMA_70B_BLOCKS} blocks."
    )
    if "greedy" in figures:
        local_rate, ratio = figures["greedy"]
        local_s = per_token / (local_rate * args.blocks)
        print(
            f"  ratio_1server {ratio:.3f}: float32 70B in local transformers {local_s:.1f} s/token; "
            f"through servers at this ratio {local_s / ratio:.1f} s/token"
        )
    for label in ("short", "short_bfloat16", "long"):
        if label not in figures:
            continue
        load, dtype = figures[label]
        one = per_token / (load.lone_tokens_per_s * load.blocks)
        many = per_token / (load.batch_tokens_per_s * load.blocks)
        position = figures["positions"][label.split("_")[0]]
        prefill = position * per_token / (load.prefill_tokens_per_s * load.blocks)
        print(
            f"  server_ratio_{args.sessions}_{label} {load.ratio:.2f} ({dtype}, position ~{position}): 70B one session "
            f"{1 / one:.3f} tokens/s, {args.sessions} sessions {1 / many:.3f} tokens/s in all "
            f"({1 / many / args.sessions:.4f} each); its {position}-token prefill {prefill:.0f} s"
        )
    for mode, (pct, dtype, quant) in figures.get("memory", {}).items():
        weights = LLAMA_70B_BLOCKS * block_bytes(big, dtype, quant)
        head_dim = LLAMA_70B["hidden_size"] // LLAMA_70B["num_attention_heads"]
        kv = LLAMA_70B_BLOCKS * 2 * LLAMA_70B["num_key_value_heads"] * head_dim * (torch.finfo(dtype).bits // 8)
        probe = figures.get("probe", {}).get(mode)
        speed = f"; its decode here {per_token / (probe * args.blocks):.0f} s/token" if probe else ""
        print(
            f"  memory {mode} ({pct:+.1f}%): 70B weights {weights / 2**30:.1f} GiB, if the overhead stays this share "
            f"{weights * (1 + pct / 100) / 2**30:.1f} GiB; attention cache {kv / 1024:.0f} KiB per token{speed}"
        )
    if "load" in figures:
        rate = figures["load"]
        bf16 = LLAMA_70B_BLOCKS * block_bytes(big, torch.bfloat16, "none")
        print(
            f"  load {rate:.2f} GB/s: a 70B bfloat16 checkpoint ({bf16 / GB:.0f} GB) in {bf16 / GB / rate:.0f} s, "
            f"one block in {bf16 / LLAMA_70B_BLOCKS / GB / rate:.2f} s"
        )
    if "mixtral" in figures:
        rate = figures["mixtral"]
        print(
            f"  Mixtral-8x7B ({MIXTRAL_BLOCKS} blocks as this one, bfloat16): {MIXTRAL_BLOCKS / rate:.1f} s/token "
            "through servers"
        )


# ----- the run -----


def mode_options(mode: str) -> tuple[str, str]:
    """A memory mode's --torch-dtype and --quant-type (quantized spans keep the CPU's float32)."""
    return (mode, "none") if mode in DTYPES else ("float32", mode)


class Servers:
    """The bench's servers, started on demand or ahead (`start`): each is measured alone, then stopped."""

    def __init__(self, args: argparse.Namespace, swarm: LocalSwarm, p2p, checkpoints: dict[str, Path]):
        self.args, self.swarm, self.p2p, self.checkpoints = args, swarm, p2p, checkpoints
        self.started: dict[str, Server] = {}

    def _spawn(self, name: str) -> Server:
        args = self.args
        if name == "mixtral":
            path, blocks, dtype, quant = self.checkpoints["mixtral"], 1, "bfloat16", "none"
            cache_tokens = pool_tokens(1, PROMPT_TOKENS + args.tokens + 1, 1, 1)
        else:
            path, blocks, (dtype, quant) = self.checkpoints["llama"], args.blocks, mode_options(name)
            short, long = args.positions
            cache_tokens = pool_tokens(args.sessions, session_length(args, short), blocks, blocks)
            if name == args.long_dtype:
                cache_tokens = max(cache_tokens, pool_tokens(args.sessions, session_length(args, long), 1, blocks))
        config = AutoConfig.from_pretrained(path)
        return spawn_server(self.swarm, name, path, config, blocks, dtype, quant, cache_tokens)

    def start(self, names: list[str]) -> None:
        """Start these servers together (their loads overlap), and wait until all of them serve."""
        for name in names:
            if name not in self.started:
                self.started[name] = self._spawn(name)
        for name in names:
            ready(self.started[name], self.p2p)

    def get(self, name: str) -> Server:
        self.start([name])
        return self.started[name]


def llama_servers(args, servers: Servers, local, figures: dict) -> None:
    """float32 (greedy, short load, exactness), bfloat16 (short and long load), int8 and nf4 (a decode probe)."""
    short, long = args.positions
    floor, floor_quantized = figures["floors"]
    memory = figures.setdefault("memory", {})
    path, p2p = servers.checkpoints["llama"], servers.p2p
    for mode in args.modes:
        dtype, quant = mode_options(mode)
        if quant != "none" and not args.only:  # only a decode probe runs on each: they may load together
            servers.start([name for name in args.modes if mode_options(name)[1] != "none"])
        server = servers.get(mode)
        try:
            if args.only == "memory":  # one short decode: the peak of a server that has served, no speed figures
                loaded = peak_rss_bytes(server.process.pid)  # what loading took, before any request
                memory_figures(server, floor_quantized if quant != "none" else floor, loaded, "_after_load")
                figures.setdefault("probe", {})[mode] = decode_probe(server, p2p, args)
            elif mode == "float32":
                print(f"{stamp()} greedy generation, float32, local transformers vs one server:")
                engine = sharing_backend(path, local, args.blocks)
                rates, ratios, equal = greedy_ratio(server, local, servers.swarm, args, torch.float32, engine)
                figures["greedy"] = (statistics.median(rates["local"]), ratios["swarm"])
                print(" ".join(f"{name}_tokens_per_s={statistics.median(rates[name]):.2f}" for name in rates))
                print(f"tokens_equal={equal}")
                print(f"ratio_1server={ratios['swarm']:.3f}")
                # What the wire, the client and the server's machinery cost: the swarm against its own engine.
                vs_engine = statistics.median(a / b for a, b in zip(rates["swarm"], rates["backend"]))
                print(f"ratio_1server_vs_engine={vs_engine:.3f}")
                if not equal:
                    failures.append("greedy tokens through the server differ from local transformers'")
            if mode in DTYPES and not args.only:
                check = engine if mode == "float32" else None
                label = "short" if mode == "float32" else f"short_{mode}"
                figures[label] = (load_phase(server, p2p, args, short, args.blocks, label, check), mode)
            if mode == args.long_dtype and not args.only:
                figures["long"] = (load_phase(server, p2p, args, long, 1, "long", None), mode)
            if quant != "none" and not args.only:
                rate = decode_probe(server, p2p, args)
                figures.setdefault("probe", {})[mode] = rate
                print(f"{mode}: one session {rate:.2f} tokens/s through {args.blocks} blocks")
            memory[mode] = (memory_figures(server, floor_quantized if quant != "none" else floor), DTYPES[dtype], quant)
        finally:
            server.process.stop()


def mixtral_server(args, servers: Servers, local, figures: dict) -> None:
    server = servers.get("mixtral")
    try:
        if args.only == "memory":
            decode_probe(server, p2p=servers.p2p, args=args)
            memory_figures(server, figures["floors"][0])
            return
        print(f"{stamp()} greedy generation, Mixtral block in bfloat16, local transformers vs one server:")
        rates, ratios, equal = greedy_ratio(server, local, servers.swarm, args, torch.bfloat16)
        figures["mixtral"] = statistics.median(rates["swarm"])
        print(" ".join(f"{name}_tokens_per_s={statistics.median(rates[name]):.2f}" for name in rates))
        print(f"tokens_equal={equal} (bfloat16: not required)")
        print(f"ratio_1server_mixtral={ratios['swarm']:.3f}")
        server.cache_used = (PROMPT_TOKENS + args.tokens) * server.token_bytes()  # its one session at a time
        memory_figures(server, figures["floors"][0])
    finally:
        server.process.stop()


def run(args: argparse.Namespace, work: Path) -> dict:
    figures: dict = {"positions": dict(zip(("short", "long"), args.positions))}
    floors = start_import_floor()
    checkpoints = {"llama": work / "llama3-8b-shape", "mixtral": work / "mixtral-8x7b-shape"}
    saved = DTYPES[args.checkpoint_dtype]
    local = build_checkpoint(
        llama_config(args, args.blocks), torch.float32, checkpoints["llama"], args.shard_size, saved
    )
    # Small (smoke-test) shapes: every server starts at once, which saves most of the time. Real shapes load
    # one after the other: together they would hold several times the memory and share the two cores.
    small = sum(t.nbytes for t in local.parameters()) < SMALL_CHECKPOINT_BYTES
    local_mixtral = None
    if small and args.mixtral:
        local_mixtral = build_checkpoint(mixtral_config(args), torch.bfloat16, checkpoints["mixtral"], args.shard_size)
    figures["floors"] = import_floors(floors)
    print(f"import floor: {figures['floors'][0] / MB:.0f} MB, with bitsandbytes {figures['floors'][1] / MB:.0f} MB")
    for name, dtype in DTYPES.items() if not args.only else ():  # measured once nothing else of this bench runs
        ratio = matmul_ratio_16(args.hidden, args.intermediate, dtype)
        print(f"matmul_ratio_16_{name}={ratio:.2f} (one {args.hidden}x{args.intermediate} matmul, 16 rows vs 1)")
    # Both dtypes: one of them is a cast. The files were just written: they come from the page cache.
    cast = torch.bfloat16 if saved == torch.float32 else torch.float32
    figures["load"] = load_gb_per_s(checkpoints["llama"], saved, args.blocks)
    gc.collect()
    print(f"load_gb_per_s={figures['load']:.2f} (blocks 0:{args.blocks}, {args.checkpoint_dtype} as stored)")
    cast_rate = load_gb_per_s(checkpoints["llama"], cast, args.blocks)
    gc.collect()
    print(f"load_cast_gb_per_s={cast_rate:.2f} (the same, cast to {str(cast).split('.')[-1]})")
    env = {"DEBUG": "1", "SWARM_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": str(args.threads)}
    with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
        swarm.start_dht()
        dht = create_dht(swarm.initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        try:
            servers = Servers(args, swarm, run_sync(dht.replicate_p2p()), checkpoints)
            if small and not args.only:
                servers.start([*args.modes, "mixtral"] if args.mixtral else args.modes)
            llama_servers(args, servers, local, figures)
            del local
            gc.collect()
            if args.mixtral:
                if local_mixtral is None:
                    local_mixtral = build_checkpoint(
                        mixtral_config(args), torch.bfloat16, checkpoints["mixtral"], args.shard_size
                    )
                mixtral_server(args, servers, local_mixtral, figures)
        finally:
            dht.shutdown()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="Llama-shaped blocks served (and run locally)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256, help="the client's tiny embeddings and LM head")
    parser.add_argument("--positions", type=int, nargs=2, metavar=("SHORT", "LONG"), help="default 16 2048")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent sessions against one")
    parser.add_argument("--steps", type=int, help="one-token steps per session per run (default 16)")
    parser.add_argument("--rounds", type=int, help="rounds of every measurement; ratios are medians (default 3)")
    parser.add_argument("--tokens", type=int, help="greedy tokens per generation (default 16)")
    parser.add_argument(
        "--check-sessions", type=int, default=2, help="float32 short sessions recomputed alone to check outputs"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES), help="Llama servers to run (float32 always runs)"
    )
    parser.add_argument("--long-dtype", choices=list(DTYPES), default="bfloat16", help="the server of the long load")
    parser.add_argument("--mixtral", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--checkpoint-dtype", choices=list(DTYPES), default="float32", help="the Llama checkpoint's stored dtype"
    )
    parser.add_argument("--shard-size", help="save_pretrained's max_shard_size (default: 1GB or half the weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each server")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 steps, 4 tokens, positions 8 128")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--only", choices=["memory"], help="only these figures (memory: and the load rates)")
    args = parser.parse_args()
    quick = {"positions": [8, 128], "steps": 2, "rounds": 1, "tokens": 4}
    full = {"positions": [16, 2048], "steps": 16, "rounds": 3, "tokens": 16}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.long_dtype not in args.modes:
        args.modes.append(args.long_dtype)
    args.modes = [mode for mode in MODES if mode in args.modes or mode == "float32"]
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-real-shape-") as work:
        figures = run(args, Path(work))
    seventy_b(args, figures)
    print(f"total {time.perf_counter() - began:.0f} s ({stamp()} since the imports)")
    if failures:
        raise SystemExit("; ".join(failures))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
