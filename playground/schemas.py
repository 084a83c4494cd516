"""Validation of everything clients send: websocket messages, HTTP parameters, OpenAI requests.

Every request arrives from a stranger: each field is checked for type and range against the
site's limits, and the first problem is reported in a sentence naming the field. Unknown
fields are ignored, as chat.petals.dev and OpenAI clients send extras.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from django.conf import settings

from playground.catalog import model_spec
from playground.errors import BadRequest, LimitExceeded

MAX_MESSAGES = 512
# What the sampling fields accept, here and in the chat page's form (which gets them from the view):
# (lowest, highest, whether the lowest itself is excluded). Beyond these, text turns to noise.
SAMPLING_LIMITS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, True),
    "top_k": (0, 1000, False),
    "repetition_penalty": (0.0, 2.0, True),
}
HISTORY_ROLES = ("user", "assistant")
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class OpenRequest:
    model: str
    max_length: int
    system_prompt: str = ""
    history: tuple[tuple[str, str], ...] = ()  # (user, assistant) exchanges a browser kept


@dataclasses.dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    inputs: str | None
    user_message: str | None  # this site's chat page: one user turn, formatted by the server
    max_new_tokens: int | None
    max_length: int | None
    sampling: Sampling
    stop_sequence: str | None
    extra_stop_sequences: tuple[str, ...]
    regenerate: bool = False  # this site's chat page: answer the last user message again

    @property
    def streaming(self) -> bool:
        return self.stop_sequence is not None or self.user_message is not None


@dataclasses.dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# ----- field readers -----


def _integer(data: Mapping[str, Any], key: str, low: int, high: int, *, cap_name: str | None = None) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"`{key}` must be an integer")
    if value > high and cap_name:
        raise LimitExceeded(f"`{key}` is {value}, above this server's limit of {high} ({cap_name})")
    if not low <= value <= high:
        raise BadRequest(f"`{key}` must be an integer between {low} and {high}")
    return value


def _number(data: Mapping[str, Any], key: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"`{key}` must be a number")
    if value > high or value < low or (low_open and value == low):
        bound = f"above {low:g}" if low_open else f"at least {low:g}"
        raise BadRequest(f"`{key}` must be {bound} and at most {high:g} (got {value:g})")
    return float(value)


def _flag(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise BadRequest(f"`{key}` must be true/false or 0/1")


def _text(data: Mapping[str, Any], key: str, limit: int, *, allow_empty: bool = True) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"`{key}` must be a string")
    if len(value) > limit:
        raise LimitExceeded(f"`{key}` has {len(value)} characters; the limit is {limit}")
    if not value and not allow_empty:
        raise BadRequest(f"`{key}` must not be empty")
    return value


def _stop_list(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadRequest(f"`{key}` must be a list of strings")
    if len(value) > settings.PLAYGROUND_MAX_STOP_SEQUENCES:
        raise LimitExceeded(f"`{key}` has {len(value)} entries; the limit is {settings.PLAYGROUND_MAX_STOP_SEQUENCES}")
    limit = settings.PLAYGROUND_MAX_STOP_SEQUENCE_CHARS
    return tuple(_text({key: item}, key, limit, allow_empty=False) for item in value)


def _limited(data: Mapping[str, Any], key: str) -> float | None:
    low, high, low_open = SAMPLING_LIMITS[key]
    return _number(data, key, low, high, low_open=low_open)


def _sampling(data: Mapping[str, Any], default_do_sample: bool = False) -> Sampling:
    low, high, _ = SAMPLING_LIMITS["top_k"]
    return Sampling(
        do_sample=_flag(data, "do_sample", default_do_sample),
        temperature=_limited(data, "temperature"),
        top_k=_integer(data, "top_k", int(low), int(high)),
        top_p=_limited(data, "top_p"),
        repetition_penalty=_limited(data, "repetition_penalty"),
    )


# ----- websocket messages (chat.petals.dev /api/v2/generate) -----


def message_type(message: Any) -> str:
    if not isinstance(message, dict):
        raise BadRequest("each message must be a JSON object with a `type`")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise BadRequest("`type` must be a string: open_inference_session, generate or stop")
    return kind


def parse_open(message: Mapping[str, Any]) -> OpenRequest:
    model = message.get("model")
    if not isinstance(model, str):
        raise BadRequest("`model` must be a string naming one of this site's models")
    spec = model_spec(model)
    max_length = _integer(message, "max_length", 1, spec.session_cap, cap_name="max_length")
    if max_length is None:
        raise BadRequest("`max_length` is required: the most tokens this session will hold")
    system_prompt = _text(message, "system_prompt", settings.PLAYGROUND_MAX_INPUT_CHARS) or ""
    history = _history(message.get("history"), budget=max_history_chars() - len(system_prompt))
    return OpenRequest(model=model, max_length=max_length, system_prompt=system_prompt, history=history)


def max_history_chars() -> int:
    """Characters a resumed chat's `history` and system prompt may have together (the page keeps to it)."""
    return settings.PLAYGROUND_MAX_INPUT_CHARS * 4


def _history(value: Any, budget: int) -> tuple[tuple[str, str], ...]:
    """A chat the browser kept: user and assistant messages, alternating, starting with the user's."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("`history` must be a list of {role, content} messages")
    if len(value) > MAX_MESSAGES:
        raise LimitExceeded(f"`history` has {len(value)} messages; the limit is {MAX_MESSAGES}")
    if len(value) % 2:
        raise BadRequest("`history` must hold whole exchanges: a user message, then the assistant's reply")
    texts, total = [], 0
    for index, message in enumerate(value):
        role = HISTORY_ROLES[index % 2]
        if not isinstance(message, dict) or message.get("role") != role:
            raise BadRequest(f"`history[{index}]` must be an object with role {role!r} (user and assistant alternate)")
        content = message.get("content")
        if not isinstance(content, str):
            raise BadRequest(f"`history[{index}].content` must be a string")
        total += len(content)
        texts.append(content)
    if total > budget:
        raise LimitExceeded(f"`history` has {total} characters; the limit is {max(budget, 0)}")
    return tuple(zip(texts[::2], texts[1::2], strict=True))


def parse_generate(message: Mapping[str, Any]) -> GenerateRequest:
    limit = settings.PLAYGROUND_MAX_INPUT_CHARS
    inputs = _text(message, "inputs", limit)
    user_message = _text(message, "user_message", limit)
    if inputs is not None and user_message is not None:
        raise BadRequest("send either `inputs` (raw text) or `user_message` (a chat turn), not both")
    stop_limit = settings.PLAYGROUND_MAX_STOP_SEQUENCE_CHARS
    stop_sequence = _text(message, "stop_sequence", stop_limit, allow_empty=False)
    extra = _stop_list(message, "extra_stop_sequences")
    if extra and stop_sequence is None:
        raise BadRequest("`extra_stop_sequences` need a `stop_sequence` too")
    regenerate = _flag(message, "regenerate", False)
    if regenerate and (inputs is not None or user_message is not None):
        raise BadRequest("`regenerate` answers the last user message again: send no `inputs` or `user_message`")
    return GenerateRequest(
        inputs=inputs,
        user_message=user_message,
        max_new_tokens=_integer(
            message, "max_new_tokens", 1, settings.PLAYGROUND_MAX_NEW_TOKENS, cap_name="max_new_tokens"
        ),
        max_length=_integer(message, "max_length", 1, settings.PLAYGROUND_MAX_LENGTH, cap_name="max_length"),
        sampling=_sampling(message),
        stop_sequence=stop_sequence,
        extra_stop_sequences=extra,
        regenerate=regenerate,
    )


# ----- HTTP: POST /api/v1/generate (form or JSON, like chat.petals.dev) -----

_FORM_TYPES = {
    "max_new_tokens": int,
    "max_length": int,
    "top_k": int,
    "do_sample": int,
    "temperature": float,
    "top_p": float,
    "repetition_penalty": float,
}


def coerce_form(values: Mapping[str, str]) -> dict[str, Any]:
    """Form fields are strings: convert the numeric ones (`do_sample=1`, `temperature=0.7`)."""
    data: dict[str, Any] = {}
    for key, value in values.items():
        kind = _FORM_TYPES.get(key)
        if kind is None:
            data[key] = value
            continue
        if key == "do_sample" and value.lower() in ("true", "false"):
            data[key] = value.lower() == "true"
            continue
        try:
            data[key] = kind(value)
        except ValueError:
            raise BadRequest(f"`{key}` must be {'an integer' if kind is int else 'a number'}") from None
    return data


def parse_http_generate(data: Mapping[str, Any]) -> tuple[str, GenerateRequest]:
    model = data.get("model")
    if not isinstance(model, str):
        raise BadRequest("`model` must be a string naming one of this site's models")
    model_spec(model)
    request = parse_generate(data)
    if request.user_message is not None or request.stop_sequence is not None or request.regenerate:
        raise BadRequest(
            "`user_message`, `regenerate` and `stop_sequence` are for the websocket API (/api/v2/generate)"
        )
    if request.max_new_tokens is None and request.max_length is None:
        raise BadRequest("set `max_new_tokens` or `max_length`")
    return model, request


# ----- OpenAI: POST /v1/chat/completions -----


def parse_chat_completion(body: Any) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("`model` must be a string naming one of this site's models")
    n = body.get("n")
    if n not in (None, 1):
        raise BadRequest("only `n: 1` is supported")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("`stream_options` must be an object")
    max_tokens = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return ChatCompletionRequest(
        model=model,
        messages=_messages(body.get("messages")),
        max_tokens=_integer(body, max_tokens, 1, settings.PLAYGROUND_MAX_NEW_TOKENS, cap_name=max_tokens),
        temperature=_number(body, "temperature", 0.0, SAMPLING_LIMITS["temperature"][1]),  # OpenAI's 0: greedy
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        stop=_stop_list(body, "stop"),
        stream=_flag(body, "stream", False),
        include_usage=_flag(stream_options, "include_usage", False),
    )


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("`messages` must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise LimitExceeded(f"`messages` has {len(value)} entries; the limit is {MAX_MESSAGES}")
    messages, total = [], 0
    for index, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in OPENAI_ROLES:
            raise BadRequest(f"`messages[{index}]` must be an object with a role: system, user or assistant")
        content = _content(message.get("content"), index)
        total += len(content)
        messages.append({"role": OPENAI_ROLES[message["role"]], "content": content})
    if total > settings.PLAYGROUND_MAX_INPUT_CHARS:
        raise LimitExceeded(f"the messages have {total} characters; the limit is {settings.PLAYGROUND_MAX_INPUT_CHARS}")
    if messages[-1]["role"] != "user":
        raise BadRequest("the last message must come from the user")
    return tuple(messages)


def _content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    # The newer list form: [{"type": "text", "text": "..."}]; only text parts are supported.
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise BadRequest(f"`messages[{index}].content` must be text")
