"""Streaming overhead of the playground's websocket, and many sockets chatting at once.

Starts a local swarm (a DHT peer and one block server with the demo model) and the site under
daphne, then in one run:
  1. alternates the embedded client alone (`model.generate` with a streamer, in this process)
     and the same greedy generation through `/api/v2/generate`, and compares the time per
     streamed token (first token to last, so session setup and the prompt do not count);
  2. opens N sockets at once, each generating a reply, and reports the aggregate tokens/s.

    .venv/bin/python bench/bench_stream.py [--tokens 64] [--rounds 5] [--sockets 20]

Prints `ws_overhead_ms_per_token=<x>` (target: at most 2 ms) and `aggregate_tokens_per_s=<y>`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from playground.client import PlaygroundClient  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.demo_models import DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import LocalSwarm, free_port  # noqa: E402

QUESTION = "Explain the for statement."
# Greedy: both paths produce exactly the same tokens, so they do the same work.
GREEDY = {"do_sample": False, "repetition_penalty": 1.0}


class Timestamps(BaseStreamer):
    """When each generated token came out of generate() (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def per_token_ms(times: list[float]) -> float:
    return (times[-1] - times[0]) / (len(times) - 1) * 1000


def direct_round(model, prompt_ids: list[int], tokens: int) -> float:
    stamps = Timestamps()
    model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, streamer=stamps, **GREEDY)
    return per_token_ms(stamps.times)


async def websocket_round(url: str, prompt: str, prompt_ids: list[int], tokens: int) -> float:
    client = await PlaygroundClient.connect(url)
    try:
        assert (await client.open_session("demo", max_length=len(prompt_ids) + tokens + 8))["ok"]
        times, counts = [], []
        params = {
            "inputs": prompt,
            "stop_sequence": "@@never@@",
            "max_length": len(prompt_ids) + tokens,
            "do_sample": 0,
        }
        async for message in client.generate(**params, repetition_penalty=1.0):
            assert message["ok"], message
            times.append(time.perf_counter())
            counts.append(message["token_count"])
        # A message may carry several tokens (a character split over tokens): count tokens, not messages.
        return (times[-1] - times[0]) / sum(counts[1:]) * 1000
    finally:
        await client.close()


async def chat(url: str, tokens: int) -> int:
    client = await PlaygroundClient.connect(url)
    try:
        assert (await client.open_session("demo", max_length=512))["ok"]
        count = 0
        async for message in client.generate(
            user_message=QUESTION, max_new_tokens=tokens, do_sample=0, repetition_penalty=1.0
        ):
            assert message["ok"], message
            count += message["token_count"]
        return count
    finally:
        await client.close()


async def concurrent_chats(url: str, sockets: int, tokens: int) -> tuple[int, int, float]:
    began = time.perf_counter()
    results = await asyncio.gather(*(chat(url, tokens) for _ in range(sockets)), return_exceptions=True)
    elapsed = time.perf_counter() - began
    done = [r for r in results if isinstance(r, int)]
    for failure in (r for r in results if not isinstance(r, int)):
        print(f"# a socket failed: {failure!r}")
    return len(done), sum(done), elapsed


def wait_for_site(process, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if process.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the site did not start:\n{process.output()[-3000:]}") from None
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply in the overhead comparison")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of each path")
    parser.add_argument("--sockets", type=int, default=20, help="concurrent sockets")
    parser.add_argument("--chat-tokens", type=int, default=48, help="tokens per reply with concurrent sockets")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    env = {"DEBUG": "1", "PYTHONUNBUFFERED": "1", "SWARM_CACHE_DIR": str(work / "cache")}
    swarm = LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env, log_dir=work / "logs")
    model = None
    try:
        swarm.start_dht()
        swarm.start_server(str(DEMO_MODEL_PATH), "--block-indices", "0:8")
        port = free_port()
        site_env = {
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "VAR_DIR": str(work / "var"),
            "SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers),
            "PLAYGROUND_SESSIONS_PER_CLIENT": str(args.sockets + 4),
            "PLAYGROUND_MAX_SESSIONS": str(args.sockets + 4),
            "LOG_LEVEL": "WARNING",
        }
        daphne = str(Path(sys.executable).parent / "daphne")
        site = swarm.spawn_command(
            "daphne", [daphne, "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"], site_env
        )
        wait_for_site(site, f"http://127.0.0.1:{port}/healthz", timeout=60)
        url = f"ws://127.0.0.1:{port}/api/v2/generate"

        tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_PATH)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        model = AutoDistributedModelForCausalLM.from_pretrained(str(DEMO_MODEL_PATH), initial_peers=swarm.initial_peers)

        # Warm both paths up (imports, model load in the site, routes, pings), then alternate.
        direct_round(model, prompt_ids, 8)
        asyncio.run(websocket_round(url, prompt, prompt_ids, 8))
        direct_ms, websocket_ms = [], []
        for _ in range(args.rounds):
            direct_ms.append(direct_round(model, prompt_ids, args.tokens))
            websocket_ms.append(asyncio.run(websocket_round(url, prompt, prompt_ids, args.tokens)))
        direct, websocket = statistics.median(direct_ms), statistics.median(websocket_ms)
        print(f"# per-token ms, direct: {', '.join(f'{x:.2f}' for x in direct_ms)}")
        print(f"# per-token ms, websocket: {', '.join(f'{x:.2f}' for x in websocket_ms)}")
        print(f"direct_tokens_per_s={1000 / direct:.1f}")
        print(f"ws_tokens_per_s={1000 / websocket:.1f}")
        print(f"ws_to_direct_speed_ratio={direct / websocket:.3f}")
        print(f"ws_overhead_ms_per_token={websocket - direct:.2f}")

        completed, tokens, elapsed = asyncio.run(concurrent_chats(url, args.sockets, args.chat_tokens))
        print(f"concurrent_sockets={args.sockets} completed={completed} tokens={tokens} seconds={elapsed:.1f}")
        print(f"aggregate_tokens_per_s={tokens / elapsed:.1f}")
        print(f"aggregate_to_single_socket_ratio={tokens / elapsed / (1000 / websocket):.2f}")
    finally:
        if model is not None:
            model.close()
        swarm.close()


if __name__ == "__main__":
    main()
