"""The client CPU of one SSH login and command, igops (asyncssh, on its event loop) against
paramiko (the client igops used before, set up as igops set it up: the host's key alone, AES-GCM
first, TCP_NODELAY), in one run: serial logins to one lab host, each followed by `true` on a
channel and a close, in interleaved rounds so that whatever else the machine does falls on both
alike.

CPU time of this process (every thread: igops' loop, paramiko's transport threads) over the
logins of a round, per login; the median of the rounds. Serial logins show the handshake's own
cost; what a thread per connection costs at a hundred at once, bench/exec_fanout.py shows. The lab
must be up (`igops lab up`); the host's sshd shares the two cores.

    .venv/bin/python bench/ssh_login.py [--logins 150] [--rounds 4] [--host app1]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from igops import inventory, remote, ssh_keys  # noqa: E402

LAB_INVENTORY = Path("/var/lib/igops-lab/igops.toml")


def igops_login(target: remote.Target, settings: remote.SshSettings) -> None:
    [result] = remote.run([target], "true", settings)
    if not result.ok:
        raise SystemExit(f"`true` failed on the lab host: {result.error}")


def paramiko_login(target: remote.Target, settings: remote.SshSettings) -> None:
    from paramiko import PKey, RejectPolicy, SSHClient, Transport

    client = SSHClient()
    client.set_missing_host_key_policy(RejectPolicy())
    name = ssh_keys.known_hosts_name(target.address, target.port)
    for line in settings.known_hosts.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == name:
            import base64

            client.get_host_keys().add(name, fields[1], PKey.from_type_string(fields[1], base64.b64decode(fields[2])))

    def transport(sock, **_):
        made = Transport(sock)
        options = made.get_security_options()
        options.ciphers = tuple(c for c in remote.CIPHERS if c in options.ciphers)
        return made

    sock = socket.create_connection((target.address, target.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        client.connect(
            target.address,
            port=target.port,
            sock=sock,
            username=target.user,
            key_filename=str(settings.identity_file),
            look_for_keys=False,
            allow_agent=False,
            transport_factory=transport,
        )
        channel = client.get_transport().open_session()  # type: ignore[union-attr]
        channel.exec_command("true")
        if channel.recv_exit_status() != 0:
            raise SystemExit("`true` failed on the lab host")
    finally:
        client.close()


def round_of(login, target, settings, logins: int) -> tuple[float, float]:
    """CPU ms and wall ms per login over `logins` logins."""
    cpu, wall = time.process_time(), time.monotonic()
    for _ in range(logins):
        login(target, settings)
    return (time.process_time() - cpu) / logins * 1000, (time.monotonic() - wall) / logins * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--host", default="app1")
    args = parser.parse_args()
    fleet = inventory.load_file(LAB_INVENTORY)
    settings = remote.settings_for(fleet)
    [target] = remote.targets_for(fleet, [fleet.host(args.host)])
    ways = {"igops (asyncssh)": igops_login, "paramiko (before)": paramiko_login}
    for login in ways.values():  # warm: imports, the identity file, the first login's costs
        login(target, settings)
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, login in ways.items():
            figures[name].append(round_of(login, target, settings, args.logins))
    print(
        f"ssh_login: {args.logins} serial logins and `true` to {args.host} per round, {args.rounds} rounds "
        "interleaved; medians"
    )
    print(f"{'client':<20} {'CPU ms/login':>12} {'wall ms/login':>13}  rounds' CPU ms")
    medians = {}
    for name, rounds in figures.items():
        medians[name] = statistics.median(cpu for cpu, _ in rounds)
        wall = statistics.median(wall for _, wall in rounds)
        each = ", ".join(f"{cpu:.2f}" for cpu, _ in rounds)
        print(f"{name:<20} {medians[name]:>12.2f} {wall:>13.1f}  {each}")
    igops, baseline = medians["igops (asyncssh)"], medians["paramiko (before)"]
    print(f"paramiko / igops: client CPU {baseline / igops:.2f}x ({baseline - igops:.2f} ms a login)")


if __name__ == "__main__":
    main()
