"""The embedded mode's Celery broker: kombu's filesystem transport, with messages written atomically.

kombu creates a message file and then writes it; a worker polling the folder can take the file
in between, read nothing, and die on the JSON error (seen when a crawl's parts and the demo's
first crawl were queued at once). Here a message is written under a name the readers skip and
renamed into place, which is atomic within one folder.

A folder has no host either: kombu's virtual transports default to 'localhost' and log "No hostname
was supplied. Reverting to default 'localhost'" each time a connection is described (every worker
and beat start); this one has no default hostname.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload, **kwargs) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".partial"  # readers take only names ending in `.<queue>.msg`
        try:
            with open(partial, "wb") as file:
                file.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel

    @property
    def default_connection_params(self) -> dict:
        return {"port": self.default_port}  # no 'hostname': nothing to revert to, nothing to warn about
