"""Websocket routes of this app."""

from __future__ import annotations

from django.urls import path

from monitor.consumers import StatusConsumer

websocket_urlpatterns = [path("ws/monitor/", StatusConsumer.as_asgi())]
