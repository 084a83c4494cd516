"""Top-level URL routes; each app owns its own."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import include, path


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness probe for container orchestrators."""
    return JsonResponse({"ok": True})


urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("", include("playground.urls")),
    path("", include("monitor.urls")),
]
