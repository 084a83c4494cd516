"""CSRF for the HTTP APIs: full protection for anything a browser sends, none needed for API clients.

A forged request comes from a victim's browser, and browsers mark every cross-site POST with
an `Origin` header (and carry the site's cookies). Requests with either get Django's usual CSRF
checks (origin and token); programs such as curl or the OpenAI client libraries send neither,
carry no ambient credentials to abuse, and are let through. A refusal is the API's own JSON
error with Django's reason, not Django's HTML page.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.decorators import decorator_from_middleware_with_args
from django.utils.log import log_response
from django.views.decorators.csrf import csrf_exempt

from playground.errors import Forbidden, PlaygroundError

AsyncView = Callable[..., Awaitable[HttpResponse]]
ErrorResponse = Callable[[PlaygroundError], HttpResponse]
logger = logging.getLogger("django.security.csrf")


def petals_error(error: PlaygroundError) -> JsonResponse:
    """chat.petals.dev's error shape."""
    return JsonResponse({"ok": False, "traceback": str(error)}, status=error.status)


def refusal(reason: str) -> Forbidden:
    return Forbidden(
        f"cross-site request refused: {reason.rstrip('.')}. Browsers may call this API only from this site's pages; "
        "programs should send neither an Origin header nor cookies"
    )


class _JsonCsrfViewMiddleware(CsrfViewMiddleware):
    def __init__(self, get_response, respond: ErrorResponse):
        super().__init__(get_response)
        self.respond = respond

    def _reject(self, request: HttpRequest, reason: str) -> HttpResponse:
        response = self.respond(refusal(reason))
        log_response("Forbidden (%s): %s", reason, request.path, response=response, request=request, logger=logger)
        return response


def csrf_protect_browsers(view: AsyncView | None = None, *, respond: ErrorResponse = petals_error):
    """`@csrf_protect_browsers` or `@csrf_protect_browsers(respond=...)` (how the API shapes its errors)."""
    if view is None:
        return functools.partial(csrf_protect_browsers, respond=respond)
    protected = decorator_from_middleware_with_args(_JsonCsrfViewMiddleware)(respond)(view)

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if "Origin" in request.headers or request.COOKIES:
            return await protected(request, *args, **kwargs)
        return await view(request, *args, **kwargs)

    return csrf_exempt(wrapper)
