"""The lab's clear refusals, which need no lab: not root, and a port another program holds
(and not its own forked children)."""

import socket
import subprocess

import pytest

from igops.errors import RefusedError, UsageError
from tests.labtools import wait_for


def test_lab_up_and_down_refuse_without_root(monkeypatch):
    from igops import lab

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    for action in (lab.up, lab.down):
        with pytest.raises(UsageError, match="must run as root"):
            action()


def test_a_taken_port_is_refused_naming_its_holder():
    from igops.lab import proc

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.10.99", 8099))
    holder.listen(1)
    try:
        with pytest.raises(RefusedError, match=r"127\.0\.10\.99:8099 \(for the lab's probe\) is already in use"):
            proc.ensure_free("127.0.10.99", 8099, "probe")
    finally:
        holder.close()
    proc.ensure_free("127.0.10.99", 8099, "probe")


def test_a_child_of_a_lab_process_is_the_labs_own(tmp_path):
    """munin-node forks a child per connection that holds the listening socket; the lab must
    not refuse its own port because of it, even once the child has shed what marks it."""
    from igops.lab import proc
    from igops.lab.state import MARKER_ENV

    parent = subprocess.Popen(
        ["bash", "-c", "env -i sleep 30 & wait"],
        cwd="/",
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", MARKER_ENV: str(tmp_path)},
    )
    try:
        assert wait_for(lambda: children(parent.pid), 5)
        child = children(parent.pid)[0]
        assert proc.belongs(parent.pid, tmp_path) and proc.belongs(child, tmp_path)
        assert not proc.belongs(child, tmp_path / "elsewhere")
    finally:
        parent.kill()
        parent.wait()


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in found.split()]
