"""What a chat.petals.dev `generate` request means for a conversation: the new tokens and the options.

- `inputs`: raw text appended to the conversation (Petals). With `stop_sequence` the reply streams
  token by token until the text contains it (or an EOS token, `max_length`, or this server's cap);
  Petals' `max_new_tokens` is then its chunk size, and since every token is sent at once it does
  not bound the reply. Without `stop_sequence`, one answer of `max_new_tokens` (or up to
  `max_length`) tokens comes back.
- `user_message` (this site's chat page): one user turn in the model's chat format; the reply ends
  at the end of the assistant's turn, which is cut from the text, or after `max_new_tokens`.
- `regenerate` (this site's chat page): the last chat reply is forgotten and generated again for
  the same user message (the servers rewind their caches; nothing is resent).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from playground.admission import admission
from playground.errors import BadRequest
from playground.generation import Conversation, ReplyOptions
from playground.registry import registry
from playground.schemas import GenerateRequest


def plan_reply(conversation: Conversation, request: GenerateRequest) -> tuple[list[int], ReplyOptions]:
    """The tokens to append and the options of the reply; the reply's length is `playground.budget`'s."""
    chat = conversation.chat
    sampling = dataclasses.asdict(request.sampling)
    if request.user_message is not None or request.regenerate:
        chat_format = chat.chat_format
        stop = chat_format.stop_sequence
        if request.regenerate:
            conversation.rewind_to_last_turn()
            new_ids = []
        else:
            text = chat_format.user_turn(
                request.user_message,
                first=not conversation.ids,
                reply_ended=conversation.reply_ended_with(stop),
                system=conversation.system_prompt,
            )
            new_ids = conversation.encode(text)
        options = ReplyOptions(
            max_new_tokens=request.max_new_tokens or chat.spec.defaults.max_new_tokens,
            max_length=request.max_length,
            stop_sequences=(stop, *request.extra_stop_sequences),
            include_stop=False,
            **sampling,
        )
        conversation.budget(new_ids, options)  # refuse now, before the turn counts as the last one
        conversation.last_turn_end = len(conversation.ids) + len(new_ids)
        return new_ids, options
    conversation.last_turn_end = None  # raw text: nothing a chat could regenerate

    if request.inputs is not None:
        new_ids = conversation.encode(request.inputs)
    elif not conversation.ids:
        new_ids = conversation.encode("")
        if not new_ids:
            raise BadRequest("send some `inputs` to start the conversation")
    else:
        new_ids = []

    if request.stop_sequence is not None:
        continuation = None
        if request.extra_stop_sequences:
            ids = chat.tokenizer(request.stop_sequence, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise BadRequest("`extra_stop_sequences` need a `stop_sequence` that is exactly one token")
            continuation = ids[0]
        options = ReplyOptions(
            max_length=request.max_length,
            stop_sequences=(request.stop_sequence,),
            continue_on=request.extra_stop_sequences,
            continuation_token=continuation,
            **sampling,
        )
    else:
        if request.max_new_tokens is None and request.max_length is None:
            raise BadRequest("set `max_new_tokens` or `max_length` (or a `stop_sequence` to stream)")
        options = ReplyOptions(max_new_tokens=request.max_new_tokens, max_length=request.max_length, **sampling)
    conversation.budget(new_ids, options)  # a request that cannot be answered fails before anything runs
    return new_ids, options


@contextlib.asynccontextmanager
async def temporary_conversation(model: str, address: str) -> AsyncIterator[Conversation]:
    """A conversation for one HTTP request: counted against the session limits, closed at the end."""
    slot = admission.acquire(address)
    try:
        chat = await registry.aload(model)
        conversation = Conversation(chat, max_length=chat.spec.session_cap)
        try:
            yield conversation
        finally:
            await conversation.aclose()
    finally:
        slot.release()


def fit_session(conversation: Conversation, new_ids: list[int], options: ReplyOptions) -> None:
    """A one-shot session reserves only what it needs on the servers (not the model's whole cap)."""
    conversation.max_length = len(new_ids) + conversation.budget(new_ids, options)
