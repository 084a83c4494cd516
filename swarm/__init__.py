"""Run large language models BitTorrent-style: a Petals-compatible engine on hivemind.

`from swarm import AutoDistributedModelForCausalLM` gives a client whose transformer blocks run
on the swarm's servers. Nothing in this package imports Django.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from swarm.client.model import AutoDistributedModelForCausalLM


def __getattr__(name: str):
    # Lazy, so that `import swarm` stays cheap for the server and the monitor.
    if name == "AutoDistributedModelForCausalLM":
        from swarm.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(name)


__all__ = ["AutoDistributedModelForCausalLM", "__version__"]
