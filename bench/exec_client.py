"""The client CPU `igops exec` spends per host before any SSH traffic, at 1,000 hosts: what each
connection is prepared with (its host keys from known_hosts), and the plan printed
before the run. Each beside what the same step cost the way igops did it before (paramiko's
HostKeys, a Fabric configuration per connection, the plan printed a line at a time), in one run.

Hosts are those of config/example-1000.toml; known_hosts has one Ed25519 key per host, plain or
hashed (`ssh-keygen -H`'s form). CPU time (time.process_time), so that other work on the machine
inflates it less than wall time; the best of REPEATS. No connection is made and no server started:
the handshakes themselves need a fleet (bench/exec_fanout.py).

    .venv/bin/python bench/exec_client.py
"""

from __future__ import annotations

import base64
import io
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igops import inventory, remote, ssh_keys  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 3


def main() -> None:
    from paramiko import HostKeys

    fleet = inventory.load_file(ROOT / "config" / "example-1000.toml")
    targets = remote.targets_for(fleet, fleet.hosts)
    names = [ssh_keys.known_hosts_name(target.address, target.port) for target in targets]
    work = Path(tempfile.mkdtemp(prefix="igops-bench-client-"))
    plain, hashed = work / "known_hosts", work / "known_hosts.hashed"
    plain.write_text("".join(f"{name} ssh-ed25519 {_key(index)}\n" for index, name in enumerate(names)))
    hashed.write_text(
        "".join(f"{HostKeys.hash_host(name)} ssh-ed25519 {_key(index)}\n" for index, name in enumerate(names))
    )

    print(f"exec_client: client CPU before any SSH traffic, {len(names)} hosts, best of {REPEATS} (CPU ms)")
    print(f"{'step':<58} {'once':>9} {'per host':>10}")
    for label, path in (("plain", plain), ("hashed", hashed)):
        _known_hosts_rows(label, path, names)

    from fabric import Config

    _row(
        "a Fabric configuration (made once per connection before)",
        None,
        _cpu(lambda: [Config() for _ in range(200)]) / 200,
    )
    ssh_keys.known_host_keys(plain)  # known_hosts read once, as in a run
    _row(
        "a connection's host keys (igops now: read once, an index)",
        None,
        _cpu(lambda: [ssh_keys.known_host_keys(plain).lookup(name) for name in names]) / len(names),
    )
    steps = [f"{t.name} ({t.user}@{t.address}:{t.port}): uptime" for t in targets]
    _row("the plan, a print per line (before)", _cpu(lambda: _plan(steps, joined=False)), None)
    _row("the plan, one print (now)", _cpu(lambda: _plan(steps, joined=True)), None)


def _known_hosts_rows(label: str, path: Path, names: list[str]) -> None:
    from paramiko import HostKeys

    # Hashed entries cost an HMAC each per lookup (paramiko also re-encodes each): fewer hosts do.
    sample = names if label == "plain" else names[:50]
    host_keys = HostKeys(str(path))
    _row(f"known_hosts ({label}) read: paramiko HostKeys", _cpu(lambda: HostKeys(str(path))), None)
    _row(f"known_hosts ({label}) read: igops KnownHosts", _cpu(lambda: ssh_keys.KnownHosts.read(path)), None)
    lookups = _cpu(lambda: [host_keys.lookup(name) for name in sample])
    _row(f"one host's keys ({label}): HostKeys.lookup", None, lookups / len(sample))
    # A fresh index each time: a host's key is parsed at its first lookup, which a run makes once.
    sample = names if label == "plain" else names[:200]
    lookups = _cpu(lambda known: [known.lookup(name) for name in sample], lambda: ssh_keys.KnownHosts.read(path))
    _row(f"one host's keys ({label}): KnownHosts.lookup", None, lookups / len(sample))


def _key(index: int) -> str:
    """An Ed25519 public key in known_hosts form (any 32 bytes are one to paramiko)."""

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    return base64.b64encode(string(b"ssh-ed25519") + string(index.to_bytes(4, "big") * 8)).decode()


def _plan(steps: list[str], joined: bool) -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), highlight=False, soft_wrap=True)
    lines = ["[bold]Run `uptime` on 1000 hosts (100 at a time)[/bold]"] + [
        f"  {number}. {step}" for number, step in enumerate(steps, 1)
    ]
    if joined:
        console.print("\n".join(lines))
    else:
        for line in lines:
            console.print(line)


def _cpu(work: Callable[..., object], setup: Callable[[], object] | None = None) -> float:
    """The best CPU time of REPEATS runs of `work`, in ms; `setup`'s result, made untimed before
    each run, is its argument."""
    best = float("inf")
    for _ in range(REPEATS):
        arguments = [setup()] if setup else []
        started = time.process_time()
        work(*arguments)
        best = min(best, time.process_time() - started)
    return best * 1000


def _row(label: str, once: float | None, per_host: float | None) -> None:
    print(
        f"{label:<58} {'' if once is None else f'{once:.1f}':>9} "
        f"{'' if per_host is None else f'{per_host * 1000:.1f} µs':>10}"
    )


if __name__ == "__main__":
    main()
