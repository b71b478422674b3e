"""The lab's clear refusals, which need no lab: not root, and a port another program holds."""

import socket

import pytest

from igops.errors import RefusedError, UsageError


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
