"""Websocket routes of this app (config/asgi.py wraps them in AllowedHostsOriginValidator)."""

from __future__ import annotations

from django.urls import path

from playground.consumers import GenerateConsumer

websocket_urlpatterns = [
    path("api/v2/generate", GenerateConsumer.as_asgi()),
]
