"""Real OpenSSH servers on loopback addresses, for the lab, the tests and the benchmarks.

One sshd listens on at most 16 addresses (OpenSSH's MAX_LISTEN_SOCKS), so larger sets of
targets are served by several daemons sharing one host key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
MAX_ADDRESSES_PER_DAEMON = 16


@dataclass(frozen=True)
class SshKeys:
    host_key: Path
    client_key: Path
    known_hosts: Path
    authorized_keys: Path


def ensure_keys(directory: Path) -> SshKeys:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    host_key = directory / "ssh_host_ed25519_key"
    client_key = directory / "id_ed25519"
    for key, comment in ((host_key, "igops-lab-host"), (client_key, "igops-lab-client")):
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)], check=True)
    authorized = directory / "authorized_keys"
    authorized.write_text((client_key.with_suffix(".pub")).read_text())
    authorized.chmod(0o600)
    return SshKeys(host_key, client_key, directory / "known_hosts", authorized)


def write_known_hosts(keys: SshKeys, endpoints: list[tuple[str, int]]) -> None:
    key_type, key_data = keys.host_key.with_suffix(".pub").read_text().split()[:2]
    lines = [f"{address if port == 22 else f'[{address}]:{port}'} {key_type} {key_data}" for address, port in endpoints]
    keys.known_hosts.write_text("\n".join(lines) + "\n")


def config_text(
    keys: SshKeys,
    addresses: list[str],
    port: int,
    pid_file: Path,
    root_home: Path,
    user_keys: str | None = None,
    use_pam: bool = False,
) -> str:
    """`root_home`: HOME for root's sessions. The targets stand for hosts of their own, and
    each real host has its own /root; this machine's root shell startup (~/.bashrc, which bash
    reads for every SSH command) would otherwise run in every session, and a developer's
    (pyenv's, say) costs several times the login itself and puts its tools first on PATH.
    `user_keys`: a further authorized-keys path with sshd's %u (user name) token, for keys
    that may log in as one user only. sshd reads it as that user, so it must be readable
    by them. `use_pam`: as Debian's own sshd does; without PAM, sshd refuses key logins to
    accounts whose password is locked, such as the postgres system user."""
    listen = "\n".join(f"ListenAddress {address}:{port}" for address in addresses)
    key_files = f"{keys.authorized_keys} {user_keys}" if user_keys else str(keys.authorized_keys)
    return f"""{listen}
HostKey {keys.host_key}
PidFile {pid_file}
AuthorizedKeysFile {key_files}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM {"yes" if use_pam else "no"}
StrictModes no
UseDNS no
PrintMotd no
MaxStartups 512
MaxSessions 64
LogLevel ERROR
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
Match User root
    SetEnv HOME={root_home}
"""


def start(
    directory: Path,
    name: str,
    keys: SshKeys,
    addresses: list[str],
    port: int,
    env: dict[str, str] | None = None,
    user_keys: str | None = None,
    use_pam: bool = False,
) -> int:
    """Start (or keep) an sshd called `name` on `addresses`; returns its pid. `env` is added
    to the daemon's environment (the lab marks its processes this way); `user_keys` and
    `use_pam` are as for `config_text`."""
    if len(addresses) > MAX_ADDRESSES_PER_DAEMON:
        raise ValueError(f"one sshd listens on at most {MAX_ADDRESSES_PER_DAEMON} addresses")
    pid_file = directory / f"sshd-{name}.pid"
    config = directory / f"sshd-{name}.conf"
    root_home = directory / "root-home"
    root_home.mkdir(mode=0o700, exist_ok=True)
    text = config_text(keys, addresses, port, pid_file, root_home, user_keys, use_pam)
    running = running_pid(pid_file)
    if running and config.exists() and config.read_text() == text:
        return running
    if running:
        stop(directory, name)
    config.write_text(text)
    Path("/run/sshd").mkdir(exist_ok=True, mode=0o755)
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
    subprocess.run(
        [SSHD, "-f", str(config), "-E", str(directory / f"sshd-{name}.log")],
        check=True,
        env={**os.environ, **(env or {})},
    )
    for _ in range(100):
        pid = running_pid(pid_file)
        if pid:
            return pid
        time.sleep(0.02)
    raise RuntimeError(f"sshd {name} did not start; see {directory / f'sshd-{name}.log'}")


def stop(directory: Path, name: str) -> None:
    pid_file = directory / f"sshd-{name}.pid"
    pid = running_pid(pid_file)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.02)
    pid_file.unlink(missing_ok=True)


def running_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an sshd exited but not yet reaped)."""
    from igops.process_identity import process_alive

    if not process_alive(pid):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
