"""How many tokens a reply may have: the one place where every limit on a reply's length meets.

A reply is bounded by what the request asked for (or the model's default), by this site's
`PLAYGROUND_MAX_NEW_TOKENS`, by the room left in the inference session (its `max_length`,
prompt included) and, for Petals clients, by the request's own `max_length` (also prompt included).
"""

from __future__ import annotations

from django.conf import settings

from playground.errors import BadRequest


def reply_budget(requested: int | None, *, held: int, session_length: int, max_length: int | None = None) -> int:
    """Tokens the next reply may generate.

    requested: the reply's own limit (None: the site's cap); held: tokens of the conversation once
    the new input is added; session_length: what the session holds; max_length: Petals' limit on the
    whole conversation, if the request set one.
    """
    if max_length is not None and max_length <= held:
        raise BadRequest(f"`max_length` is {max_length}, but the conversation already has {held} tokens")
    if held >= session_length:
        raise BadRequest(
            f"the conversation would hold {held} tokens, but this session allows {session_length}; "
            "start a new chat or open the session with a larger max_length"
        )
    cap = settings.PLAYGROUND_MAX_NEW_TOKENS
    budget = min(requested or cap, cap, session_length - held)
    if max_length is not None:
        budget = min(budget, max_length - held)
    return budget
