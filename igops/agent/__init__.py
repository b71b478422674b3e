"""Small stdlib-only programs that igops runs on a host with the host's own python3.

They are sent over the SSH session's stdin, never installed, so nothing on the host needs to
change and nothing is executed from a filesystem igops may freeze. The first stdin line is
the program's length; whatever follows it is the program's own input.
"""

from __future__ import annotations

import shlex
from importlib import resources

BOOTSTRAP = "import sys;n=int(sys.stdin.buffer.readline());exec(compile(sys.stdin.buffer.read(n),{name!r},'exec'))"


def program(name: str) -> bytes:
    return resources.files(__package__).joinpath(f"{name}.py").read_bytes()


def invocation(name: str, args: list[str]) -> tuple[str, bytes]:
    """The remote command line and the stdin prefix that together run agent `name`.

    The host's system python3 runs it when there is one: a user's PATH may put a version
    manager's shim first, which costs a shell script and a few processes per run. -I: no
    PYTHON* variables, user site or current directory can change what runs; -S: no
    site-packages either (the programs are stdlib-only), and a host whose site runs .pth hooks
    starts each one tens of milliseconds sooner."""
    source = program(name)
    command = 'p=/usr/bin/python3; [ -x "$p" ] || p=python3; exec "$p" -I -S ' + shlex.join(
        ["-c", BOOTSTRAP.format(name=f"igops-{name}"), *args]
    )
    return command, str(len(source)).encode() + b"\n" + source
