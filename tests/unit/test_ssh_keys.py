"""known_hosts as igops reads it (igops.ssh_keys): OpenSSH's matching (exact and hashed names, the
first key of each type), checked against paramiko's HostKeys as a second reader, without a scan of
every entry per host; and the keys each connection is given."""

import base64
import os
import struct

import pytest
from paramiko import HostKeys

from igops import ssh_keys


def ed25519(seed: int) -> str:
    """A public key in known_hosts form (any 32 bytes are an Ed25519 public key to paramiko)."""

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    return base64.b64encode(string(b"ssh-ed25519") + string(bytes([seed]) * 32)).decode()


def hashed(name: str, seed: int) -> str:
    return HostKeys.hash_host(name, base64.b64encode(bytes([seed]) * 20).decode())


ECDSA = (
    "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT"
    "/y6v0mKV0U2w0WZ2YB/++Tpockg="
)

LINES = [
    "# a comment, then an empty line",
    "",
    f"10.0.0.1 ssh-ed25519 {ed25519(1)}",
    f"10.0.0.2,10.0.0.3 ssh-ed25519 {ed25519(2)}",
    f"[10.0.0.4]:2222 ssh-ed25519 {ed25519(3)}",
    f"10.0.0.1 ssh-ed25519 {ed25519(4)}",  # a second key of a type the host already has: the first wins
    f"10.0.0.1 ecdsa-sha2-nistp256 {ECDSA}",  # another type: both
    f"{hashed('10.0.0.5', 5)} ssh-ed25519 {ed25519(5)}",
    f"{hashed('[10.0.0.6]:2200', 6)} ssh-ed25519 {ed25519(6)}",
    f"{hashed('10.0.0.2', 7)} ecdsa-sha2-nistp256 {ECDSA}",  # a hashed entry beside a plain one
    f"10.0.0.7\tssh-ed25519\t{ed25519(8)} a comment after the key",
    "10.0.0.8 ssh-ed25519",  # too few fields
    f"10.0.0.9 ssh-unknown {ed25519(9)}",  # a key type paramiko cannot read
    f"10.0.0.10 ssh-ed25519 {ed25519(10)}",
]
NAMES = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "[10.0.0.4]:2222",
    "10.0.0.4",
    "10.0.0.5",
    "[10.0.0.6]:2200",
    "10.0.0.6",
    "10.0.0.7",
    "10.0.0.8",
    "10.0.0.9",
    "10.0.0.10",
    "10.0.0.99",
    "",
]


def as_text(keys) -> dict[str, str]:
    return {key_type: keys[key_type].get_base64() for key_type in keys.keys()} if keys else {}


def ours_as_text(keys) -> dict[str, str]:
    return {key_type: key.export_public_key().decode().split()[1] for key_type, key in keys.items()}


def test_every_lookup_finds_what_paramikos_host_keys_find(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(LINES) + "\n")
    theirs, ours = HostKeys(str(path)), ssh_keys.KnownHosts.read(path)
    for name in NAMES:
        assert ours_as_text(ours.lookup(name)) == as_text(theirs.lookup(name)), name
    assert list(ours.lookup("10.0.0.1")) == ["ssh-ed25519", "ecdsa-sha2-nistp256"]
    assert ours_as_text(ours.lookup("10.0.0.1"))["ssh-ed25519"] == ed25519(1)
    assert set(ours.lookup("10.0.0.2")) == {"ssh-ed25519", "ecdsa-sha2-nistp256"}


def test_lines_that_do_not_parse_name_no_key():
    """A key or a hashed name that is not base64 makes paramiko's HostKeys raise (ending the whole
    run, every host unanswered); here such a line names no key, and the host is unknown."""
    known = ssh_keys.KnownHosts(
        f"10.0.0.1 ssh-ed25519 !!!\n|1|not-base64|xyz ssh-ed25519 {ed25519(3)}\n10.0.0.2 ssh-ed25519 {ed25519(2)}\n"
    )
    assert known.lookup("10.0.0.1") == {} and known.lookup("not-base64") == {}
    assert list(known.lookup("10.0.0.2")) == ["ssh-ed25519"]


def test_each_key_is_parsed_once_and_only_when_a_host_with_it_is_looked_up(monkeypatch):
    import asyncssh

    parsed = []
    real = asyncssh.import_public_key

    def counting(data):
        parsed.append(data.split()[0])
        return real(data)

    monkeypatch.setattr(asyncssh, "import_public_key", counting)
    # The lab's shape: every host serves the same key.
    known = ssh_keys.KnownHosts("".join(f"10.1.0.{i} ssh-ed25519 {ed25519(1)}\n" for i in range(1, 201)))
    assert parsed == []
    for i in range(1, 201):
        assert list(known.lookup(f"10.1.0.{i}")) == ["ssh-ed25519"]
    assert parsed == ["ssh-ed25519"]


def test_a_thousand_hashed_hosts_are_each_found(tmp_path):
    names = [f"10.1.{i // 200}.{11 + i % 200}" for i in range(1000)]
    text = "".join(f"{HostKeys.hash_host(name)} ssh-ed25519 {ed25519(i % 251)}\n" for i, name in enumerate(names))
    known = ssh_keys.KnownHosts(text)
    for i in (0, 499, 999):
        assert ours_as_text(known.lookup(names[i]))["ssh-ed25519"] == ed25519(i % 251)
    assert known.lookup("10.9.9.9") == {}


def test_an_edited_known_hosts_is_read_again(tmp_path):
    path = tmp_path / "known_hosts"
    path.write_text(f"10.0.0.1 ssh-ed25519 {ed25519(1)}\n")
    assert ssh_keys.known_host_keys(path).lookup("10.0.0.1")
    path.write_text(f"10.0.0.2 ssh-ed25519 {ed25519(2)}\n")
    os.utime(path, ns=(1, 1))  # a new mtime even within the clock's resolution
    assert ssh_keys.known_host_keys(path).lookup("10.0.0.1") == {}
    assert ssh_keys.known_host_keys(path).lookup("10.0.0.2")


@pytest.mark.parametrize("address,port,name", [("10.0.0.1", 22, "10.0.0.1"), ("10.0.0.1", 2200, "[10.0.0.1]:2200")])
def test_known_hosts_names_a_host_as_openssh_does(address, port, name):
    assert ssh_keys.known_hosts_name(address, port) == name
