"""One conversation with a distributed model: its inference session, generation in a worker thread,
and every token handed to the event loop the moment it is produced.

`Conversation.reply()` is an async iterator of `ReplyChunk`s. Generation itself is transformers'
synchronous `generate()` running in a worker thread; a streamer turns each new token into text
(holding back partial UTF-8 and partial stop sequences) and posts it to the loop, and a stopping
criterion ends generation on a stop sequence, on cancellation or on the token budget.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from django.conf import settings
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from playground.budget import reply_budget
from playground.detokenize import IncrementalDecoder, StopMatcher
from playground.errors import BadRequest, StepTimeout, public_message
from playground.registry import ChatModel
from playground.workers import executor

logger = logging.getLogger(__name__)

# transformers' own defaults: greedy decoding ignores these, and values left unset (None) would be
# filled from the model's sampling defaults, which makes transformers warn on every call.
GREEDY_NEUTRAL = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclasses.dataclass(frozen=True)
class ReplyOptions:
    max_new_tokens: int | None = None  # None: the site's cap (playground.budget decides the real number)
    max_length: int | None = None  # Petals' limit on the whole conversation, prompt included
    do_sample: bool = False
    temperature: float | None = None  # None: the model's generation_config value
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop_sequences: tuple[str, ...] = ()
    include_stop: bool = True  # Petals keeps stop sequences and EOS text; OpenAI and chat turns cut them
    special_tokens_as_text: bool = True  # OpenAI answers skip special tokens altogether
    continuation_token: int | None = None  # replaces the last token when `continue_on` matched (Petals)
    continue_on: tuple[str, ...] = ()


@dataclasses.dataclass
class ReplyChunk:
    text: str
    token_count: int  # tokens behind this text (several when a character spans tokens)
    final: bool = False
    stop_reason: str | None = None  # stop_sequence, eos, length, cancelled
    reply_tokens: int = 0
    tokens_per_second: float | None = None
    route: list[dict[str, Any]] | None = None
    tokens_sent: int | None = None  # token positions this reply sent to the servers
    round_trips: int | None = None  # steps through the swarm after the prompt's (fewer than tokens with a draft)


# The share of a session a resumed chat leaves free for the next exchange (its oldest exchanges go first).
RESUME_ROOM = 0.25

# Public names are peer-supplied text: shown escaped by the page, and cut to a readable length here.
PUBLIC_NAME_MAX_CHARS = 64


class Conversation:
    """A conversation's token ids and the inference session whose server caches hold them."""

    def __init__(self, chat: ChatModel, max_length: int):
        self.chat = chat
        self.max_length = max_length
        self.ids: list[int] = []
        self.system_prompt = ""
        self.last_turn_end: int | None = None  # ids before the last chat reply: where `regenerate` rewinds to
        self._session: Any = None  # opened lazily, in a worker thread
        self._lock = threading.Lock()
        self._running = False
        self._closed = False
        self._cancel = threading.Event()
        self._job: asyncio.Future | None = None

    # ----- text -----

    def encode(self, text: str) -> list[int]:
        """Token ids for text appended to this conversation (BOS once, at the very start)."""
        return self._encode(text, at_start=not self.ids)

    def _encode(self, text: str, at_start: bool) -> list[int]:
        tokenizer = self.chat.tokenizer
        ids = tokenizer(text, add_special_tokens=False).input_ids
        bos = tokenizer.bos_token_id
        if at_start and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def resume(self, system_prompt: str, history: Sequence[tuple[str, str]]) -> int:
        """Start from a chat the browser kept (user and assistant texts); nothing is sent until the next reply.

        A chat too long for the session goes on with its latest exchanges: the oldest are left out
        until the rest leaves `RESUME_ROOM` of the session free for the next one (the system prompt
        stays, at the start of the first exchange kept). Returns how many exchanges were left out.
        """
        self.system_prompt = system_prompt
        limit = self.max_length - int(self.max_length * RESUME_ROOM)
        start, later = len(history), 0  # history[start:] is kept; `later`: tokens after its first exchange
        for index in reversed(range(len(history))):
            if len(self._exchange(*history[index], first=True)) + later > limit:
                break
            later += len(self._exchange(*history[index], first=False))
            start = index
        for index in range(start, len(history)):
            self.ids += self._exchange(*history[index], first=index == start)
        return start

    def _exchange(self, user: str, assistant: str, first: bool) -> list[int]:
        """One kept exchange's ids; the first one of a conversation carries the BOS and the system prompt."""
        chat_format = self.chat.chat_format
        text = chat_format.user_turn(user, first=first, reply_ended=True, system=self.system_prompt)
        return self._encode(text, at_start=first) + self._encode(chat_format.closed_reply(assistant), at_start=False)

    def rewind_to_last_turn(self) -> None:
        """Forget the last chat reply, keeping the user message it answered (for `regenerate`)."""
        end = self.last_turn_end
        if end is None or end > len(self.ids):
            raise BadRequest("there is no chat reply to regenerate in this session; send a `user_message` first")
        self.ids = self.ids[:end]

    def reply_ended_with(self, stop: str) -> bool:
        tail = self.chat.tokenizer.decode(self.ids[-8:], skip_special_tokens=False)
        return bool(stop) and tail.rstrip().endswith(stop)

    # ----- generation -----

    def stop(self) -> None:
        self._cancel.set()

    async def reply(self, new_ids: Sequence[int], options: ReplyOptions) -> AsyncIterator[ReplyChunk]:
        step_timeout = settings.PLAYGROUND_STEP_TIMEOUT
        await self.wait_idle()
        budget = self.budget(new_ids, options)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ReplyChunk | BaseException] = asyncio.Queue()
        cancel = self._cancel = threading.Event()
        with self._lock:
            if self._closed:
                raise BadRequest("this session is closed")
            self._running = True
        self._job = loop.run_in_executor(
            executor(), self._generate, list(new_ids), options, budget, cancel, _poster(loop, queue)
        )
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), step_timeout)
                except TimeoutError:
                    raise StepTimeout(
                        f"the swarm produced no token for {step_timeout:g} s, so generation was stopped; try again"
                    ) from None
                if isinstance(item, BaseException):
                    raise public_message(item, "generation")
                yield item
                if item.final:
                    return
        finally:
            cancel.set()  # the reader is gone (done, failed, closed): the worker must not go on

    def budget(self, new_ids: Sequence[int], options: ReplyOptions) -> int:
        """Tokens the reply to `new_ids` may have (raises when the conversation has no room left)."""
        held = len(self.ids) + len(new_ids)
        return reply_budget(
            options.max_new_tokens, held=held, session_length=self.max_length, max_length=options.max_length
        )

    async def wait_idle(self) -> None:
        """Until the previous reply's worker has returned (and stop it if it still generates)."""
        job = self._job
        if job is not None and not job.done():
            self._cancel.set()
            try:
                await asyncio.wait_for(asyncio.shield(job), settings.PLAYGROUND_STEP_TIMEOUT)
            except TimeoutError:
                raise BadRequest("the previous reply is still stopping; try again in a moment") from None

    def _generate(
        self,
        new_ids: list[int],
        options: ReplyOptions,
        budget: int,
        cancel: threading.Event,
        post: Callable[[Any], None],
    ) -> None:
        """Runs in a worker thread; everything it produces or raises goes through `post`."""
        prompt = self.ids + new_ids
        try:
            session = self._open_session()
            stream = _ReplyStream(self.chat, session, options, budget, cancel, post, context=prompt)
            output = self.chat.model.generate(
                torch.tensor([prompt]),
                session=session,
                generation_config=_generation_config(self.chat, options, budget),
                streamer=stream,
                stopping_criteria=StoppingCriteriaList([stream]),
                **({"assistant_model": self.chat.draft} if self.chat.draft is not None else {}),
            )
            # A step may bring several tokens (a draft's): the reply ends where the stream ended it.
            ids = output[0].tolist()[: len(prompt) + stream.count]
            if stream.continued and options.continuation_token is not None:
                ids[-1] = options.continuation_token
            self.ids = ids
            stream.finish()
        except BaseException as e:
            # The session's state on the servers is unknown now: the next reply starts a fresh one
            # and resends the conversation, which the engine does by itself.
            self.ids = prompt
            self._drop_session()
            post(e)
        finally:
            with self._lock:
                self._running = False
                closing = self._closed
            if closing:
                self._drop_session()

    def _open_session(self) -> Any:
        if self._session is None:
            self._session = self.chat.model.inference_session(max_length=self.max_length)
        return self._session

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:
                logger.warning("Closing an inference session failed", exc_info=True)

    async def aclose(self, wait: float = 30.0) -> None:
        """Stop generating and free the servers' caches (now, or when the running step returns)."""
        with self._lock:
            self._closed = True
            running = self._running
        self._cancel.set()
        if not running:
            await asyncio.get_running_loop().run_in_executor(executor(), self._drop_session)
        elif self._job is not None:
            # The worker closes the session itself when its step returns; waiting is a courtesy.
            try:
                await asyncio.wait_for(asyncio.shield(self._job), wait)
            except TimeoutError:
                pass


def _poster(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Any], None]:
    def post(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    return post


def _generation_config(chat: ChatModel, options: ReplyOptions, budget: int) -> Any:
    """The model's generation config with this request's values (None keeps the model's)."""
    config = copy.deepcopy(chat.model.generation_config)
    config.max_new_tokens = budget
    config.max_length = None
    config.do_sample = options.do_sample
    for key, neutral in GREEDY_NEUTRAL.items():
        if not options.do_sample:
            setattr(config, key, neutral)
        elif getattr(options, key) is not None:
            setattr(config, key, getattr(options, key))
    if options.repetition_penalty is not None:
        config.repetition_penalty = options.repetition_penalty
    return config


class _ReplyStream(BaseStreamer, StoppingCriteria):
    """The streamer and the stopping criterion of one reply (both called from the worker thread).

    transformers calls `put()` with each new token before it checks the stopping criteria, so
    the token that completes a stop sequence is known to be the last one when it is posted.
    """

    def __init__(
        self,
        chat: ChatModel,
        session: Any,
        options: ReplyOptions,
        budget: int,
        cancel: threading.Event,
        post: Callable[[Any], None],
        context: Sequence[int],
    ):
        self.chat, self.session, self.options, self.budget = chat, session, options, budget
        self.cancel, self.post = cancel, post
        self.decoder = IncrementalDecoder(
            chat.tokenizer, context=context, skip_special_tokens=not options.special_tokens_as_text
        )
        self.stops = StopMatcher(options.stop_sequences + options.continue_on, include=options.include_stop)
        self.eos = chat.eos_token_ids
        self.prompt_seen = False
        self.count = 0
        self.round_trips = 0
        self.held = 0  # tokens whose text is not posted yet
        self.done = False
        self.continued = False
        self.sent_before = session.tokens_sent
        self.started = time.perf_counter()
        self.first_at: float | None = None

    # BaseStreamer
    def put(self, value: torch.Tensor) -> None:
        """Called once per step with its new tokens (several when a draft's tokens were accepted)."""
        if not self.prompt_seen:  # generate() first streams the prompt
            self.prompt_seen = True
            return
        self.round_trips += 1
        for token in value.flatten().tolist():
            if self.done:
                return
            self._token(int(token))

    def _token(self, token: int) -> None:
        self.count += 1
        self.held += 1
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        is_eos = token in self.eos
        # Petals shows an EOS token's text ("</s>"); chat turns and OpenAI answers end without it.
        text = "" if is_eos and not self.options.include_stop else self.decoder.push(token)
        text = self.stops.push(text)
        reason = None
        if self.stops.matched is not None:
            reason = "stop_sequence"
            self.continued = self.stops.matched in self.options.continue_on
        elif is_eos:
            reason = "eos"
        elif self.count >= self.budget:
            reason = "length"
        elif self.cancel.is_set():
            reason = "cancelled"
        if reason is not None:
            self._post_final(text + ("" if reason == "stop_sequence" else self._flush()), reason)
        elif text:
            self.post(ReplyChunk(text=text, token_count=self.held))
            self.held = 0

    def end(self) -> None:
        pass

    # StoppingCriteria
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop = self.done or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        """After generate() returned: the final chunk, unless a token already carried it."""
        if not self.done:
            self._post_final(self._flush(), "cancelled" if self.cancel.is_set() else "length")

    def _flush(self) -> str:
        return self.stops.push(self.decoder.flush()) + self.stops.flush()

    def _post_final(self, text: str, reason: str) -> None:
        self.done = True
        elapsed_decoding = time.perf_counter() - (self.first_at or self.started)
        if self.count > 1 and elapsed_decoding > 0:
            speed = (self.count - 1) / elapsed_decoding  # decoding speed: the first token also waited for the prompt
        else:
            speed = self.count / max(time.perf_counter() - self.started, 1e-9)
        self.post(
            ReplyChunk(
                text=text,
                token_count=self.held,
                final=True,
                stop_reason=reason,
                reply_tokens=self.count,
                tokens_per_second=round(speed, 2),
                route=_route(self.chat, self.session.route),
                tokens_sent=self.session.tokens_sent - self.sent_before,
                round_trips=self.round_trips,
            )
        )
        self.held = 0


def _route(chat: ChatModel, route: Sequence[Any]) -> list[dict[str, Any]]:
    """The servers a reply went through, each with its public name when it announces one."""
    view = getattr(chat.model.manager, "view", None)
    spans = view.spans if view is not None else {}
    hops = []
    for span in route:
        info = spans.get(span.peer_id)
        name = info.server_info.public_name if info is not None else None
        hops.append(
            {
                "peer_id": span.peer_id,
                "public_name": name[:PUBLIC_NAME_MAX_CHARS] if name else None,
                "start": span.start,
                "end": span.end,
            }
        )
    return hops
