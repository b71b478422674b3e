"""An HTTP server the unit tests run on a thread of their own, for as long as a `with` lasts."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import BaseServer
from typing import TypeVar

Server = TypeVar("Server", bound=BaseServer)

# shutdown() waits until serve_forever next looks at its flag: at the default poll of 0.5 s each
# test's teardown waited about that long for every server it ran.
POLL_INTERVAL = 0.01


@contextmanager
def served(server: Server) -> Iterator[Server]:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
