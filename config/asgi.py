"""ASGI entry point: Django for HTTP, Channels for websockets (status updates, chat); each app's
websocket routes carry their own origin check. Request bodies are capped before they are read whole,
in daphne itself and here (config/bodies.py)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.bodies import BodyLimit, install_daphne_cap  # noqa: E402
from config.proxy import TrustedProxyHeaders  # noqa: E402
from monitor.routing import websocket_urlpatterns as monitor_websockets  # noqa: E402
from playground.routing import websocket_urlpatterns as playground_websockets  # noqa: E402

# Behind trusted reverse proxies, every app sees the client's address, not the proxy's (config/proxy.py).
application = TrustedProxyHeaders(
    ProtocolTypeRouter(
        {
            "http": BodyLimit(django_asgi_app),
            "websocket": URLRouter([*monitor_websockets, *playground_websockets]),
        }
    )
)
install_daphne_cap()  # daphne imports this module before it starts listening
