"""Greedy generation through a swarm, as a separate process (run inside a test network namespace).

    python tests/swarm_generate.py MODEL INITIAL_PEER... --prompt TEXT --tokens N [--pause-after K] [--petals]

Prints one JSON line with the generated token ids and the client's connections. With `--pause-after K`
it stops after K tokens inside the same `generate` call, prints `PAUSED` and waits for a line on stdin
before it goes on (a chat whose connections may break in between). `--petals`: Petals' client defaults
(no server-to-server push).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("initial_peers", nargs="+")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--pause-after", type=int)
    parser.add_argument("--petals", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from swarm import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    options = {"use_server_to_server": False} if args.petals else {}
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers, **options)
    inputs = tokenizer(args.prompt, return_tensors="pt").input_ids
    streamer = PauseAfter(args.pause_after) if args.pause_after else None
    outputs = model.generate(
        inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, streamer=streamer
    )
    tokens = outputs[0, inputs.shape[1] :].tolist()
    servers = [span.peer_id for span in model.manager.view.online_spans()]
    print(json.dumps({"tokens": tokens, "connections": connections(model, servers)}), flush=True)


def connections(model, peer_ids: list[str]) -> dict[str, list[str]]:
    """The addresses of the client's open connections to these peers (a relayed one ends in /p2p-circuit)."""
    from swarm.client.event_loop import run_sync
    from swarm.relays import connection_addresses

    return {peer: run_sync(connection_addresses(model.manager.p2p, peer), timeout=10) for peer in peer_ids}


class PauseAfter:
    """A generate() streamer that waits for a line on stdin once `count` new tokens have come."""

    def __init__(self, count: int):
        self.count = count
        self.seen = -1  # the first put() is the prompt

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == self.count:
            print("PAUSED", flush=True)
            sys.stdin.readline()

    def end(self) -> None:
        pass


if __name__ == "__main__":
    main()
