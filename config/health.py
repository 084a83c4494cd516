"""`/healthz`: liveness for orchestrators, answered before anything checks the Host header or the scheme.

The container's health check asks `http://127.0.0.1:8000/healthz`: a real `ALLOWED_HOSTS` (the
site's domain) refuses that Host, and behind a TLS proxy `SECURE_SSL_REDIRECT` would send plain
HTTP elsewhere. So this middleware comes first and answers before Django's checks run; it says only
that the site's process serves requests.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.deprecation import MiddlewareMixin

HEALTH_PATH = "/healthz"


class HealthCheckMiddleware(MiddlewareMixin):
    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        if request.path == HEALTH_PATH and request.method in ("GET", "HEAD"):
            return JsonResponse({"ok": True})
        return None
