"""The client CPU of one SSH login and command, igops' way against paramiko's default cipher
order, in one run: serial logins to one lab host, each followed by `true` on a channel and a
close, in interleaved rounds so that whatever else the machine does falls on both alike.

- igops: `remote._open`, which offers AES-GCM first (its tag checked in the cryptography library).
- paramiko's order: the same login with the GCM ciphers disabled, so that AES-CTR with
  HMAC-SHA2-256 is agreed, as paramiko's own preference order agrees with OpenSSH, and paramiko
  checks each packet's MAC in Python.

CPU time of this process (every paramiko thread) over the logins of a round, per login; the
median of the rounds. The lab must be up (`igops lab up`); the host's sshd shares the two cores.

    .venv/bin/python bench/ssh_login.py [--logins 150] [--rounds 4] [--host app1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from igops import inventory, remote  # noqa: E402

LAB_INVENTORY = Path("/var/lib/igops-lab/igops.toml")
GCM = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]


def login_and_true(target: remote.Target, settings: remote.SshSettings, without: list[str]) -> str:
    """One login, `true` on a channel, the close; the cipher agreed."""
    client = remote._client(target, settings)
    try:
        if without:
            # The same login with paramiko's Transport told to leave `without` out.
            connect = client.connect

            def connect_without(*args, **kwargs):
                return connect(*args, **kwargs, disabled_algorithms={"ciphers": without})

            client.connect = connect_without  # type: ignore[method-assign]
        transport = remote._open(client, target, settings)
        channel = transport.open_session()
        channel.exec_command("true")
        if channel.recv_exit_status() != 0:
            raise SystemExit("`true` failed on the lab host")
        return transport.remote_cipher
    finally:
        client.close()


def round_of(target, settings, logins: int, without: list[str]) -> tuple[float, float, str]:
    """CPU ms and wall ms per login over `logins` logins, and the cipher agreed."""
    cpu, wall = time.process_time(), time.monotonic()
    agreed = ""
    for _ in range(logins):
        agreed = login_and_true(target, settings, without)
    return (time.process_time() - cpu) / logins * 1000, (time.monotonic() - wall) / logins * 1000, agreed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--host", default="app1")
    args = parser.parse_args()
    fleet = inventory.load_file(LAB_INVENTORY)
    settings = remote.settings_for(fleet)
    [target] = remote.targets_for(fleet, [fleet.host(args.host)])
    ways = {"igops (GCM first)": [], "paramiko's order (CTR)": GCM}
    for without in ways.values():  # warm: imports, the identity file, the first login's costs
        login_and_true(target, settings, without)
    figures: dict[str, list[tuple[float, float, str]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, without in ways.items():
            figures[name].append(round_of(target, settings, args.logins, without))
    print(
        f"ssh_login: {args.logins} serial logins and `true` to {args.host} per round, {args.rounds} rounds "
        "interleaved; medians"
    )
    print(f"{'client':<24} {'cipher':<24} {'CPU ms/login':>12} {'wall ms/login':>13}  rounds' CPU ms")
    medians = {}
    for name, rounds in figures.items():
        medians[name] = statistics.median(cpu for cpu, _, _ in rounds)
        wall = statistics.median(wall for _, wall, _ in rounds)
        each = ", ".join(f"{cpu:.2f}" for cpu, _, _ in rounds)
        print(f"{name:<24} {rounds[-1][2]:<24} {medians[name]:>12.2f} {wall:>13.1f}  {each}")
    igops, baseline = medians["igops (GCM first)"], medians["paramiko's order (CTR)"]
    print(f"paramiko's order / igops: client CPU {baseline / igops:.2f}x ({baseline - igops:.2f} ms a login)")


if __name__ == "__main__":
    main()
