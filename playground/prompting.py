"""Chat turns as text: a model's turn format, derived from its chat template or given as separators.

The websocket protocol (like chat.petals.dev) sends only each turn's new text, because the
servers keep the conversation. `ChatFormat` knows what to put around a user message so that
the turns add up to what the model's chat template would render for the whole conversation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

logger = logging.getLogger(__name__)

_USER, _ASSISTANT, _USER2, _SYSTEM = "@@USER-1@@", "@@ASSISTANT-1@@", "@@USER-2@@", "@@SYSTEM@@"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    prefix: str  # once, before the first turn (e.g. the BOS token)
    user_start: str
    user_end: str
    assistant_start: str
    assistant_end: str  # ends an assistant turn; its stripped text is the stop sequence
    # A system prompt's own turn, after the prefix; without one, it opens the first user message.
    system_start: str | None = None
    system_end: str = ""

    @property
    def stop_sequence(self) -> str:
        return self.assistant_end.strip() or self.assistant_end

    def user_turn(self, text: str, *, first: bool, reply_ended: bool, system: str = "") -> str:
        """The text to append for a new user message (plus the start of the assistant's answer).

        `reply_ended`: the previous assistant reply already ends with the stop sequence; if it was
        cut short (stopped, length), the turn's end is added here first. `system`: the chat's system
        prompt, which only the first turn carries.
        """
        system = system.strip() if first else ""
        if first:
            opening = self.prefix + self.system_turn(system)
        elif reply_ended:
            cut = self.assistant_end.find(self.stop_sequence)
            opening = self.assistant_end[cut + len(self.stop_sequence) :] if cut >= 0 else ""
        else:
            opening = self.assistant_end
        if system and self.system_start is None:
            text = f"{system}\n\n{text.strip()}"
        return f"{opening}{self.user_start}{text.strip()}{self.user_end}{self.assistant_start}"

    def system_turn(self, system: str) -> str:
        """A system prompt as a turn of its own ('' when the format folds it into the user message)."""
        if not system or self.system_start is None:
            return ""
        return f"{self.system_start}{system}{self.system_end}"

    def closed_reply(self, text: str) -> str:
        """An assistant reply of an earlier exchange (resent after a reload), with its end of turn."""
        return f"{text.strip()}{self.assistant_end}"

    def render(self, messages: list[dict[str, str]]) -> str:
        """A whole conversation (ending with a user message) and the start of the assistant's answer.

        System messages before the first user message form the system turn when the format has
        one; otherwise (and later ones always) they open the next user message.
        """
        parts, system, previous = [self.prefix], "", None
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"].strip()
            if (
                role == "system"
                and self.system_start is not None
                and all(m["role"] == "system" for m in messages[:index])
            ):
                parts.append(self.system_turn(content))
            elif role == "system":
                system = f"{system}{content}\n\n"
            elif role == "user":
                parts.append(f"{self.user_start}{system}{content}{self.user_end}{self.assistant_start}")
                system = ""
            elif role == "assistant":
                opening = "" if previous == "user" else self.assistant_start
                parts.append(f"{opening}{content}{self.assistant_end}")
            previous = role
        return "".join(parts)


def default_format(tokenizer: Any) -> ChatFormat:
    """Plain separators for models without a chat template."""
    bos = getattr(tokenizer, "bos_token", None) or ""
    return ChatFormat(prefix=bos, user_start="User: ", user_end="\n", assistant_start="Assistant:", assistant_end="\n")


def format_from_separators(separators: dict[str, str]) -> ChatFormat:
    keys = ("prefix", "user_start", "user_end", "assistant_start", "assistant_end")
    return ChatFormat(**{key: separators.get(key, "") for key in keys})


def format_from_template(tokenizer: Any, template: str | None = None) -> ChatFormat | None:
    """Derive the turn format by rendering the template around placeholder messages.

    Returns None when the template does not render turns as plain concatenation (then the
    caller falls back to separators).
    """
    try:
        first = _render(tokenizer, template, [("user", _USER)], generation_prompt=True)
        answered = _render(tokenizer, template, [("user", _USER), ("assistant", _ASSISTANT)], generation_prompt=False)
        second = _render(
            tokenizer, template, [("user", _USER), ("assistant", _ASSISTANT), ("user", _USER2)], generation_prompt=True
        )
    except Exception as e:  # a template may raise for any reason; the fallback is fine
        logger.info("chat template could not be analysed (%s); using plain separators", e)
        return None
    if first.count(_USER) != 1 or answered.count(_ASSISTANT) != 1 or second.count(_USER2) != 1:
        return None
    opening, after_user = first.split(_USER)
    assistant_end = answered.split(_ASSISTANT)[1]
    between = second.split(_ASSISTANT)[1].split(_USER2)[0]
    if not assistant_end or not between.startswith(assistant_end):
        return None
    user_start = between[len(assistant_end) :]
    if not opening.endswith(user_start) or second.split(_USER2)[1] != after_user:
        return None
    chat = ChatFormat(
        prefix=opening[: len(opening) - len(user_start)],
        user_start=user_start,
        user_end=after_user,
        assistant_start="",
        assistant_end=assistant_end,
    )
    # The turns must add up to the template's own rendering of the whole conversation.
    if (
        chat.user_turn(_USER, first=True, reply_ended=False)
        + _ASSISTANT
        + chat.user_turn(_USER2, first=False, reply_ended=False)
        != second
    ):
        return None
    return _with_system_turn(chat, tokenizer, template, first)


def _with_system_turn(chat: ChatFormat, tokenizer: Any, template: str | None, first: str) -> ChatFormat:
    """The template's system turn, when it renders one between the prefix and the first user turn."""
    try:
        rendered = _render(tokenizer, template, [("system", _SYSTEM), ("user", _USER)], generation_prompt=True)
    except Exception:
        return chat  # templates without system messages: the system prompt opens the user message
    user_part = first[len(chat.prefix) :]
    if rendered.count(_SYSTEM) != 1 or not rendered.startswith(chat.prefix) or not rendered.endswith(user_part):
        return chat
    system_part = rendered[len(chat.prefix) : len(rendered) - len(user_part)]
    if _SYSTEM not in system_part:
        return chat  # e.g. folded into the user message: keep the plain fold
    system_start, system_end = system_part.split(_SYSTEM)
    return dataclasses.replace(chat, system_start=system_start, system_end=system_end)


def _render(tokenizer: Any, template: str | None, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )
