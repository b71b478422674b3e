"""N real SSH targets on loopback addresses, and an igops inventory for them (for benchmarks)."""

from __future__ import annotations

import math
from pathlib import Path

from igops.lab import sshd

PORT = 2200


def addresses(count: int, base: str = "127.0.30") -> list[str]:
    # 127.0.30.1 … 127.0.30.250, then 127.0.31.x: every address is local on Linux loopback.
    prefix, third = base.rsplit(".", 1)
    return [f"{prefix}.{int(third) + i // 250}.{i % 250 + 1}" for i in range(count)]


def start(directory: Path, count: int, base: str = "127.0.30", port: int = PORT) -> tuple[sshd.SshKeys, list[str]]:
    directory.mkdir(parents=True, exist_ok=True)
    keys = sshd.ensure_keys(directory)
    targets = addresses(count, base)
    sshd.write_known_hosts(keys, [(address, port) for address in targets])
    per = sshd.MAX_ADDRESSES_PER_DAEMON
    for index in range(math.ceil(count / per)):
        sshd.start(directory, f"bench{index}", keys, targets[index * per : (index + 1) * per], port)
    return keys, targets


def stop(directory: Path, count: int) -> None:
    for index in range(math.ceil(count / sshd.MAX_ADDRESSES_PER_DAEMON)):
        sshd.stop(directory, f"bench{index}")


def inventory(directory: Path, keys: sshd.SshKeys, targets: list[str], role: str = "app", port: int = PORT) -> Path:
    hosts = "".join(
        f'[[hosts]]\nname = "t{i}"\naddress = "{address}"\nroles = ["{role}"]\n' for i, address in enumerate(targets)
    )
    path = directory / f"inventory-{len(targets)}.toml"
    path.write_text(f"""[fleet]
name = "bench"
state_dir = "{directory / "state"}"
[ssh]
user = "root"
port = {port}
known_hosts = "{keys.known_hosts}"
identity_file = "{keys.client_key}"
connect_timeout = 20
command_timeout = 60
parallel = 100
{hosts}""")
    return path


def ssh_options(keys: sshd.SshKeys, port: int = PORT) -> list[str]:
    return [
        "-o",
        f"UserKnownHostsFile={keys.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=20",
        "-i",
        str(keys.client_key),
        "-p",
        str(port),
    ]
