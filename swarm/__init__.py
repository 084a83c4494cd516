"""Run large language models BitTorrent-style: a Petals-compatible engine on hivemind.

`from swarm import AutoDistributedModelForCausalLM` gives a client whose transformer blocks run
on the swarm's servers (`AutoDistributedModelForSequenceClassification`: a classifier on them).
Nothing in this package imports Django.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from swarm.client.classification import AutoDistributedModelForSequenceClassification
    from swarm.client.model import AutoDistributedModelForCausalLM

_LAZY = {
    "AutoDistributedModelForCausalLM": "swarm.client.model",
    "AutoDistributedModelForSequenceClassification": "swarm.client.classification",
}


def __getattr__(name: str):
    # Lazy, so that `import swarm` stays cheap for the server and the monitor.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["AutoDistributedModelForCausalLM", "AutoDistributedModelForSequenceClassification", "__version__"]
