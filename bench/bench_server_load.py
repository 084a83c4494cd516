"""Aggregate throughput of one block server under concurrent inference sessions.

    python bench/bench_server_load.py [--steps 64] [--sessions 1 4 16] [--blocks 8] [--rounds 5]

A real `runblockserver` process serves blocks of the demo model. This process opens N inference
sessions to it through the real wire (hidden states in, hidden states out, no LM head), each
stepping one token at a time, as N chats generating at once would (all from this process's event
loop, so that the client's own overhead stays small). Every
session first sends a prompt of a different length, so the server holds sessions at different
positions. Prints tokens/s in total for each N and `server_ratio_N=` (tokens/s with N sessions ÷
tokens/s with one), all measured in this run: every N in each of `--rounds` rounds, each ratio the
median of the ratios within rounds. Every session's outputs are also checked against
the same steps computed locally, one session at a time: batching must not change them.
`steps_per_batch_N=` is how many sessions' steps the server computed in one forward (from its
`rpc_info`), the median over rounds.

`lone_session_ratio=` is what batching costs a session that is alone: one session's steps through
the server's step batcher (queue, batch worker, placement by measured cost) ÷ the same steps
calling the backend directly, alternating in this process (no wire, so only the batcher differs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hivemind.p2p import PeerID  # noqa: E402
from hivemind.proto import runtime_pb2  # noqa: E402
from transformers import AutoConfig  # noqa: E402

from swarm.checkpoint import CheckpointFiles  # noqa: E402
from swarm.client.event_loop import run_sync  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.dht import create_dht  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.models.registry import dht_prefix_for, family_for, prepare_config  # noqa: E402
from swarm.names import block_uids, join_chain  # noqa: E402
from swarm.server.backend import SpanBackend, load_span  # noqa: E402
from swarm.server.batching import StepBatcher  # noqa: E402
from swarm.server.handler import INFERENCE_HANDLE, fetch_server_info  # noqa: E402
from swarm.streams import read_message, write_message  # noqa: E402
from swarm.wire import deserialize, dumps_metadata, pack_args, serialize  # noqa: E402

TOLERANCE = 1e-4  # float32 on both sides; a batched matmul may sum in another order


class Session:
    """One inference session on a raw rpc_inference stream, stepped from the client's event loop.

    The bench drives all sessions from one event loop (no thread per session), so that this
    process's own overhead stays small next to the server's: what is measured is the server.
    """

    def __init__(self, p2p, peer_id: PeerID, uid: str, max_length: int):
        self.p2p, self.peer_id, self.uid, self.max_length = p2p, peer_id, uid, max_length
        self.session_id = str(uuid.uuid4())
        self.steps = 0

    async def open(self) -> None:
        _, self.reader, self.writer = await self.p2p.call_binary_stream_handler(self.peer_id, INFERENCE_HANDLE)

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        metadata = {"session_id": self.session_id, "step_id": self.steps, "args_structure": ARGS}
        if self.steps == 0:
            metadata["max_length"] = self.max_length
        self.steps += 1
        request = runtime_pb2.ExpertRequest(
            uid=self.uid, tensors=[serialize(hidden), *NO_PROMPTS_NOR_HYPO_IDS], metadata=dumps_metadata(metadata)
        )
        await write_message(self.writer, request)
        response = await read_message(self.reader, runtime_pb2.ExpertResponse, hidden.numel() * 8 + 2**16)
        if response is None:
            raise RuntimeError("the server ended the session")
        return deserialize(response.tensors, max_tensors=1)[0]

    async def close(self) -> None:
        await write_message(self.writer, runtime_pb2.ExpertRequest())  # no tensors: the session is over
        self.writer.close()


ARGS = pack_args([torch.empty(0)] * 3)[1]
NO_PROMPTS_NOR_HYPO_IDS = (serialize(torch.empty(0)), serialize(torch.empty(0, dtype=torch.int64)))


async def run_sessions(
    p2p, peer_id: PeerID, uid: str, count: int, steps: int, hidden_size: int
) -> tuple[float, list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Step `count` sessions concurrently; returns (seconds, inputs per session, outputs per session)."""
    generator = torch.Generator().manual_seed(count)
    prompts = [torch.randn(1, 3 + 2 * i, hidden_size, generator=generator) for i in range(count)]
    tokens = [[torch.randn(1, 1, hidden_size, generator=generator) for _ in range(steps)] for _ in range(count)]
    max_length = max(p.shape[1] for p in prompts) + steps + 1
    sessions = [Session(p2p, peer_id, uid, max_length) for _ in range(count)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(count)]
    for session, prompt, out in zip(sessions, prompts, outputs):
        await session.open()
        out.append(await session.step(prompt))

    async def drive(session: Session, inputs: list[torch.Tensor], out: list[torch.Tensor]) -> None:
        for hidden in inputs:
            out.append(await session.step(hidden))

    began = time.perf_counter()
    await asyncio.gather(*(drive(s, t, o) for s, t, o in zip(sessions, tokens, outputs)))
    elapsed = time.perf_counter() - began
    for session in sessions:
        await session.close()
    inputs = [[prompt, *steps_] for prompt, steps_ in zip(prompts, tokens)]
    return elapsed, inputs, outputs


def check_exact(backend: SpanBackend, inputs: list[list[torch.Tensor]], outputs: list[list[torch.Tensor]]) -> float:
    """The largest difference between served outputs and the same session computed alone, locally."""
    worst = 0.0
    for session_inputs, session_outputs in zip(inputs, outputs):
        length = sum(hidden.shape[1] for hidden in session_inputs)
        cache = backend.new_cache(backend.start, backend.end - backend.start, 1, length)
        for hidden, served in zip(session_inputs, session_outputs):
            local = backend.inference_step(hidden, cache)
            worst = max(worst, (local - served).abs().max().item())
    return worst


def lone_session_ratio(backend: SpanBackend, steps: int, hidden_size: int, rounds: int = 11) -> float:
    """Tokens/s of one session through a StepBatcher ÷ tokens/s calling the backend directly (median of rounds)."""
    tokens = [torch.randn(1, 1, hidden_size) for _ in range(steps)]

    async def through_batcher(batcher: StepBatcher) -> float:
        cache = backend.new_cache(0, backend.end, 1, steps)
        began = time.perf_counter()
        for hidden in tokens:
            await batcher.step(hidden, cache)
        elapsed = time.perf_counter() - began
        batcher.session_closed(cache)  # as the server does when a session ends
        return elapsed

    def direct() -> float:
        cache = backend.new_cache(0, backend.end, 1, steps)
        began = time.perf_counter()
        for hidden in tokens:
            backend.inference_step(hidden, cache)
        return time.perf_counter() - began

    async def compare() -> list[float]:
        ratios = []
        with ThreadPoolExecutor(1) as executor:
            batcher = StepBatcher(backend, executor)
            await through_batcher(batcher)  # the first steps measure the cost that places the others
            for _ in range(rounds):  # alternating, so that both see the same machine
                ratios.append(direct() / await through_batcher(batcher))
            await batcher.close()
        return ratios

    loop = asyncio.new_event_loop()  # not asyncio.run(): it leaves hivemind's later calls without a loop here
    try:
        return statistics.median(loop.run_until_complete(compare()))
    finally:
        loop.close()


def measure(steps: int, counts: list[int], blocks: int, rounds: int) -> None:
    path = str(DEMO_MODEL_PATH)
    config = prepare_config(AutoConfig.from_pretrained(path))
    files, family = CheckpointFiles(path), family_for(config)
    backend = load_span(files, family, config, 0, blocks, torch.float32, torch.device("cpu"))
    lone_ratio = lone_session_ratio(backend, steps, config.hidden_size)
    with tempfile.TemporaryDirectory() as cache:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": cache}
        with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
            swarm.start_dht()
            server = swarm.start_server(path, "--block-indices", f"0:{blocks}", "--throughput", "1")
            dht = create_dht(swarm.initial_peers, client_mode=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            try:
                p2p = run_sync(dht.replicate_p2p())
                uid = join_chain(block_uids(dht_prefix_for(path, config.model_type), 0, blocks))
                peer_id = PeerID.from_base58(server.peer_id)

                def run(count: int, steps: int):
                    return run_sync(run_sessions(p2p, peer_id, uid, count, steps, config.hidden_size), timeout=600)

                def batches() -> int:
                    return run_sync(fetch_server_info(p2p, peer_id), timeout=30)["batches"]

                run(1, 8)  # warm-up: connections, first allocations
                rates: dict[int, list[float]] = {count: [] for count in counts}
                steps_per_batch: dict[int, list[float]] = {count: [] for count in counts}
                worst = 0.0
                for index in range(rounds):
                    # Every count in each round, the order alternating, so that slow spells hit them alike.
                    for count in counts if index % 2 == 0 else counts[::-1]:
                        batches_before = batches()
                        elapsed, inputs, outputs = run(count, steps)
                        rates[count].append(count * steps / elapsed)
                        steps_per_batch[count].append(count * (steps + 1) / (batches() - batches_before))
                        worst = max(worst, check_exact(backend, inputs, outputs))
                    print(
                        f"round {index + 1}/{rounds}: "
                        + " ".join(f"sessions={count} tokens_per_s={rates[count][-1]:.1f}" for count in counts),
                        flush=True,
                    )
            finally:
                dht.shutdown()
    if worst > TOLERANCE:
        raise SystemExit(f"served outputs differ from a session computed alone by {worst:.2e} (> {TOLERANCE})")
    print(f"max_abs_diff_vs_alone={worst:.2e}")
    base = rates[counts[0]]
    for count in counts:
        print(f"sessions={count} tokens_per_s={statistics.median(rates[count]):.1f} (median of rounds)")
    for count in counts[1:]:
        # The median of the ratios within rounds: each compares runs minutes apart at most, not a slow spell.
        ratio = statistics.median(rate / alone for rate, alone in zip(rates[count], base))
        print(f"server_ratio_{count}={ratio:.2f}")
        print(f"steps_per_batch_{count}={statistics.median(steps_per_batch[count]):.1f}")
    print(f"lone_session_ratio={lone_ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="one-token steps per session")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16], help="concurrent sessions to try")
    parser.add_argument("--blocks", type=int, default=8, help="serve blocks 0:N of the demo model")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every session count; ratios are medians")
    args = parser.parse_args()
    if args.sessions[0] != 1:
        parser.error("the first --sessions value is the baseline and must be 1")
    torch.set_num_threads(1)
    measure(args.steps, args.sessions, args.blocks, args.rounds)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
