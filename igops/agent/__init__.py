"""Small stdlib-only programs that igops runs on a host with the host's own python3.

They are sent over the SSH session's stdin, never installed, so nothing on the host needs to
change and nothing is executed from a filesystem igops may freeze. The first stdin line is
the program's length; whatever follows it is the program's own input.

A program may import another module of this package (`from igops.agent.X import ...` at the
top level; X itself imports none): the host has no igops package, so X is sent with it, and
registered under its name before the program runs. igops imports the same X itself: one
definition serves both sides (the page-cache profile's format).
"""

from __future__ import annotations

import re
import shlex
from importlib import resources

# A program cut off in transit (its sender killed) is refused, not run as far as it came.
BOOTSTRAP = (
    "import sys;n=int(sys.stdin.buffer.readline());p=sys.stdin.buffer.read(n);"
    "len(p)==n or sys.exit('igops: the program ended early');exec(compile(p,{name!r},'exec'))"
)
COMPANION = re.compile(rf"^from {re.escape(__package__)}\.(\w+) import", re.M)
# Runs where BOOTSTRAP runs a program, so the program runs in the same globals (__main__).
LOADER = """import sys as _sys, types as _types
for _name, _text in {modules!r}:
    _module = _sys.modules[_name] = _types.ModuleType(_name)
    exec(compile(_text, _name, "exec"), _module.__dict__)
exec(compile({main!r}, {label!r}, "exec"))
"""


def _source(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.py").read_text(encoding="utf-8")


def program(name: str) -> bytes:
    """Agent `name` as the host runs it: its source, or a loader of the modules it imports and it."""
    source = _source(name)
    modules = []
    for companion in dict.fromkeys(COMPANION.findall(source)):
        text = _source(companion)
        if COMPANION.search(text):
            raise ValueError(f"igops.agent.{companion}, which {name} imports, imports another module of igops.agent")
        modules.append((f"{__package__}.{companion}", text))
    if not modules:
        return source.encode()
    return LOADER.format(modules=modules, main=source, label=f"igops-{name}").encode()


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
