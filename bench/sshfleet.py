"""N real SSH targets on loopback addresses, and an igops inventory for them (for benchmarks)."""

from __future__ import annotations

import math
import os
import time
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


def listeners(directory: Path, count: int) -> list[int]:
    """The pids of the listening sshd that `start` started for `count` targets."""
    pids = [
        sshd.running_pid(directory / f"sshd-bench{index}.pid")
        for index in range(math.ceil(count / sshd.MAX_ADDRESSES_PER_DAEMON))
    ]
    if None in pids:
        raise RuntimeError(f"an sshd of the fleet in {directory} is not running")
    return [pid for pid in pids if pid]


class SshdCpu:
    """The CPU time the targets' side spends: the listening sshd and every login they fork.

    Each connection is a child of its listener (a re-executed sshd, with its privilege-separated
    child, the session and the command under it), and each process waits for its own children;
    a listener reaps each login when it ends, and the kernel then adds the login's CPU time and
    that of everything it waited for to the listener's cutime and cstime. So the listeners'
    utime+stime+cutime+cstime (/proc/PID/stat) read before and after a run, once every login has
    been reaped (`settle`), is the CPU of everything the targets ran for it. A login still alive
    when read counts with its own and its reaped children's time, so a run read before it has
    settled is undercounted by the live grandchildren alone."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        ticks = 0
        for pid in self.pids:
            ticks += _cumulative_ticks(pid)
            for child in _children(pid):
                try:
                    ticks += _cumulative_ticks(child)
                except OSError:  # reaped since it was listed: now in its listener's cutime
                    pass
        return ticks / self.tick

    def settle(self, timeout: float = 30.0) -> bool:
        """Wait until no listener has a child (every login has ended and been reaped); False if
        some are still there after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while any(_children(pid) for pid in self.pids):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def _stat_fields(pid: int) -> list[str]:
    # After the command name, which may hold spaces and parentheses: field 3 (state) onwards.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cumulative_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    # utime, stime, cutime, cstime: fields 14 to 17 of proc(5).
    return sum(int(value) for value in fields[11:15])


_LISTS_CHILDREN = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def _children(pid: int) -> list[int]:
    """A (single-threaded) process's children, zombies included: they are not reaped yet."""
    if _LISTS_CHILDREN:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    # A kernel without CONFIG_PROC_CHILDREN: every process's parent.
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


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
