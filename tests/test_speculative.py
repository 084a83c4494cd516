"""Speculative decoding through the swarm: several tokens per round trip, the same output.

transformers' assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`) drafts k tokens, the
servers verify them in one step, and the rejected ones are rolled back on every server (`start_from_position`
with the next step). Greedy output must equal plain greedy whatever the draft proposes; sampling must follow
the target model's distribution. Real servers of the Llama demo: blocks 0:4, 4:8 and a whole copy 0:8.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from swarm import AutoDistributedModelForCausalLM
from swarm.demo_models import DEMO_DRAFT_MODEL_PATH
from tests.conftest import DEMO_MODEL, start_swarm
from tests.test_fault_tolerance import KillAfter

pytestmark = pytest.mark.integration

NEW_TOKENS = 32
# The chi-square bound for 5 degrees of freedom at p = 0.001: a correct rule exceeds it once in 1000 runs.
CHI_SQUARE_BOUND = 20.52
SAMPLES = 200


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:4", "4:8", "0:8")
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        DEMO_MODEL, initial_peers=swarm.initial_peers, request_timeout=10.0
    )
    yield model
    model.close()


@pytest.fixture(scope="module")
def local():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def inputs():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    return tokenizer("The for statement is used to iterate over the elements of", return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def expected(local, inputs):
    return greedy(local, inputs).tolist()


def greedy(model, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(
        inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0, **kwargs
    )


def always_wrong(model):
    """A draft that never proposes the target's greedy token: the target's own logits, shifted by one token."""
    base = type(model)

    class ShiftedLogits(base):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits.roll(1, dims=-1)
            return output

    draft = copy.deepcopy(model)
    draft.__class__ = ShiftedLogits
    return draft


class Rounds(BaseStreamer):
    """Counts the rounds of a generation (one put() per verification step, after the prompt's) and its tokens."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass

    @property
    def tokens(self) -> list[int]:
        return [token for put in self.puts[1:] for token in put]


@pytest.mark.parametrize("draft", ["shipped", "always_right", "always_wrong", "prompt_lookup"])
def test_speculative_greedy_equals_plain_greedy(model, local, inputs, expected, draft):
    if draft == "prompt_lookup":
        options = {"prompt_lookup_num_tokens": 4}
    else:
        assistant = {
            "shipped": lambda: AutoModelForCausalLM.from_pretrained(DEMO_DRAFT_MODEL_PATH, dtype=torch.float32),
            "always_right": lambda: local,
            "always_wrong": lambda: always_wrong(local),
        }[draft]()
        options = {"assistant_model": assistant}
    rounds = Rounds()
    output = greedy(model, inputs, streamer=rounds, **options)
    assert output.tolist() == expected
    assert rounds.tokens == expected[0][inputs.shape[1] :]  # streamed as they were accepted
    if draft == "always_right":
        assert len(rounds.puts) - 1 < NEW_TOKENS / 2  # several tokens per round trip
    if draft == "always_wrong":
        assert len(rounds.puts) - 1 == NEW_TOKENS  # one token per round trip: every draft rolled back


def test_speculative_sessions_continue_exactly(model, local, inputs):
    """A session's second turn after speculative rollbacks: the servers hold exactly the kept tokens."""
    draft = always_wrong(local)
    with model.inference_session(max_length=inputs.shape[1] + 2 * NEW_TOKENS + 8) as session:
        first = greedy(model, inputs, assistant_model=draft, session=session)
        conversation = torch.cat([first, inputs[:, -4:]], dim=1)
        second = greedy(model, conversation, assistant_model=local, session=session)
    assert second.tolist() == greedy(local, conversation).tolist()


def test_speculative_sampling_with_a_seed_is_reproducible(model, local, inputs):
    draft = always_wrong(local)

    def sample() -> list[int]:
        torch.manual_seed(7)
        return model.generate(inputs, max_new_tokens=12, do_sample=True, assistant_model=draft).tolist()

    assert sample() == sample()


def test_speculative_sampling_follows_the_target_distribution(model, local, inputs):
    """The first token sampled through the swarm with a draft whose distribution differs (the target's, shifted)
    follows the target's probabilities: accepting a drafted token with min(1, p/q) and resampling rejections from
    the residual gives p. A rule that kept the draft's tokens would give the shifted distribution."""
    options = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    with torch.no_grad():
        target = local(inputs).logits[0, -1].softmax(-1)
    top = target.topk(5).indices.tolist()
    draft = always_wrong(local)
    torch.manual_seed(0)
    counts: Counter[int] = Counter()
    # One session for all samples: the servers keep the prompt, each sample rewinds to it (one round trip).
    with model.inference_session(max_length=inputs.shape[1] + 4) as session:
        for _ in range(SAMPLES):
            output = model.generate(inputs, max_new_tokens=2, assistant_model=draft, session=session, **options)
            token = output[0, inputs.shape[1]].item()
            counts[token if token in top else -1] += 1
    probabilities = {token: target[token].item() for token in top}
    probabilities[-1] = 1.0 - sum(probabilities.values())
    chi_square = sum((counts[k] - SAMPLES * p) ** 2 / (SAMPLES * p) for k, p in probabilities.items())
    print(f"first-token chi-square {chi_square:.1f} over {SAMPLES} samples (bound {CHI_SQUARE_BOUND})")
    assert math.isfinite(chi_square) and chi_square < CHI_SQUARE_BOUND, (counts, probabilities)


def test_a_server_killed_mid_speculation_is_replaced_exactly(swarm, model, local, inputs, expected):
    """Last in this module (it kills a server): the replacement replays the kept tokens only."""
    by_peer = {process.peer_id: process for process in swarm.processes if process.peer_id}
    with model.inference_session(max_length=inputs.shape[1] + NEW_TOKENS) as session:
        killer = KillAfter(1 + 3, session, by_peer)  # the prompt's put, then 3 verification steps
        output = greedy(model, inputs, assistant_model=always_wrong(local), session=session, streamer=killer)
        assert killer.killed is not None and killer.killed not in {span.peer_id for span in session.route}
    assert output.tolist() == expected
