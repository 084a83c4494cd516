"""`POST /v1/chat/completions` and `GET /v1/models`, compatible with OpenAI's API and client libraries.

Each request is a one-shot conversation: the messages are rendered with the model's chat
template (or separators), the answer ends at the end of the assistant's turn, a `stop`
sequence or `max_tokens`, and `stream: true` sends it as server-sent events, token by token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET, require_POST

from playground import schemas
from playground.catalog import configured_models, model_spec
from playground.csrf import csrf_protect_browsers
from playground.errors import BadRequest, LimitExceeded, PlaygroundError, public_message
from playground.generation import Conversation, ReplyChunk, ReplyOptions
from playground.registry import ChatModel
from playground.replies import fit_session, temporary_conversation

FINISH_REASONS = {"stop_sequence": "stop", "eos": "stop", "cancelled": "stop", "length": "length"}


def error_response(error: PlaygroundError) -> JsonResponse:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    body = {"error": {"message": str(error), "type": kind, "param": None, "code": error.code}}
    return JsonResponse(body, status=error.status)


@require_GET
def list_models(request: HttpRequest) -> JsonResponse:
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "swarm"} for name in configured_models()]
    return JsonResponse({"object": "list", "data": data})


@require_POST
@csrf_protect_browsers(respond=error_response)
async def chat_completions(request: HttpRequest) -> HttpResponse:
    try:
        if request.content_type != "application/json":
            raise BadRequest("send the request as JSON (Content-Type: application/json)")
        try:
            body = json.loads(request.body or b"null")
        except (ValueError, RecursionError):
            raise BadRequest("the request body is not valid JSON") from None
        completion = schemas.parse_chat_completion(body)
        model_spec(completion.model)  # unknown models fail before any work
    except Exception as e:
        return error_response(public_message(e, "chat completion"))
    address = request.META.get("REMOTE_ADDR") or "unknown"
    if completion.stream:
        events = _stream(completion, address)
        response = StreamingHttpResponse(events, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # proxies must pass each event on at once
        return response
    try:
        return JsonResponse(await _complete(completion, address))
    except Exception as e:
        return error_response(public_message(e, "chat completion"))


def _prompt_ids(conversation: Conversation, completion: schemas.ChatCompletionRequest) -> list[int]:
    chat: ChatModel = conversation.chat
    messages = list(completion.messages)
    if chat.spec.separators or not (chat.spec.chat_template or getattr(chat.tokenizer, "chat_template", None)):
        text = chat.chat_format.render(messages)
    else:
        text = chat.tokenizer.apply_chat_template(
            messages, chat_template=chat.spec.chat_template, tokenize=False, add_generation_prompt=True
        )
    return conversation.encode(text)


def _options(conversation: Conversation, completion: schemas.ChatCompletionRequest) -> ReplyOptions:
    defaults = conversation.chat.spec.defaults
    temperature = completion.temperature
    if temperature is None:
        temperature = defaults.temperature if defaults.do_sample else 0.0
    sampling = temperature > 0  # OpenAI's temperature 0 means greedy
    return ReplyOptions(
        max_new_tokens=completion.max_tokens or defaults.max_new_tokens,
        do_sample=sampling,
        temperature=temperature or None,
        top_p=completion.top_p if completion.top_p is not None else defaults.top_p,
        top_k=defaults.top_k or None,
        repetition_penalty=defaults.repetition_penalty,
        stop_sequences=(conversation.chat.chat_format.stop_sequence, *completion.stop),
        include_stop=False,
        special_tokens_as_text=False,
    )


async def _generate(
    completion: schemas.ChatCompletionRequest, address: str
) -> AsyncIterator[tuple[ReplyChunk | None, int]]:
    """(chunk, prompt token count) pairs; the first pair has no chunk (the answer has begun)."""
    async with temporary_conversation(completion.model, address) as conversation:
        new_ids = _prompt_ids(conversation, completion)
        if len(new_ids) >= conversation.max_length:
            raise LimitExceeded(f"the messages take {len(new_ids)} tokens; this model allows {conversation.max_length}")
        options = _options(conversation, completion)
        fit_session(conversation, new_ids, options)
        yield None, len(new_ids)
        async for chunk in conversation.reply(new_ids, options):
            yield chunk, len(new_ids)


async def _complete(completion: schemas.ChatCompletionRequest, address: str) -> dict[str, Any]:
    parts, prompt_tokens, final = [], 0, None
    async for chunk, tokens in _generate(completion, address):
        prompt_tokens = tokens
        if chunk is not None:
            parts.append(chunk.text)
            final = chunk
    completion_tokens = final.reply_tokens if final else 0
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": completion.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "finish_reason": FINISH_REASONS.get(final.stop_reason if final else "", "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def _stream(completion: schemas.ChatCompletionRequest, address: str) -> AsyncIterator[str]:
    """Server-sent events: chat.completion.chunk objects, then `[DONE]`; errors as an `error` event."""
    header = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": completion.model,
    }

    def event(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        body = {**header, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        async for chunk, prompt_tokens in _generate(completion, address):
            if chunk is None:
                yield event({"role": "assistant", "content": ""})
                continue
            if chunk.text:
                yield event({"content": chunk.text})
            if chunk.final:
                yield event({}, FINISH_REASONS.get(chunk.stop_reason or "", "stop"))
                if completion.include_usage:
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": chunk.reply_tokens,
                        "total_tokens": prompt_tokens + chunk.reply_tokens,
                    }
                    yield f"data: {json.dumps({**header, 'choices': [], 'usage': usage})}\n\n"
    except Exception as e:
        error = public_message(e, "chat completion stream")
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error', 'code': error.code}})}\n\n"
    yield "data: [DONE]\n\n"
