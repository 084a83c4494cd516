"""Sessions stepping together on one server get what each would get alone, in every model family.

The backend stacks the steps of sessions at different positions (and with different batch sizes)
into one forward; each session's outputs and cache must equal those of the same steps computed
for that session alone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.checkpoint import CheckpointFiles
from swarm.client.event_loop import run_sync
from swarm.models.family import CacheLayout
from swarm.models.registry import family_for, prepare_config
from swarm.server import batching
from swarm.server.backend import QueuedStep, SessionKVCache, SpanBackend, StackedCaches, load_span
from swarm.server.batching import CostModel, StepBatcher, _Pending
from swarm.server.handler import fetch_server_info
from tests.conftest import DEMO_MODEL, client_peer, start_swarm
from tests.test_families import FAMILIES, FAMILIES_BY_NAME, WINDOW, WITH_HEAD_DIM, Family, build_model

# float64, so that a stacked matmul summing in another order than a one-row one stays far below it.
ATOL = 1e-10
RTOL = 1e-10
# DeepSeek-V3 routes its experts in float32 whatever the dtype: float32 rounding, amplified by the routing.
FLOAT32_ROUTER_TOLERANCE = {"deepseek_v3": 1e-4}
PROMPT_LENGTHS = (WINDOW + 4, 3, WINDOW + 1)  # different positions, two past the sliding window


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], SpanBackend]:
    built: dict[str, SpanBackend] = {}

    def get(family: Family) -> SpanBackend:
        if family.name not in built:
            path: Path = tmp_path_factory.mktemp("batching") / family.name
            build_model(family).save_pretrained(path)
            config = prepare_config(AutoConfig.from_pretrained(path))
            config._experts_implementation = "eager"  # MoE: grouped_mm has no float64 kernel
            model_family = family_for(config)
            files = CheckpointFiles(str(path))
            built[family.name] = load_span(files, model_family, config, 0, 4, torch.float64, torch.device("cpu"))
        return built[family.name]

    return get


def hidden_states(backend: SpanBackend, rows: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, backend.hidden_size, generator=generator, dtype=torch.float64)


def new_cache(backend: SpanBackend, rows: int) -> SessionKVCache:
    return backend.new_cache(0, 4, rows, 32)


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_stacked_steps_equal_each_session_alone(family: Family, backends) -> None:
    backend = backends(family)
    tolerance = FLOAT32_ROUTER_TOLERANCE.get(family.name, ATOL)
    rows = (1, 2, 1)  # the second session is a batch of two (e.g. two beams)
    prompts = [hidden_states(backend, r, n, seed=i) for i, (r, n) in enumerate(zip(rows, PROMPT_LENGTHS))]
    alone = [new_cache(backend, r) for r in rows]
    together = [new_cache(backend, r) for r in rows]
    for prompt, cache_alone, cache_together in zip(prompts, alone, together):
        backend.inference_step(prompt, cache_alone)
        backend.inference_step(prompt, cache_together)
    for round_ in range(4):
        length = 1 if round_ < 3 else 2  # decode steps, then two tokens each
        steps = [hidden_states(backend, r, length, seed=100 + 10 * round_ + i) for i, r in enumerate(rows)]
        expected = [backend.inference_step(hidden, cache) for hidden, cache in zip(steps, alone)]
        outputs = backend.inference_steps([QueuedStep(hidden, cache) for hidden, cache in zip(steps, together)])
        for output, wanted in zip(outputs, expected):
            torch.testing.assert_close(output, wanted, atol=tolerance, rtol=tolerance)
    for cache_alone, cache_together in zip(alone, together):
        assert cache_together.position == cache_alone.position
        end = cache_alone.position
        torch.testing.assert_close(
            cache_together.keys[..., :end, :], cache_alone.keys[..., :end, :], atol=tolerance, rtol=tolerance
        )
        torch.testing.assert_close(
            cache_together.values[..., :end, :], cache_alone.values[..., :end, :], atol=tolerance, rtol=tolerance
        )


def test_stacked_steps_apply_each_sessions_reorder(backends) -> None:
    backend = backends(FAMILIES[0])
    alone, together = [new_cache(backend, 2) for _ in range(2)], [new_cache(backend, 2) for _ in range(2)]
    for i in range(2):
        prompt = hidden_states(backend, 2, 4 + i, seed=i)
        backend.inference_step(prompt, alone[i])
        backend.inference_step(prompt, together[i])
    hypo_ids = [torch.tensor([1, 1]), None]
    steps = [hidden_states(backend, 2, 1, seed=10 + i) for i in range(2)]
    expected = [backend.inference_step(h, c, hypo_ids=ids) for h, c, ids in zip(steps, alone, hypo_ids)]
    queued = [QueuedStep(h, c, hypo_ids=ids) for h, c, ids in zip(steps, together, hypo_ids)]
    for output, wanted in zip(backend.inference_steps(queued), expected):
        torch.testing.assert_close(output, wanted, atol=ATOL, rtol=RTOL)


def test_sessions_on_different_blocks_are_not_stacked(backends) -> None:
    backend = backends(FAMILIES[0])
    caches = [backend.new_cache(0, 4, 1, 8), backend.new_cache(1, 3, 1, 8)]
    steps = [QueuedStep(hidden_states(backend, 1, 1, seed=i), cache) for i, cache in enumerate(caches)]
    with pytest.raises(ValueError, match="same blocks"):
        backend.inference_steps(steps)


# ----- through a real server -----


@pytest.fixture(scope="module")
def swarm(make_swarm):
    swarm = start_swarm(make_swarm, "0:8")
    yield swarm
    swarm.close()


def stacked_steps(swarm) -> int:
    with client_peer(swarm) as (p2p, peer_id):
        return run_sync(fetch_server_info(p2p, peer_id), timeout=30)["stacked_steps"]


@pytest.mark.integration
def test_concurrent_chats_on_one_server_are_each_exact(swarm):
    """Six generations at once through one server: steps are stacked, and every one is what it is alone."""
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    prompts = [tokenizer(f"Chat number {i} says" + " hello" * i, return_tensors="pt").input_ids for i in range(6)]
    local = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    expected = [local.generate(ids, max_new_tokens=16, do_sample=False).tolist() for ids in prompts]
    before = stacked_steps(swarm)
    model = AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL, initial_peers=swarm.initial_peers)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            actual = list(
                pool.map(lambda ids: model.generate(ids, max_new_tokens=16, do_sample=False).tolist(), prompts)
            )
    finally:
        model.close()
    assert actual == expected
    assert stacked_steps(swarm) > before  # some steps of different chats did share a forward


# ----- the step batcher -----


def test_the_batcher_stacks_queued_steps_and_isolates_a_failing_one(backends) -> None:
    """Steps queued together share a forward; one that fails is computed alone, the others still answer."""
    backend = backends(FAMILIES[0])
    broken = SessionKVCache(0, 4, 1, 8, CacheLayout(1, 3, 1, 3), backend.dtype, backend.device)  # wrong shape
    caches = [backend.new_cache(0, 4, 1, 8) for _ in range(3)]
    alone = [backend.new_cache(0, 4, 1, 8) for _ in range(3)]
    steps = [hidden_states(backend, 1, 1, seed=i) for i in range(3)]
    expected = [backend.inference_step(h, c) for h, c in zip(steps, alone)]

    async def run():
        with ThreadPoolExecutor(1) as executor:
            batcher = StepBatcher(backend, executor)
            try:
                results = await asyncio.gather(
                    *(batcher.step(h, c) for h, c in zip(steps, caches)),
                    batcher.step(hidden_states(backend, 1, 1, seed=9), broken),
                    return_exceptions=True,
                )
            finally:
                await batcher.close()
            return results, batcher

    results, batcher = asyncio.run(run())
    for output, wanted in zip(results[:3], expected):
        torch.testing.assert_close(output, wanted, atol=ATOL, rtol=RTOL)
    assert isinstance(results[3], Exception)
    assert [cache.position for cache in caches] == [1, 1, 1] and broken.position == 0


def test_only_sessions_that_stepped_lately_count_as_stepping(monkeypatch) -> None:
    """Where a step computes depends on the sessions stepping, not on those merely open: a peer's idle
    sessions must not send everyone else's steps through the thread hand-off."""
    batcher = StepBatcher(None, None)
    caches = [object(), object(), object()]
    for cache in (*caches, caches[0]):
        batcher._note_step(cache)
    assert batcher.stepping_sessions == 3  # one count per session, however often it steps
    batcher.session_closed(caches[1])
    assert batcher.stepping_sessions == 2  # a closed session no longer counts (a chat's next turn opens a new one)
    monkeypatch.setattr(batching, "ACTIVE_SECONDS", -1.0)  # as if a long quiet spell had passed
    assert batcher.stepping_sessions == 0


def test_a_session_is_waited_for_only_while_its_step_is_due() -> None:
    timing = batching._SessionTiming(stepped_at=0.0, answered_at=10.0, turnaround=0.002)  # due at 10.002
    assert timing.due_between(now=10.001, deadline=10.003)
    assert not timing.due_between(now=10.0, deadline=10.001)  # due after the deadline: not waited for
    assert timing.due_between(now=10.004, deadline=10.005)  # a little late: still expected
    assert not timing.due_between(now=10.005, deadline=10.006)  # overdue by a whole turnaround: gone quiet
    assert not batching._SessionTiming(stepped_at=0.0, answered_at=None, turnaround=0.002).due_between(0.0, 1.0)


def step_two_sessions(backend: SpanBackend, turnarounds: tuple[float, float], steps: int) -> StepBatcher:
    """Two sessions stepping at once, each taking its turnaround (s) to send its next step."""
    caches = [backend.new_cache(0, 4, 1, steps) for _ in range(2)]

    async def session(cache: SessionKVCache, turnaround: float, batcher: StepBatcher) -> None:
        for index in range(steps):
            await asyncio.sleep(turnaround)
            await batcher.step(hidden_states(backend, 1, 1, seed=index), cache)

    async def run() -> StepBatcher:
        with ThreadPoolExecutor(1) as executor:
            batcher = StepBatcher(backend, executor)
            try:
                await asyncio.gather(*(session(c, t, batcher) for c, t in zip(caches, turnarounds)))
            finally:
                await batcher.close()
            return batcher

    return asyncio.run(run())


def test_a_batch_waits_for_a_session_whose_step_is_due(backends, monkeypatch) -> None:
    """A session a few ms slower to send its next step joins the batch instead of alternating with the
    other (on this CPU a batch of two costs little more than one)."""
    backend = backends(FAMILIES[0])
    monkeypatch.setattr(batching, "GATHER_SHARE", 100.0)  # the share of a tiny model's batch is under 10 ms
    batcher = step_two_sessions(backend, turnarounds=(0.01, 0.013), steps=12)
    # A turnaround is known from a session's third step on: from then on both step together.
    assert batcher.stacked_steps >= 2 * 8, batcher.stacked_steps


def test_a_batch_waits_only_for_steps_due_within_its_budget(backends) -> None:
    """A session whose next step is due after the batch's budget (half its measured cost), as on a slow
    link, is not waited for: the batch starts at once. One due within the budget is waited for."""
    backend = backends(FAMILIES[0])

    async def waits_for(turnaround: float) -> bool:
        batcher = StepBatcher(backend, None)
        batcher._wakeup = asyncio.Event()
        queued, other = new_cache(backend, 1), new_cache(backend, 1)
        batcher._note_step(other)  # both sessions are stepping; the other one's answer just went out
        batcher._note_answered(other)
        batcher._sessions[id(other)].turnaround = turnaround
        batcher._note_step(queued)
        pending = _Pending(QueuedStep(hidden_states(backend, 1, 1, seed=0), queued), None, asyncio.Future())
        batcher._queue.append(pending)
        batcher.costs.record(pending.cost_kind, 1, 1.0)  # a budget of 0.5 s
        gathering = asyncio.create_task(batcher._gather())
        await asyncio.sleep(0)  # the task's first step runs: done unless it waits for the other session
        waited = not gathering.done()
        gathering.cancel()
        await asyncio.gather(gathering, return_exceptions=True)
        return waited

    assert not asyncio.run(waits_for(turnaround=5.0))
    assert asyncio.run(waits_for(turnaround=0.1))


def test_the_batcher_serves_the_oldest_step_first(backends) -> None:
    """Steps that cannot stack with the oldest wait one batch at most, in their order: nothing starves."""
    backend = backends(FAMILIES[0])

    async def take_all(lengths: list[int]) -> list[list[int]]:
        batcher = StepBatcher(backend, None, max_batch_rows=2)
        for index, length in enumerate(lengths):
            step = QueuedStep(hidden_states(backend, 1, length, seed=index), new_cache(backend, 1))
            future = asyncio.get_running_loop().create_future()
            future.index = index
            batcher._queue.append(_Pending(step, None, future))
        batches = []
        while batch := batcher._take_batch():
            batches.append([pending.future.index for pending in batch])
        return batches

    # Steps of one token stack (two rows at most here); the two-token steps stack with each other.
    assert asyncio.run(take_all([1, 2, 1, 1, 2])) == [[0, 2], [1, 4], [3]]


def test_the_cost_model_buckets_rows_by_powers_of_two() -> None:
    cost = CostModel()
    cost.record("kind", 3, 0.5)
    cost.record("kind", 4, 0.7)
    assert cost.estimate("kind", 4) == pytest.approx(0.5 + 0.2 * (0.7 - 0.5))  # rows 3 and 4: one bucket
    assert cost.estimate("kind", 5) is None


# ----- the bounds of a stacked forward -----


def queued_steps(backend: SpanBackend, count: int, length: int, position: int = 0) -> list[_Pending]:
    pending = []
    for index in range(count):
        cache = backend.new_cache(0, 4, 1, position + length)
        cache.position = position
        step = QueuedStep(hidden_states(backend, 1, length, seed=index), cache)
        pending.append(_Pending(step, None, asyncio.Future(loop=asyncio.new_event_loop())))
    return pending


def batch_sizes(batcher: StepBatcher, pending: list[_Pending]) -> list[int]:
    batcher._queue.extend(pending)
    sizes = []
    while batch := batcher._take_batch():
        sizes.append(len(batch))
    return sizes


def test_a_stacked_forward_carries_no_more_tokens_than_one_request(backends) -> None:
    """16 sessions replaying 1024-token chunks at once: no forward over the server's 8192 tokens per request
    (stacked, they made one 16k-token forward with its masks and padded copies)."""
    backend = backends(FAMILIES[0])
    batcher = StepBatcher(backend, None)
    assert batch_sizes(batcher, queued_steps(backend, 16, 1024)) == [8, 8]
    assert batch_sizes(batcher, queued_steps(backend, 16, 1)) == [16]  # decode steps still stack whole


def test_a_stacked_forward_keeps_its_temporary_tensors_within_budget(backends) -> None:
    """Where each row's cache is copied padded to the longest (BLOOM's own attention), sessions far into their
    caches stack fewer at once; where sessions attend each over its own cache, nothing grows with them."""
    padded = backends(FAMILIES_BY_NAME["bloom"])
    assert not padded.per_session_attention
    budget = padded.stacked_step_bytes(rows=4, length=1, kv_length=32)
    batcher = StepBatcher(padded, None, max_batch_bytes=budget)
    assert batch_sizes(batcher, queued_steps(padded, 8, 1, position=31)) == [4, 4]
    assert batch_sizes(batcher, queued_steps(padded, 8, 1, position=0)) == [8]
    per_session = backends(FAMILIES[0])
    assert per_session.per_session_attention
    batcher = StepBatcher(per_session, None, max_batch_bytes=per_session.stacked_step_bytes(8, 1, 32))
    assert batch_sizes(batcher, queued_steps(per_session, 8, 1, position=31)) == [8]


def test_closing_the_batcher_settles_the_steps_it_was_computing(backends, monkeypatch) -> None:
    """A server stopping while a batch computes: its steps get an error instead of waiting for ever."""
    backend = backends(FAMILIES[0])
    entered, release = threading.Event(), threading.Event()
    compute = backend.inference_steps

    def slow(*args, **kwargs):
        entered.set()
        release.wait(30)
        return compute(*args, **kwargs)

    monkeypatch.setattr(backend, "inference_steps", slow)

    async def run():
        with ThreadPoolExecutor(1) as executor:
            batcher = StepBatcher(backend, executor)
            step = asyncio.create_task(batcher.step(hidden_states(backend, 1, 1, seed=0), new_cache(backend, 1)))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
            await batcher.close()
            try:
                with pytest.raises(batching.BatcherClosed, match="shutting down"):
                    await asyncio.wait_for(step, 5)
                with pytest.raises(batching.BatcherClosed):
                    await batcher.step(hidden_states(backend, 1, 1, seed=1), new_cache(backend, 1))
            finally:
                release.set()

    asyncio.run(run())


def test_the_cost_model_keeps_a_bounded_number_of_kinds() -> None:
    """Kinds follow what clients send (new tokens per row, adapters): the model forgets the oldest."""
    cost = CostModel(max_keys=8)
    for tokens in range(100):
        cost.record(("step", tokens), 1, 0.1)
    assert len(cost._seconds) == 8
    assert cost.estimate(("step", 99), 1) == 0.1 and cost.estimate(("step", 0), 1) is None


def test_steps_computed_alone_are_not_measured_one_kind_each(backends) -> None:
    backend = backends(FAMILIES[0])
    cache = new_cache(backend, 1)
    step = QueuedStep(hidden_states(backend, 1, 2, seed=0), cache, prompts=torch.zeros(4, 1, 1, backend.hidden_size))
    assert _Pending(step, None, None).cost_kind is None  # (its id made a new key per step, kept for ever)


DYNAMIC_ROPE = Family(
    "llama_dynamic_rope",
    lambda: transformers.LlamaConfig(
        **{**WITH_HEAD_DIM, "max_position_embeddings": 16},
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
)


def test_dynamic_rope_rows_stacked_together_each_get_their_own_frequencies(backends) -> None:
    """Dynamic RoPE scales its frequencies by the longest position it sees: a session at position 4 stepping
    with one past max_position_embeddings must still get what it gets alone."""
    backend = backends(DYNAMIC_ROPE)
    prompts = [hidden_states(backend, 1, n, seed=n) for n in (4, 24)]
    alone = [new_cache(backend, 1) for _ in prompts]
    together = [new_cache(backend, 1) for _ in prompts]
    for prompt, cache_alone, cache_together in zip(prompts, alone, together):
        backend.inference_step(prompt, cache_alone)
        backend.inference_step(prompt, cache_together)
    steps = [hidden_states(backend, 1, 1, seed=50 + i) for i in range(2)]
    expected = [backend.inference_step(hidden, cache) for hidden, cache in zip(steps, alone)]
    outputs = backend.inference_steps([QueuedStep(h, c) for h, c in zip(steps, together)])
    for output, wanted in zip(outputs, expected):
        torch.testing.assert_close(output, wanted, atol=ATOL, rtol=RTOL)


def test_stacked_sessions_attend_over_their_own_caches_without_copies(backends, monkeypatch) -> None:
    """Families whose layers call transformers' attention interface stack sessions without copying their caches
    into padded tensors (O(sessions x position) bytes per token): each attends over its own cache views."""
    backend = backends(FAMILIES[0])
    made: list[StackedCaches] = []
    original = StackedCaches.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(StackedCaches, "__init__", recording)
    caches = [new_cache(backend, 1) for _ in range(2)]
    for cache, length in zip(caches, (20, 1)):
        backend.inference_step(hidden_states(backend, 1, length, seed=length), cache)
    backend.inference_steps([QueuedStep(hidden_states(backend, 1, 1, seed=i), c) for i, c in enumerate(caches)])
    assert len(made) == 1 and made[0]._padded is None
