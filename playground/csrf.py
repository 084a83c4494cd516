"""CSRF for the HTTP APIs: full protection for anything a browser sends, none needed for API clients.

A forged request comes from a victim's browser, and browsers mark every cross-site POST with
an `Origin` header (and carry the site's cookies). Requests with either get Django's usual CSRF
checks (origin and token); programs such as curl or the OpenAI client libraries send neither,
carry no ambient credentials to abuse, and are let through.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt, csrf_protect

AsyncView = Callable[..., Awaitable[HttpResponse]]


def csrf_protect_browsers(view: AsyncView) -> AsyncView:
    protected = csrf_protect(view)

    @functools.wraps(view)
    async def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if "Origin" in request.headers or request.COOKIES:
            return await protected(request, *args, **kwargs)
        return await view(request, *args, **kwargs)

    return csrf_exempt(wrapper)
