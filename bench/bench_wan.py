"""Greedy generation over slow links: relayed steps vs server-to-server push, speculative decoding, the floor.

    python bench/bench_wan.py [--delay 0.01] [--tokens 64] [--rounds 5] [--speculative] [--draft PATH]

Two block servers (blocks 0:4 and 4:8 of the demo model) each sit behind a swarm.netsim proxy
process that delays every byte by `--delay` seconds each way, and announce only the proxy's
address. One client generates `--tokens` greedy tokens, each output checked equal to local
transformers', alternately with each step relayed by the client (client -> A -> client -> B -> client:
4 link crossings per token) and with A pushing its outputs to B (client -> A -> B -> client: 3).

Prints each path's tokens/s and ms/token, its latency-bound limit (the crossings times the delay
plus the compute of a token, measured here as local transformers' ms/token in the same rounds),
`push_over_relay=` (relayed ms/token ÷ push ms/token; fewer crossings allow up to 4:3 plus compute)
and `ratio_wan_limit=` (the best path's limit ms/token ÷ its achieved ms/token: 1.0 is the bound).

The floor: behind each server's proxy (the same proxy process, a second route) runs a bare hivemind
echo peer (bench/wan_floor.py), and a token of each path is timed as the same link crossings made
between echo peers: `floor_ms_per_token=` (the best path's) is what the links and the machine's
processes waking up cost with no model and none of our code, and `floor_ratio=` is that ÷ our
ms/token on the path (1.0: the model's compute and our code add nothing). Each path's line also
gives `floor_compute_ratio_*` = (floor + local compute) ÷ ours: the limit with the crossings measured
rather than counted (local generation overstates the compute on a token's critical path, whose
bookkeeping other processes partly do off it, so this one can exceed 1.0).

With `--speculative` the rounds also run the client's default path (push or relay, as it decides)
without and with speculative decoding (`assistant_model=` the shipped draft, or `--draft`), on these
links and on a second pair of servers behind proxies without delay (its own DHT prefix, the same
DHT): `speculative_speedup=` (tokens/s with the draft ÷ without, 10 ms links), `accepted_per_step=`
(draft tokens accepted per verification step, counted with a streamer: each put() after the
prompt's is one step, carrying the accepted tokens and one of the target's), `tokens_per_round_trip=`
and `speculative_speedup_no_delay=`.

Figures are medians over rounds; each round runs every mode back to back (in reverse order every
other round), and a ratio is the median of the ratios within rounds. Each generation runs in an
inference session opened before and closed after its timing, as a chat's is: the prompt's step
counts, freeing the servers' caches at the end (one more round trip) does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from bench.wan_floor import READY_MARK as ECHO_READY_MARK  # noqa: E402
from bench.wan_floor import Floor  # noqa: E402
from swarm import AutoDistributedModelForCausalLM  # noqa: E402
from swarm.client.model import DistributedModelForCausalLM  # noqa: E402
from swarm.demo_models import DEMO_DRAFT_MODEL_PATH, DEMO_MODEL_PATH  # noqa: E402
from swarm.local_swarm import NETSIM_READY_MARK, LocalSwarm, SwarmProcess, free_port  # noqa: E402

PROMPT = "The function returns the value of"  # the demo continues it with plain English prose
CROSSINGS = {"relay": 4, "push": 3}  # one-way link crossings per token with two servers
SPANS = ("0:4", "4:8")
NO_DELAY_PREFIX = "demo_model_no_delay-hf"  # the pair without delay: a swarm of its own on the same DHT
SPECULATIVE_MODES = ("plain", "spec", "plain_no_delay", "spec_no_delay")


class StepCounter(BaseStreamer):
    """Counts a generation's steps and tokens: transformers puts the prompt first, then each step's new tokens."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.steps = 0
        self.tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps += 1
        self.tokens += value.numel()

    def end(self) -> None:
        pass


@dataclasses.dataclass
class Link:
    """A block server behind a netsim proxy process; with an echo peer behind a second route of the same proxy."""

    server: SwarmProcess
    echo_port: int | None = None  # where the echo peer listens
    echo_proxy_port: int | None = None  # and its route through the proxy


def start_link(swarm: LocalSwarm, name: str, delay: float, targets: list[int]) -> list[int]:
    """A netsim process for one server's link, with a route to each of `targets` (local ports); the routes' ports."""
    argv = [sys.executable, "-m", "swarm.netsim", *(f"0:127.0.0.1:{port}" for port in targets), "--delay", str(delay)]
    proxy = swarm.spawn_command(f"{name}-link", argv, env={"PYTHONPATH": str(ROOT)})
    ports = []
    for target in targets:  # one line per route: "netsim listening on HOST:PORT -> HOST:TARGET"
        line = proxy.wait_for_line(functools.partial(_proxy_ready, target=target), 30)
        ports.append(int(line.split()[len(NETSIM_READY_MARK.split())].rsplit(":", 1)[1]))
    return ports


def _proxy_ready(text: str, target: int) -> bool:
    return text.startswith(NETSIM_READY_MARK) and text.endswith(f":{target}")


def start_pair(swarm: LocalSwarm, path: str, delay: float, *, prefix: str | None, echo: bool, tag: str) -> list[Link]:
    """Two servers (blocks 0:4 and 4:8) behind links of `delay`; started, not yet online."""
    links = []
    for index, span in enumerate(SPANS):
        name = f"server{index}{tag}"
        targets = [free_port(), free_port()] if echo else [free_port()]  # the server's port, the echo peer's
        proxies = start_link(swarm, name, delay, targets)
        args = [*swarm.command, "runblockserver", path, "--block-indices", span]
        args += ["--initial-peers", *swarm.initial_peers]
        args += ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{targets[0]}"]
        args += ["--announce-maddrs", f"/ip4/127.0.0.1/tcp/{proxies[0]}"]
        args += ["--dht-prefix", prefix] if prefix else []
        link = Link(swarm.spawn_command(name, args))
        if echo:
            link.echo_port, link.echo_proxy_port = targets[1], proxies[1]
        links.append(link)
    return links


def start_echo_peers(swarm: LocalSwarm, links: list[Link]) -> list[str]:
    """An echo peer behind each link's proxy, the second first (the first dials it to push); their proxied maddrs."""
    addresses: list[str] = []
    for index in reversed(range(len(links))):
        link = links[index]
        argv = [sys.executable, str(ROOT / "bench" / "wan_floor.py"), "--port", str(link.echo_port)]
        argv += ["--announce-port", str(link.echo_proxy_port), "--initial-peers", *addresses[:1]]
        echo = swarm.spawn_command(f"echo{index}", argv)
        peer_id = echo.wait_for_line(lambda text: text.startswith(ECHO_READY_MARK), 120).split()[-1]
        addresses.insert(0, f"/ip4/127.0.0.1/tcp/{link.echo_proxy_port}/p2p/{peer_id}")
    return addresses


def ms_per_token(generate: Callable, inputs: torch.Tensor, tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    began = time.perf_counter()
    output = generate(inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **kwargs)
    return (time.perf_counter() - began) * 1000 / tokens, output


class Rounds:
    """Every mode's generations, each checked against local greedy, and their timings."""

    def __init__(self, inputs: torch.Tensor, tokens: int, local: PreTrainedModel, expected: torch.Tensor):
        self.inputs, self.tokens, self.local, self.expected = inputs, tokens, local, expected
        self.times: dict[str, list[float]] = {}
        self.counters: dict[str, list[StepCounter]] = {}
        self.exact = 0  # swarm outputs checked equal to local greedy

    def record(self, mode: str, elapsed: float) -> None:
        self.times.setdefault(mode, []).append(elapsed)

    def swarm(self, mode: str, model: DistributedModelForCausalLM, push: bool | None, **kwargs) -> None:
        """One generation in a session of its own; push: True/False forces the path, None lets the client decide."""
        model.manager.config.use_server_to_server = push
        counter = StepCounter()
        # A chat's session is open already; freeing the servers' caches at its end is not a per-token
        # cost either (it waits a round trip). The prompt's step is timed.
        with model.inference_session(max_length=self.inputs.shape[1] + self.tokens) as session:
            generate = functools.partial(model.generate, session=session, streamer=counter, **kwargs)
            elapsed, output = ms_per_token(generate, self.inputs, self.tokens)
        if not torch.equal(output, self.expected):
            raise SystemExit(f"{mode}: the swarm's tokens differ from local transformers'")
        self.exact += 1
        self.record(mode, elapsed)
        self.counters.setdefault(mode, []).append(counter)

    def local_run(self) -> None:
        self.record("local", ms_per_token(self.local.generate, self.inputs, self.tokens)[0])

    def median(self, mode: str) -> float:
        return statistics.median(self.times[mode])

    def ratio(self, per_round: Callable[..., float], *modes: str) -> float:
        """The median over rounds of `per_round` applied to the modes' ms/token within a round."""
        return statistics.median(per_round(*values) for values in zip(*(self.times[mode] for mode in modes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.01, help="one-way delay of each server's link, seconds")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--speculative", action="store_true", help="also time speculative decoding with a draft")
    parser.add_argument("--draft", default=str(DEMO_DRAFT_MODEL_PATH), help="the draft model (--speculative)")
    args = parser.parse_args()
    if args.speculative and args.draft == str(DEMO_DRAFT_MODEL_PATH) and not DEMO_DRAFT_MODEL_PATH.is_dir():
        parser.error(f"the shipped draft model is missing ({DEMO_DRAFT_MODEL_PATH}): pass --draft PATH")
    torch.set_num_threads(1)
    path = str(DEMO_MODEL_PATH)

    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(PROMPT, return_tensors="pt").input_ids
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = ms_per_token(local.generate, inputs, args.tokens)[1]
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval() if args.speculative else None
    rounds = Rounds(inputs, args.tokens, local, expected)

    with tempfile.TemporaryDirectory() as cache:
        env = {"DEBUG": "1", "SWARM_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        with LocalSwarm([sys.executable, str(ROOT / "manage.py")], env=env) as swarm:
            swarm.start_dht()
            # Everything starts at once and comes up in parallel.
            links = start_pair(swarm, path, args.delay, prefix=None, echo=True, tag="")
            still = []  # the pair without delay
            if args.speculative:
                still = start_pair(swarm, path, 0.0, prefix=NO_DELAY_PREFIX, echo=False, tag="-no-delay")
            echo_addresses = start_echo_peers(swarm, links)
            for link in links + still:
                link.server.wait_until_online()
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            model_still = None
            floor = None
            try:
                if args.speculative:
                    model_still = AutoDistributedModelForCausalLM.from_pretrained(
                        path, initial_peers=swarm.initial_peers, dht=model.dht, dht_prefix=NO_DELAY_PREFIX
                    )
                floor = Floor(*echo_addresses, hidden_size=model.config.hidden_size)
                default_pushes, saving_ms = run_rounds(args, rounds, model, model_still, floor, draft)
            finally:
                if floor is not None:
                    floor.close()
                if model_still is not None:
                    model_still.close()
                model.close()
    report(args, rounds, default_pushes, saving_ms)


def run_rounds(
    args: argparse.Namespace,
    rounds: Rounds,
    model: DistributedModelForCausalLM,
    model_still: DistributedModelForCausalLM | None,
    floor: Floor,
    draft: PreTrainedModel | None,
) -> tuple[bool, float]:
    """Warm up every path, then run the rounds; returns whether the default path pushes, and its estimated saving."""
    inputs = rounds.inputs
    for push in (False, True, None):  # warm-up: connections through the proxies, routes, pings
        model.manager.config.use_server_to_server = push
        model.generate(inputs, max_new_tokens=4, do_sample=False)
    for mode in ("relay", "push"):
        floor.ms_per_token(mode, 4)
    runs: dict[str, Callable[[], None]] = {
        "local": rounds.local_run,
        "relay": lambda: rounds.swarm("relay", model, False),
        "push": lambda: rounds.swarm("push", model, True),
        "floor_relay": lambda: rounds.record("floor_relay", floor.ms_per_token("relay", args.tokens)),
        "floor_push": lambda: rounds.record("floor_push", floor.ms_per_token("push", args.tokens)),
    }
    if draft is not None:
        model_still.manager.config.use_server_to_server = None
        for target in (model, model_still):
            target.generate(inputs, max_new_tokens=4, do_sample=False, assistant_model=draft)
        model_still.generate(inputs, max_new_tokens=4, do_sample=False)
        runs["plain"] = lambda: rounds.swarm("plain", model, None)
        runs["spec"] = lambda: rounds.swarm("spec", model, None, assistant_model=draft)
        runs["plain_no_delay"] = lambda: rounds.swarm("plain_no_delay", model_still, None)
        runs["spec_no_delay"] = lambda: rounds.swarm("spec_no_delay", model_still, None, assistant_model=draft)
    modes = list(runs)
    for index in range(args.rounds):
        order = modes if index % 2 == 0 else modes[::-1]
        for mode in order:
            runs[mode]()
        times = " ".join(f"{mode}_ms={rounds.times[mode][-1]:.1f}" for mode in order)
        print(f"round {index + 1}/{args.rounds}: {times}", flush=True)
    # What the client does by default (use_server_to_server=None): push where it saves enough.
    model.manager.config.use_server_to_server = None
    with model.inference_session(max_length=inputs.shape[1] + 4) as session:
        model.generate(inputs, session=session, max_new_tokens=4, do_sample=False)
        first, second = (span.peer_id for span in session.route)
        default_pushes = session.push_worth_it(first, second)
    return default_pushes, model.manager.push_saving(first, second) * 1000


def report(args: argparse.Namespace, rounds: Rounds, default_pushes: bool, saving_ms: float) -> None:
    compute_ms = rounds.median("local")
    delay_ms = args.delay * 1000
    print(f"delay_ms={delay_ms:g} (one way, each server's link) compute_ms_per_token={compute_ms:.2f} (local)")
    ratios, floor_ratios, with_compute = {}, {}, {}
    for mode in ("relay", "push"):
        achieved = rounds.median(mode)
        limit = CROSSINGS[mode] * delay_ms + compute_ms
        # Within a round: the machine's slow spells last longer than a round and cancel out.
        ratios[mode] = rounds.ratio(lambda local, got, m=mode: (CROSSINGS[m] * delay_ms + local) / got, "local", mode)
        floor_ratios[mode] = rounds.ratio(lambda echo, got: echo / got, f"floor_{mode}", mode)
        with_compute[mode] = rounds.ratio(lambda local, echo, got: (echo + local) / got, "local", f"floor_{mode}", mode)
        # What each crossing costs beyond its delay (the daemons' and the proxy's hops, waking idle processes).
        overhead = (achieved - limit) / CROSSINGS[mode]
        floor = rounds.median(f"floor_{mode}")
        print(
            f"{mode}: tokens_per_s={1000 / achieved:.2f} ms_per_token={achieved:.2f} "
            f"limit_ms_per_token={limit:.2f} ratio_to_limit={ratios[mode]:.3f} "
            f"overhead_ms_per_crossing={overhead:.2f} floor_ms={floor:.2f} beyond_floor_ms={achieved - floor:.2f} "
            f"floor_ratio_{mode}={floor_ratios[mode]:.3f} floor_compute_ratio_{mode}={with_compute[mode]:.3f}"
        )
    best = min(("relay", "push"), key=rounds.median)
    print(f"push_over_relay={rounds.median('relay') / rounds.median('push'):.3f}")
    default = "push" if default_pushes else "relay"
    print(f"best_path={best} default_path={default} (push saves an estimated {saving_ms:.1f} ms per step)")
    print(f"ratio_wan_limit={ratios[best]:.3f}")
    print(f"floor_ms_per_token={rounds.median(f'floor_{best}'):.2f} floor_ratio={floor_ratios[best]:.3f} ({best})")
    if "spec" in rounds.times:
        report_speculative(rounds)
    print(f"exact_outputs={rounds.exact} (swarm generations equal to local greedy)")


def report_speculative(rounds: Rounds) -> None:
    for mode in SPECULATIVE_MODES:
        counters = rounds.counters[mode]
        steps, tokens = sum(c.steps for c in counters), sum(c.tokens for c in counters)
        print(
            f"{mode}: tokens_per_s={1000 / rounds.median(mode):.2f} ms_per_token={rounds.median(mode):.2f} "
            f"steps_per_generation={steps / len(counters):.1f} tokens_per_step={tokens / steps:.2f}"
        )
    counters = rounds.counters["spec"]
    steps, tokens = sum(c.steps for c in counters), sum(c.tokens for c in counters)
    print(f"speculative_speedup={rounds.ratio(lambda plain, spec: plain / spec, 'plain', 'spec'):.3f}")
    print(f"accepted_per_step={(tokens - steps) / steps:.2f}")
    print(f"tokens_per_round_trip={tokens / steps:.2f}")
    speedup = rounds.ratio(lambda plain, spec: plain / spec, "plain_no_delay", "spec_no_delay")
    print(f"speculative_speedup_no_delay={speedup:.3f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
