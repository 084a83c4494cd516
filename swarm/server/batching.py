"""Continuous batching of inference steps: sessions that step at the same time share one forward.

Steps are queued as they arrive. One task on the event loop takes everything queued (oldest
first, so no session starves), stacks the steps that can go together (same blocks, adapter and
new tokens per row, no deep prompts to apply) into one backend call, and answers each step with
its own rows. While a batch computes, the next steps queue up: under load batches grow by
themselves; a lone session's step runs as it did alone.

Where a batch computes is decided by its measured cost, not by its size: while at most one
session is stepping (has stepped in the last `ACTIVE_SECONDS`), a batch whose kind has been
measured to take less than `inline_seconds` runs on the event loop itself (a thread hand-off would
cost more than it saves); anything slower, or not measured yet, runs on the compute thread, so that
pings and `rpc_info` never wait behind it. With several sessions stepping everything runs on the
compute thread: the event loop then reads the other sessions' next steps while a batch computes,
and they form the next batch. Sessions that are open but idle do not count: a peer holding many
quiet sessions must not push every other session's steps through the thread hand-off.

Before a batch starts, the batcher may wait a moment for sessions whose next step is due: each
session's turnaround (its outputs handed back -> its next step here) is measured, and a session
whose step is due within a share (`GATHER_SHARE`) of the batch's measured cost is waited for, so
that it joins this batch instead of running alone as the next one. On this CPU a batch costs
mostly its fixed overhead (16 rows cost about twice one row), so without this, sessions on a fast
link split into two alternating half batches. A lone session, and sessions whose links are
slower than the batch, are never waited for.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Any

import torch

from swarm.server.backend import QueuedStep, SpanBackend

logger = logging.getLogger(__name__)

DEFAULT_INLINE_SECONDS = 0.01  # the event loop may stall this long for one batch (pings wait seconds), no more
DEFAULT_MAX_BATCH_ROWS = 64
# A stacked forward carries at most as many tokens as one request may (64 replaying sessions' 1024-token
# chunks would otherwise make one 65k-token forward), and its temporary tensors (each session's cache
# padded to the longest, masks, attention scores: `SpanBackend.stacked_step_bytes`) stay within a budget.
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_MAX_BATCH_BYTES = 2**30
MAX_COST_KINDS = 256  # measured kinds kept (kinds follow new tokens per row, which clients choose)
ACTIVE_SECONDS = 1.0  # a session that stepped this recently counts as stepping now
# A batch waits for due steps at most this share of its own measured cost: at worst (no one comes)
# its sessions wait that much longer; a step that does come saves a whole batch's overhead.
GATHER_SHARE = 0.5
TURNAROUND_SMOOTHING = 0.3


@dataclasses.dataclass
class _SessionTiming:
    stepped_at: float  # when its latest step arrived
    answered_at: float | None = None  # when that step's outputs were handed back; None while it waits
    turnaround: float | None = None  # smoothed seconds from outputs handed back to the next step arriving

    def due_between(self, now: float, deadline: float) -> bool:
        """Whether its next step should arrive by `deadline` and is not long overdue (a session that
        stopped stepping without closing is no longer waited for once a second turnaround has passed)."""
        if self.answered_at is None or self.turnaround is None:
            return False  # it has a step queued, or has not been answered twice yet
        due = self.answered_at + self.turnaround
        return now - self.turnaround <= due <= deadline


def moving_average(previous: float | None, sample: float, smoothing: float) -> float:
    """An exponential moving average; the first sample stands alone."""
    return sample if previous is None else previous + smoothing * (sample - previous)


class CostModel:
    """Seconds per batch, by kind (blocks, new tokens per row) and power-of-two bucket of rows: a moving average.

    Only the MAX_COST_KINDS most recently measured keys are kept: clients choose the kinds.
    """

    def __init__(self, smoothing: float = 0.2, max_keys: int = MAX_COST_KINDS):
        self.smoothing = smoothing
        self.max_keys = max_keys
        self._seconds: collections.OrderedDict[Hashable, float] = collections.OrderedDict()

    @staticmethod
    def key(kind: Hashable, rows: int) -> Hashable:
        return kind, 1 << math.ceil(math.log2(max(rows, 1)))

    def estimate(self, kind: Hashable, rows: int) -> float | None:
        return self._seconds.get(self.key(kind, rows))

    def record(self, kind: Hashable, rows: int, seconds: float) -> None:
        key = self.key(kind, rows)
        previous = self._seconds.pop(key, None)
        self._seconds[key] = moving_average(previous, seconds, self.smoothing)
        while len(self._seconds) > self.max_keys:
            self._seconds.popitem(last=False)


@dataclasses.dataclass
class _Pending:
    step: QueuedStep
    adapter: str | None
    future: asyncio.Future

    @property
    def rows(self) -> int:
        return self.step.hidden.shape[0]

    @property
    def tokens(self) -> int:
        return self.step.hidden.shape[0] * self.step.hidden.shape[1]

    @property
    def kv_length(self) -> int:
        """Keys and values its rows attend to in this step."""
        return self.step.cache.position + self.step.hidden.shape[1]

    @property
    def cost_kind(self) -> Hashable:
        """What its cost is measured as: its stacking kind; None (not measured) if it computes alone."""
        key = self.stack_key()
        return None if key is None else ("step", key)

    def stack_key(self) -> Hashable | None:
        """Steps with equal keys may share a forward; None: this one computes alone."""
        cache = self.step.cache
        if self.step.prompts is not None and cache.position == 0:
            return None  # its deep prompts apply to this step's leading tokens
        return cache.first_block, cache.num_blocks, self.adapter, self.step.hidden.shape[1], self.step.hidden.dtype


class BatcherClosed(RuntimeError):
    """The server stopped computing steps (it is shutting down)."""


class StepBatcher:
    """Queues the inference steps of all sessions of one server and computes them in stacked batches."""

    def __init__(
        self,
        backend: SpanBackend,
        executor: Executor,
        *,
        inline_seconds: float = DEFAULT_INLINE_SECONDS,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ):
        self.backend = backend
        self.executor = executor
        self.inline_seconds = inline_seconds
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_bytes = max_batch_bytes
        self.costs = CostModel()
        self._sessions: dict[int, _SessionTiming] = {}  # by id of a session's cache, latest step last
        self.batches = 0  # forwards computed
        self.stacked_steps = 0  # steps computed in a forward shared with other sessions
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._computing: list[_Pending] = []  # the batch being computed
        self._closed = False

    async def step(
        self,
        hidden: torch.Tensor,
        cache: Any,
        prompts: torch.Tensor | None = None,
        hypo_ids: torch.Tensor | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """One session's step; returns its outputs once its batch has computed."""
        if self._closed:
            raise BatcherClosed("this server is shutting down; choose another server")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="step-batcher")
        future = loop.create_future()
        self._note_step(cache)
        self._queue.append(_Pending(QueuedStep(hidden, cache, prompts, hypo_ids), adapter, future))
        self._wakeup.set()
        return await future

    @property
    def stepping_sessions(self) -> int:
        """Sessions that stepped in the last ACTIVE_SECONDS."""
        horizon = time.monotonic() - ACTIVE_SECONDS
        while self._sessions:
            oldest, timing = next(iter(self._sessions.items()))
            if timing.stepped_at >= horizon:
                break
            del self._sessions[oldest]
        return len(self._sessions)

    def session_closed(self, cache: Any) -> None:
        """A closed session steps no more (a chat's next turn opens a new one at once)."""
        self._sessions.pop(id(cache), None)

    def _note_step(self, cache: Any) -> None:
        now = time.monotonic()
        timing = self._sessions.pop(id(cache), None)  # re-inserted last: the dict stays ordered by time
        if timing is None:
            timing = _SessionTiming(now)
        elif timing.answered_at is not None:
            timing.turnaround = moving_average(timing.turnaround, now - timing.answered_at, TURNAROUND_SMOOTHING)
        timing.stepped_at, timing.answered_at = now, None
        self._sessions[id(cache)] = timing

    def _note_answered(self, cache: Any) -> None:
        timing = self._sessions.get(id(cache))
        if timing is not None:
            timing.answered_at = time.monotonic()

    async def run(self, fn: Callable[..., Any], *args: Any, kind: Hashable = None, rows: int = 1) -> Any:
        """Other torch work (forward, backward, cache allocation), placed by the same measured cost."""
        return await self._place(kind, rows, fn, *args)

    async def close(self) -> None:
        """Stop: every step queued or computing gets BatcherClosed (none is left waiting for ever)."""
        self._closed = True
        unsettled = self._computing  # (the worker forgets its batch once cancelled)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        closed = BatcherClosed("this server is shutting down; choose another server")
        for pending in [*unsettled, *self._queue]:
            _settle(pending.future, error=closed)
        self._queue.clear()

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(0)  # streams whose steps arrived in the same wake-up queue theirs first
            while self._queue:
                await self._gather()
                batch = self._take_batch()
                if batch:
                    await self._compute(batch)

    async def _gather(self) -> None:
        """Wait a moment for steps due any moment, so that they join the next batch (see the module doc)."""
        if self.stepping_sessions <= 1:
            return  # the one stepping (if any) is the one queued
        estimate = self.costs.estimate(self._queue[0].cost_kind, self._queued_rows())
        if estimate is None:
            return
        now = time.monotonic()
        deadline = now + GATHER_SHARE * estimate
        # Sessions only leave this list while we wait (a session becomes due when answered, and nothing is).
        due = [timing for timing in self._sessions.values() if timing.due_between(now, deadline)]
        while due and self._queued_rows() < self.max_batch_rows:
            self._wakeup.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._wakeup.wait()  # a step arrived
            except TimeoutError:
                return
            due = [timing for timing in due if timing.answered_at is not None]  # those still to come

    def _queued_rows(self) -> int:
        return sum(pending.rows for pending in self._queue)

    def _take_batch(self) -> list[_Pending]:
        """The oldest live step and every queued step that can stack with it, within the limits."""
        while self._queue and self._queue[0].future.done():  # its session gave up (cancelled)
            self._queue.popleft()
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch = [first]
        key = first.stack_key()
        if key is None:
            return batch
        rows, tokens, kv_length, kept = first.rows, first.tokens, first.kv_length, collections.deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if pending.stack_key() == key and self._fits(
                rows + pending.rows, tokens + pending.tokens, kv_length, pending
            ):
                batch.append(pending)
                rows, tokens, kv_length = (
                    rows + pending.rows,
                    tokens + pending.tokens,
                    max(kv_length, pending.kv_length),
                )
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    def _fits(self, rows: int, tokens: int, kv_length: int, pending: _Pending) -> bool:
        if rows > self.max_batch_rows or tokens > self.max_batch_tokens:
            return False
        length = pending.step.hidden.shape[1]
        temporary = self.backend.stacked_step_bytes(rows, length, max(kv_length, pending.kv_length))
        return temporary <= self.max_batch_bytes

    async def _compute(self, batch: list[_Pending]) -> None:
        self._computing = batch  # for close(): the worker may be cancelled while the batch computes
        try:
            await self._compute_batch(batch)
        finally:
            self._computing = []

    async def _compute_batch(self, batch: list[_Pending]) -> None:
        steps = [pending.step for pending in batch]
        adapter = batch[0].adapter
        rows = sum(pending.rows for pending in batch)
        try:
            outputs = await self._place(batch[0].cost_kind, rows, self.backend.inference_steps, steps, adapter)
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0].future, error=error)
                return
            # Unexpected: no step's cache has moved on, so each is computed alone to find the culprit.
            logger.warning("A batch of %d steps failed (%s); computing them one by one", len(batch), error)
            for pending in batch:
                try:
                    (output,) = await self._place(None, 1, self.backend.inference_steps, [pending.step], adapter)
                except Exception as single_error:
                    _settle(pending.future, error=single_error)
                else:
                    _settle(pending.future, output)
            return
        self.batches += 1
        if len(batch) > 1:
            self.stacked_steps += len(batch)
        for pending, output in zip(batch, outputs):
            self._note_answered(pending.step.cache)
            _settle(pending.future, output)

    async def _place(self, kind: Hashable, rows: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` inline if measured cheap, else on the compute thread; measure it either way."""
        estimate = self.costs.estimate(kind, rows) if kind is not None else None
        timed = _Timed(fn)
        if estimate is not None and estimate < self.inline_seconds and self.stepping_sessions <= 1:
            result = timed(*args)
        else:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, timed, *args)
        if kind is not None:
            self.costs.record(kind, rows, timed.seconds)
        return result


class _Timed:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        began = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds = time.perf_counter() - began


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
