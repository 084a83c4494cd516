"""Websocket routes of this app, each behind its origin check (browsers from this site only, scripts always)."""

from __future__ import annotations

from django.urls import path

from playground.consumers import GenerateConsumer
from playground.origin import BrowserOriginValidator

websocket_urlpatterns = [
    path("api/v2/generate", BrowserOriginValidator(GenerateConsumer.as_asgi())),
]
