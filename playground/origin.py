"""The origin check of `/api/v2/generate`: browsers only from this site's pages, scripts always.

A cross-site page could otherwise open the websocket from a visitor's browser. Browsers mark
every websocket handshake with an `Origin` header, so the header is checked against
ALLOWED_HOSTS (as Channels' AllowedHostsOriginValidator does). Programs (Python scripts, curl,
Petals' own chat clients) send none, carry no visitor's credentials, and are served: the API is
chat.petals.dev's, meant for them.

A refused browser gets a reason it can read: the socket opens, receives the protocol's error
message `{"ok": false, "traceback": "..."}` and closes with code 4003 (403 in the application's
range), before any of the API runs. (Daphne cannot answer a handshake with a response body.)
"""

from __future__ import annotations

from urllib.parse import urlparse

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.security.websocket import OriginValidator
from django.conf import settings

REFUSED_CODE = 4003


def allowed_hosts() -> list[str]:
    """As AllowedHostsOriginValidator, read at each handshake (tests override settings)."""
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = ["localhost", "127.0.0.1", "[::1]"]
    return hosts


def refusal_message(origin: str) -> str:
    return (
        f"origin {origin!r} may not use this API: browsers may connect only from this site's pages "
        "(programs that send no Origin header are served)"
    )


class _Refusal(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        await self.accept()
        await self.send_json({"ok": False, "traceback": self.scope["origin_refused"]})
        await self.close(code=REFUSED_CODE)

    async def receive_json(self, content, **kwargs) -> None:  # nothing of the API runs
        pass


class BrowserOriginValidator(OriginValidator):
    """Lets in handshakes without an Origin header and those from ALLOWED_HOSTS; refuses the others clearly."""

    def __init__(self, application):
        super().__init__(application, allowed_origins=[])  # read from the settings at each handshake

    def _allowed(self, origin: str) -> bool:
        try:
            parsed = urlparse(origin)
            return any(host == "*" or self.match_allowed_origin(parsed, host) for host in allowed_hosts())
        except ValueError:  # e.g. "http://[::1" or a port out of range
            return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            raise ValueError("BrowserOriginValidator guards websockets only")
        origins = [value for name, value in scope.get("headers", []) if name == b"origin"]
        if not origins:
            return await self.application(scope, receive, send)
        origin = origins[-1].decode("latin-1")
        if len(origins) == 1 and self._allowed(origin):
            return await self.application(scope, receive, send)
        return await _Refusal.as_asgi()({**scope, "origin_refused": refusal_message(origin)}, receive, send)
