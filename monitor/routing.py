"""Websocket routes of this app: for this site's pages only (AllowedHostsOriginValidator)."""

from __future__ import annotations

from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from monitor.consumers import StatusConsumer

websocket_urlpatterns = [path("ws/monitor/", AllowedHostsOriginValidator(StatusConsumer.as_asgi()))]
