"""The one home of the monitor's rule for what a server's state is worth.

A server counts (covers its blocks, is listed as online) only when it announced ONLINE *and* answered the
monitor's ping; one not pinged is "unknown". Pages, APIs, history and the stored coverage all ask here.
This module imports nothing of the monitor, so models, snapshots and history can all import it.
"""

from __future__ import annotations

from django.db import models


class ServerState(models.IntegerChoices):
    # The announced state, as in the wire protocol (swarm.data_structures.ServerState).
    OFFLINE = 0, "offline"
    JOINING = 1, "joining"
    ONLINE = 2, "online"


def server_counts_as_online(state: int, reachable: bool | None) -> bool:
    """Whether a server covers its blocks: announced ONLINE and reached by the monitor's ping. One not
    checked (`reachable` None: over the ping budget) is "unknown", not online."""
    return state == ServerState.ONLINE and reachable is True


def display_state(state: int, reachable: bool | None) -> str:
    """online / unknown / unreachable / joining / offline, as pages and APIs show a server."""
    if state == ServerState.ONLINE:
        return {True: "online", None: "unknown", False: "unreachable"}[reachable]
    return ServerState(state).label
