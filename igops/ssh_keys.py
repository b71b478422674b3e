"""The keys an SSH connection is made with: the hosts' keys from known_hosts, looked up per host
without scanning the file, and the client's identity. Each file is read once per run and again
whenever it changes."""

from __future__ import annotations

import base64
import hmac
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from asyncssh import SSHKey, SSHKeyPair

T = TypeVar("T")

# asyncssh (imported where a key is first read) names DSA keys in its type hints, and the
# cryptography library warns of DSA's deprecation as each is read: on every igops run's stderr.
# igops neither offers nor accepts DSA.
warnings.filterwarnings("ignore", message="DSA is deprecated")


def known_hosts_name(address: str, port: int) -> str:
    """How known_hosts names a host: its address, or `[address]:port` off port 22 (as OpenSSH)."""
    return address if port == 22 else f"[{address}]:{port}"


class KnownHosts:
    """A known_hosts file read once and looked up per host without scanning it.

    A lookup that compares every entry makes a run's client work grow with the square of the
    fleet's size (with 1,000 hosts, seconds of client CPU; tens of seconds for a hashed file,
    `ssh-keygen -H`, when each entry's salt is decoded again for every host). Here plain names
    are a dict, a hashed entry's salt and digest are decoded once (a lookup costs one HMAC per
    hashed entry, as in OpenSSH), and each key is parsed once, when a host that has it is looked
    up. Matching is an exact name or a hashed one, the first key of each type in the file's
    order; a line whose key does not parse names no key."""

    def __init__(self, text: str):
        self._plain: dict[str, list[tuple[int, str, str]]] = {}
        self._hashed: list[tuple[int, bytes, bytes, str, str]] = []
        self._keys: dict[tuple[str, str], SSHKey | None] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = re.split(" |\t", line)
            if len(fields) < 3:
                continue
            names, key_type, key_data = fields[:3]
            for name in names.split(","):
                if name.startswith("|1|"):
                    hashed = _hashed_name(name)
                    if hashed is not None:
                        self._hashed.append((number, *hashed, key_type, key_data))
                else:
                    self._plain.setdefault(name, []).append((number, key_type, key_data))

    @classmethod
    def read(cls, path: Path) -> KnownHosts:
        return cls(path.read_text(errors="replace"))

    def lookup(self, name: str) -> dict[str, SSHKey]:
        """The keys known for `name` (an address, or `[address]:port`), by key type."""
        found = list(self._plain.get(name, []))
        if self._hashed and not name.startswith("|1|"):
            encoded = name.encode()
            found += [
                (number, key_type, key_data)
                for number, salt, digest, key_type, key_data in self._hashed
                if hmac.compare_digest(hmac.digest(salt, encoded, "sha1"), digest)
            ]
        keys: dict[str, SSHKey] = {}
        for _, key_type, key_data in sorted(found):
            key = self._key(key_type, key_data)
            if key is not None:
                keys.setdefault(key_type, key)
        return keys

    def _key(self, key_type: str, key_data: str) -> SSHKey | None:
        if (key_type, key_data) not in self._keys:
            from asyncssh import KeyImportError, import_public_key

            try:
                key: SSHKey | None = import_public_key(f"{key_type} {key_data}")
            except (KeyImportError, ValueError):
                key = None
            # The type the line names must be the key's own: a key filed under another type's
            # name is no key for that type.
            if key is not None and key.get_algorithm() != key_type:
                key = None
            self._keys[(key_type, key_data)] = key
        return self._keys[(key_type, key_data)]


def _hashed_name(name: str) -> tuple[bytes, bytes] | None:
    """A hashed name's salt and HMAC-SHA1 digest, or None for one OpenSSH would never match."""
    parts = name.split("|")
    if len(parts) != 4:
        return None
    try:
        salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except ValueError:
        return None
    canonical = base64.b64encode(salt).decode() == parts[2] and base64.b64encode(digest).decode() == parts[3]
    return (salt, digest) if canonical and len(salt) == len(digest) == 20 else None


class _ReadOnce(Generic[T]):
    """A file's contents as `load` makes them, read once per run and again whenever the file
    changes (its mtime or size)."""

    def __init__(self, load: Callable[[Path], T]):
        self._load = load
        self._lock = threading.Lock()
        self._read: tuple[tuple[str, int, int], T] | None = None

    def get(self, path: Path) -> T:
        status = path.stat()
        key = (str(path), status.st_mtime_ns, status.st_size)
        with self._lock:
            if self._read is None or self._read[0] != key:
                self._read = (key, self._load(path))
            return self._read[1]


class IdentityError(Exception):
    """The identity file is there but gives no key to log in with (encrypted, not a key)."""


def _load_identity(path: Path) -> list[SSHKeyPair] | str:
    """The identity file's key, with its certificate (`<file>-cert.pub`) when there is one, or
    why it does not load."""
    from asyncssh import KeyImportError, load_keypairs

    try:
        return list(load_keypairs([str(path)]))
    except (KeyImportError, ValueError) as exc:
        return str(exc) or type(exc).__name__


_known_hosts_files = _ReadOnce(KnownHosts.read)
_identity_files = _ReadOnce(_load_identity)


def known_host_keys(path: Path) -> KnownHosts:
    """The known_hosts file, parsed once per run and again whenever it changes. Raises OSError
    when it cannot be read."""
    return _known_hosts_files.get(path)


def identity(path: Path) -> list[SSHKeyPair]:
    """The identity file's key pair(s). Raises OSError when it cannot be read and IdentityError
    when it holds no key igops can use."""
    loaded = _identity_files.get(path)
    if isinstance(loaded, str):
        raise IdentityError(f"cannot use the SSH identity file {path}: {loaded}")
    return loaded
