"""Websocket routes of this app."""

from __future__ import annotations

websocket_urlpatterns: list = []
