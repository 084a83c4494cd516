"""A nesting limit for hivemind's msgpack extension types, in every process of the program.

hivemind decodes each nested extension (its tuple type, its dictionary value) with a new `msgpack.unpackb`
call from Python, and each level costs msgpack tens of KB of C stack: a few KB of nested tuples from a
stranger (a DHT value, a store request, an announcement the monitor reads) crash the process with a
segmentation fault. Past MAX_EXTENSION_DEPTH levels the decoding raises ValueError instead, which hivemind
and this project treat as any malformed value. Real values nest two or three levels.
"""

from __future__ import annotations

import threading
from typing import Any

from hivemind.utils import MSGPackSerializer

MAX_EXTENSION_DEPTH = 32

_nesting = threading.local()
_installed = False


def install() -> None:
    """Bound the nesting of `MSGPackSerializer.loads` (once per process; later calls do nothing)."""
    global _installed
    if _installed:
        return
    decode = MSGPackSerializer._decode_ext_types  # the bound classmethod; nested levels call the class's attribute

    def bounded(cls: type, type_code: int, data: bytes) -> Any:
        depth = getattr(_nesting, "depth", 0)
        if depth >= MAX_EXTENSION_DEPTH:
            raise ValueError(f"msgpack value nests extension types more than {MAX_EXTENSION_DEPTH} deep")
        _nesting.depth = depth + 1
        try:
            return decode(type_code, data)
        finally:
            _nesting.depth = depth

    MSGPackSerializer._decode_ext_types = classmethod(bounded)
    _installed = True
