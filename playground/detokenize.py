"""Token ids to streamed text: hold back partial UTF-8 and partial stop sequences.

A byte-level tokenizer may split one character over several tokens; decoding such a token alone
gives U+FFFD. `IncrementalDecoder` emits text only once it decodes cleanly, so the pieces sent
to a client always concatenate to the text of the whole reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 6  # earlier tokens decoded along, so that tokenizers that drop a leading space get it right
MAX_HELD_TOKENS = 8  # never hold back more than this: some token runs simply do not decode


class IncrementalDecoder:
    def __init__(self, tokenizer: Any, *, context: Sequence[int] = (), skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """The new text this token completes ('' while a character is still incomplete)."""
        self.ids.append(token_id)
        held = len(self.ids) - self.read_offset
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and full.startswith(prefix):
            if not full.endswith(REPLACEMENT_CHAR) or held >= MAX_HELD_TOKENS:
                return self._advance(full[len(prefix) :])
        elif held >= MAX_HELD_TOKENS:
            return self.flush()
        return ""

    def flush(self) -> str:
        """Whatever is still held back, decoded as well as it goes."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        return self._advance(full[len(prefix) :] if full.startswith(prefix) else full)

    def _advance(self, delta: str) -> str:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    @property
    def pending_tokens(self) -> int:
        return len(self.ids) - self.read_offset


class StopMatcher:
    """Finds stop sequences in streamed text.

    include=True (Petals): text is passed on at once and the stop sequence stays in it.
    include=False (OpenAI, chat turns): text is cut before the stop sequence, so any tail that
    could still become a stop sequence is held back until the next piece decides.
    """

    def __init__(self, stops: Sequence[str], *, include: bool):
        self.stops = [s for s in stops if s]
        self.include = include
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""  # held text (include=False) or recent context (include=True)
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if self.matched is not None or not self.stops:
            return "" if self.matched is not None else text
        window = self.pending + text
        hits = [(window.find(s), s) for s in self.stops if s in window]
        if self.include:
            self.pending = window[-(self.longest - 1) :] if self.longest > 1 else ""
            if hits:
                self.matched = min(hits)[1]
            return text
        if hits:
            index, self.matched = min(hits)
            self.pending = ""
            return window[:index]
        keep = self._partial_stop_suffix(window)
        self.pending = window[len(window) - keep :] if keep else ""
        return window[: len(window) - keep]

    def flush(self) -> str:
        held, self.pending = ("" if self.include else self.pending), ""
        return held

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of a stop sequence."""
        for length in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
