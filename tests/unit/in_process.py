"""Real services a unit test can start in its own process or as a child, without the lab: moto's
EC2 on a free loopback port, and a user and PID namespace of its own (a second container of this
host name)."""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

# A child in a PID namespace of its own, mapped to root in a user namespace, with its own /proc.
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]


def unshare_works() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """The URL of moto's server, run in this process for as long as the block runs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
