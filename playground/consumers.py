"""`/api/v2/generate`: the chat.petals.dev websocket protocol (PROTOCOL.md) over the embedded client.

One socket, one conversation: `open_inference_session` opens an inference session whose server
caches live until the socket closes (or the next `open_inference_session`), and each `generate`
sends only the new tokens. Extensions: `{"type": "stop"}` ends the reply being generated,
`user_message` sends one chat turn, `regenerate` answers the last one again,
`open_inference_session` may carry the `system_prompt` and the `history` of a chat the browser
kept (too long for the session, its oldest exchanges are left out and the answer says how many
messages: `dropped_messages`), and the last message of a reply also carries `stop_reason`,
`tokens_per_second`, `route` (peer ids, public names and block spans), `tokens_sent` and `round_trips`. A socket
idle for PLAYGROUND_IDLE_TIMEOUT is closed with code 4000, which is no error.

Replies run in their own task, so that `stop` is read while tokens stream; every error is
answered with `{"ok": false, "traceback": "<message>"}` and the socket stays usable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from playground import schemas
from playground.admission import SessionSlot, admission
from playground.errors import BadRequest, LimitExceeded, PlaygroundError, public_message
from playground.generation import Conversation, ReplyChunk
from playground.registry import registry
from playground.replies import plan_reply

logger = logging.getLogger(__name__)

# JSON escapes may take 6 characters per input character; anything larger is not a valid request.
MESSAGE_OVERHEAD_CHARS = 64 * 1024
EXPECTED_TYPES = "open_inference_session, generate or stop"
IDLE_CLOSE_CODE = 4000  # the socket sat idle for PLAYGROUND_IDLE_TIMEOUT: closed, the session's caches freed


class GenerateConsumer(AsyncWebsocketConsumer):
    # A chat socket takes nothing from the channel layer: none is joined, so each connection does not
    # keep a Redis receive open (in the full mode), and a Redis hiccup cannot close a chat (code 1011).
    channel_layer_alias = None

    async def connect(self) -> None:
        self.conversation: Conversation | None = None
        self.slot: SessionSlot | None = None
        self.reply_task: asyncio.Task | None = None
        self.gone = False
        self.last_activity = time.monotonic()
        client = self.scope.get("client") or ("unknown", 0)
        self.address = str(client[0])
        await self.accept()
        self.watchdog = asyncio.create_task(self._close_when_idle())

    async def disconnect(self, code: int) -> None:
        self.gone = True
        self.watchdog.cancel()
        try:
            await self._end_conversation(wait=30.0)
        finally:  # even when the server cancels us: a stuck session still closes when its step returns
            if self.slot is not None:
                self.slot.release()
                self.slot = None

    # ----- incoming messages -----

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.last_activity = time.monotonic()
        try:
            message = self._parse(text_data)
            kind = schemas.message_type(message)
            if kind == "open_inference_session":
                await self._open(message)
            elif kind == "generate":
                self._generate(message)
            elif kind == "stop":
                if self.conversation is not None and self._replying:
                    self.conversation.stop()
            else:
                raise BadRequest(
                    f"unknown message type {kind[:50]!r}; expected open_inference_session, generate or stop"
                )
        except Exception as e:
            await self._send_error(public_message(e, "websocket message"))

    def _parse(self, text_data: str | None) -> Any:
        if text_data is None:
            raise BadRequest("binary frames are not supported; send JSON text")
        if len(text_data) > 6 * settings.PLAYGROUND_MAX_INPUT_CHARS + MESSAGE_OVERHEAD_CHARS:
            raise LimitExceeded(f"this message has {len(text_data)} characters, far above the input limit")
        try:
            return json.loads(text_data)
        except (ValueError, RecursionError):
            raise BadRequest('messages must be JSON objects, e.g. {"type": "generate", "inputs": "..."}') from None

    async def _open(self, message: dict[str, Any]) -> None:
        request = schemas.parse_open(message)
        await self._end_conversation(wait=5.0)
        if self.slot is None:
            self.slot = admission.acquire(self.address)
        try:
            chat = await registry.aload(request.model)
            conversation = Conversation(chat, request.max_length)
            dropped = conversation.resume(request.system_prompt, request.history)
        except Exception:
            self.slot.release()
            self.slot = None
            raise
        self.conversation = conversation
        logger.info(
            "Session opened: model %s, max_length %d, client %s", request.model, request.max_length, self.address
        )
        # A chat longer than the session goes on without its oldest exchanges; the page says so.
        await self._send({"ok": True, "dropped_messages": 2 * dropped} if dropped else {"ok": True})

    def _generate(self, message: dict[str, Any]) -> None:
        request = schemas.parse_generate(message)  # bad parameters are named first, whatever the state
        if self.conversation is None:
            raise BadRequest('open a session first: {"type": "open_inference_session", "model", "max_length"}')
        if self._replying:
            raise BadRequest('a reply is still being generated; wait for it or send {"type": "stop"}')
        self.reply_task = asyncio.create_task(self._reply(self.conversation, request))

    @property
    def _replying(self) -> bool:
        return self.reply_task is not None and not self.reply_task.done()

    # ----- replies -----

    async def _reply(self, conversation: Conversation, request: schemas.GenerateRequest) -> None:
        text, tokens = [], 0
        try:
            await conversation.wait_idle()  # the previous reply's worker may still be wrapping up
            new_ids, options = plan_reply(conversation, request)
            async for chunk in conversation.reply(new_ids, options):
                if request.streaming:
                    await self._send(_reply_message(chunk, chunk.text, chunk.token_count))
                else:
                    text.append(chunk.text)
                    tokens += chunk.token_count
                    if chunk.final:
                        await self._send(_reply_message(chunk, "".join(text), tokens))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._send_error(public_message(e, "generation"))
        finally:
            self.last_activity = time.monotonic()

    async def _end_conversation(self, wait: float) -> None:
        task, self.reply_task = self.reply_task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conversation, self.conversation = self.conversation, None
        if conversation is not None:
            await conversation.aclose(wait=wait)
            logger.info("Session closed: client %s", self.address)

    async def _close_when_idle(self) -> None:
        timeout = settings.PLAYGROUND_IDLE_TIMEOUT
        while True:
            await asyncio.sleep(min(max(timeout / 4, 0.05), 5.0))
            if not self._replying and time.monotonic() - self.last_activity >= timeout:
                # Not an error: the page reconnects (and resends its chat) with the next message.
                await self.close(code=IDLE_CLOSE_CODE, reason=f"idle for {timeout:g} s")
                return

    # ----- outgoing messages -----

    async def _send(self, payload: dict[str, Any]) -> None:
        if not self.gone:
            await self.send(text_data=json.dumps(payload, ensure_ascii=False))

    async def _send_error(self, error: PlaygroundError) -> None:
        await self._send({"ok": False, "traceback": str(error)})


def _reply_message(chunk: ReplyChunk, text: str, token_count: int) -> dict[str, Any]:
    message: dict[str, Any] = {"ok": True, "outputs": text, "stop": chunk.final, "token_count": token_count}
    if chunk.final:
        message.update(
            stop_reason=chunk.stop_reason,
            reply_tokens=chunk.reply_tokens,
            tokens_per_second=chunk.tokens_per_second,
            route=chunk.route,
            tokens_sent=chunk.tokens_sent,
            round_trips=chunk.round_trips,
        )
    return message
