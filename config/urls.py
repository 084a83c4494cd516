"""Top-level URL routes; each app owns its own. (`/healthz` is config/health.py's middleware.)"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponseRedirect
from django.templatetags.static import static
from django.urls import include, path


def favicon(request: HttpRequest) -> HttpResponseRedirect:
    """Browsers and crawlers ask for /favicon.ico whatever the pages link: send them to the static file
    (a temporary redirect: in production its name carries a content hash)."""
    return HttpResponseRedirect(static("favicon.ico"))


urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
    path("", include("playground.urls")),
    path("", include("monitor.urls")),
]
