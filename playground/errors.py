"""Errors a client may see, and the one place that turns any exception into a safe message.

Clients get a short sentence; tracebacks and internal details go to the log only.
"""

from __future__ import annotations

import logging
import uuid

from config.formatting import block_ranges

logger = logging.getLogger("playground")


class PlaygroundError(Exception):
    """An error whose message is safe and useful to show to the client."""

    status = 400  # for HTTP answers
    code = "bad_request"


class BadRequest(PlaygroundError):
    pass


class Forbidden(PlaygroundError):
    status = 403
    code = "forbidden"


class UnknownModel(PlaygroundError):
    status = 404
    code = "model_not_found"


class TooLarge(PlaygroundError):
    status = 413
    code = "request_too_large"


class LimitExceeded(PlaygroundError):
    status = 429
    code = "limit_exceeded"


class SwarmUnavailable(PlaygroundError):
    status = 503
    code = "swarm_unavailable"


class StepTimeout(SwarmUnavailable):
    code = "timeout"


def public_message(error: BaseException, context: str = "request") -> PlaygroundError:
    """A client-safe error for `error`; anything unexpected is logged with a reference to quote."""
    from django.conf import settings
    from django.core.exceptions import RequestDataTooBig

    from swarm.client.inference_session import SessionError
    from swarm.client.routing import MissingBlocksError

    if isinstance(error, PlaygroundError):
        return error
    if isinstance(error, RequestDataTooBig):  # Django's own cap on the body it reads
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return TooLarge(f"the request body is larger than this site accepts ({limit} bytes)")
    if isinstance(error, MissingBlocksError):
        # The engine's message names the model's local path; say which blocks, not where the model lives.
        logger.warning("%s: %s", context, error)
        which = f"blocks {block_ranges(error.blocks)}" if error.blocks else "some blocks of this model"
        return SwarmUnavailable(f"{which} are not served right now; try again when more servers are online")
    if isinstance(error, SessionError):
        logger.warning("%s: %s", context, error)
        return SwarmUnavailable("the servers holding this conversation failed and no replacement worked; try again")
    if isinstance(error, TimeoutError):
        logger.warning("%s: timed out: %s", context, error)
        return SwarmUnavailable("the swarm did not answer in time; try again")
    reference = uuid.uuid4().hex[:8]
    logger.error("%s failed (reference %s)", context, reference, exc_info=error)
    failure = PlaygroundError(f"internal error (reference {reference}); the details are in the server log")
    failure.status, failure.code = 500, "internal_error"
    return failure
