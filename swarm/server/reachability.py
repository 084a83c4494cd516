"""Is this server reachable from the rest of the world? Asks a swarm health monitor.

A server behind NAT or a firewall can reach the swarm (and so announce itself) while nobody can
open a connection back to it; clients would then fail on it. A health monitor
(`/api/v1/is_reachable/<peer_id>`, as on health.petals.dev) tries to connect from outside.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)


def check_reachability(health_url: str, peer_id: str, *, attempts: int = 3, timeout: float = 30.0) -> bool | None:
    """True/False as the monitor says; None when the monitor itself could not be asked."""
    url = f"{health_url.rstrip('/')}/api/v1/is_reachable/{peer_id}"
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                answer = json.loads(response.read(64 * 1024))
        except (urllib.error.URLError, OSError, ValueError) as e:
            logger.warning("Could not ask %s whether this server is reachable: %s", url, e)
            time.sleep(min(2**attempt, 10))
            continue
        if answer.get("success"):
            logger.info("The swarm can reach this server (checked by %s)", health_url)
            return True
        logger.error(
            "The swarm cannot reach this server: %s. Clients will not be able to use it. Open the port of "
            "--host-maddrs in your firewall or router, or give your public address with --announce-maddrs.",
            answer.get("message") or "no answer to a ping from the health monitor",
        )
        return False
    return None
