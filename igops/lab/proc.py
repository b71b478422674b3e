"""Running the lab's commands and daemons.

Daemons run detached (own session, output to a log file) with a pid file, so a later `down`
finds them from a different process. Every one carries MARKER_ENV, so processes whose pid
files a killed run never wrote are still found and stopped.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igops.errors import IgopsError, RefusedError
from igops.lab.state import BUILD_MARKER_ENV, MARKER_ENV, state_dir
from igops.process_identity import process_alive as alive
from igops.remote import SYSTEM_PATH

STOP_GRACE = 8.0


class LabError(IgopsError):
    """A lab component could not be built or started."""


def run(
    argv: Sequence[str | Path],
    *,
    user: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    starts_daemon: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a failure raises LabError carrying its output's tail.
    `starts_daemon`: the command leaves a daemon behind (pg_ctl start), which must not carry
    the build marker."""
    marked = dict(env or {})
    if not starts_daemon:
        marked[BUILD_MARKER_ENV] = str(state_dir())
    try:
        result = subprocess.run(
            [str(arg) for arg in argv],
            capture_output=True,
            text=True,
            env=_environment(marked, user),
            cwd=cwd,
            timeout=timeout,
            input=input,
            **_as_user(user),
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"`{_show(argv)}` did not finish within {timeout:g} s") from None
    if check and result.returncode != 0:
        raise LabError(f"`{_show(argv)}` failed (exit {result.returncode}): {_tail(result.stderr or result.stdout)}")
    return result


def _show(argv: Sequence[str | Path]) -> str:
    return shlex.join(str(arg) for arg in argv)


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "no output"


def _as_user(user: str | None) -> dict[str, Any]:
    if not user:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _environment(extra: dict[str, str] | None, user: str | None) -> dict[str, str]:
    # The system PATH, as init gives a daemon, never the PATH of whoever ran `igops lab up`: a
    # version manager's shims there (pyenv) made every `#!/usr/bin/env python3` a munin plugin
    # runs cost a shell script and some 100 ms of CPU, which no real host pays.
    env = {key: value for key, value in os.environ.items() if key in ("LANG", "LC_ALL", "TZ") or key.startswith("LC_")}
    env["PATH"] = SYSTEM_PATH
    env.setdefault("LANG", "C.UTF-8")
    if user:
        entry = pwd.getpwnam(user)
        env.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)
    else:
        env["HOME"] = os.environ.get("HOME", "/root")
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class Daemon:
    name: str
    argv: tuple[str, ...]
    pid_file: Path
    log_file: Path
    endpoint: tuple[str, int] | None = None
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    cwd: Path | None = None
    # True when the daemon writes pid_file itself (nginx, gunicorn, munin-node): some refuse to
    # start over a pid file naming a live process, their own included.
    writes_pid_file: bool = False
    # An HTTP path that must answer 200 before the daemon counts as started (a web app
    # listens before its first request has loaded its code).
    health_path: str | None = None
    # Files whose content, with argv and env, decides whether a running daemon is current:
    # when any of them changes, `start` restarts it.
    config_files: tuple[Path, ...] = ()
    # The config files' text without the settings the daemon takes while it runs (igops changes
    # a Redis role with REPLICAOF and rewrites the file to match): those need no restart.
    without_live_settings: Callable[[str], str] | None = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256(repr((self.argv, self.env, self.user)).encode())
        for path in self.config_files:
            text = path.read_bytes()
            if self.without_live_settings:
                text = self.without_live_settings(text.decode()).encode()
            digest.update(text)
        return digest.hexdigest()


def start(daemon: Daemon, state_root: Path, timeout: float = 30) -> int:
    """Start the daemon unless it already runs with the same configuration; wait until its
    endpoint accepts connections."""
    stamp = daemon.pid_file.with_name(daemon.pid_file.name + ".config")
    fingerprint = daemon.fingerprint()
    pid = running_pid(daemon.pid_file, state_root)
    if pid and (not stamp.exists() or stamp.read_text() != fingerprint):
        terminate([pid])
        pid = None
    if pid:
        if daemon.endpoint:
            wait_for_port(*daemon.endpoint, timeout=timeout, pid=pid, log_file=daemon.log_file, what=daemon.name)
        return pid
    daemon.pid_file.unlink(missing_ok=True)
    if daemon.endpoint:
        ensure_free(*daemon.endpoint, what=daemon.name)
    daemon.log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(daemon.env)
    env[MARKER_ENV] = str(state_root)
    with open(daemon.log_file, "ab") as log:
        process = subprocess.Popen(
            list(daemon.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=_environment(env, daemon.user),
            cwd=daemon.cwd,
            close_fds=True,
            **_as_user(daemon.user),
        )
    if not daemon.writes_pid_file:
        daemon.pid_file.write_text(f"{process.pid}\n")
    stamp.write_text(fingerprint)
    if daemon.endpoint:
        wait_for_port(*daemon.endpoint, timeout=timeout, pid=process.pid, log_file=daemon.log_file, what=daemon.name)
        if daemon.health_path:
            wait_for_http(*daemon.endpoint, daemon.health_path, timeout=timeout, what=daemon.name)
    return process.pid


def terminate(pids: list[int], grace: float = STOP_GRACE, sig: int = signal.SIGTERM) -> None:
    """Signal, then wait up to `grace` seconds and SIGKILL whatever is left."""
    for pid in pids:
        send_signal(pid, sig)
    wait_or_kill(pids, grace)


def wait_or_kill(pids: list[int], grace: float) -> None:
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            send_signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def lab_pids(state_root: Path) -> list[int]:
    """Every live process of the lab rooted at `state_root`: those carrying its marker, and
    those whose working directory or open files lie under it (daemons that rewrite their
    environment for their process titles, such as postgres and nginx, still log there)."""
    spared = _ancestors()
    return [pid for pid in _pids() if pid not in spared and belongs(pid, state_root)]


def build_pids(state_root: Path) -> list[int]:
    """Live one-off build commands (see BUILD_MARKER_ENV) of the lab at `state_root`."""
    wanted = f"{BUILD_MARKER_ENV}={state_root}".encode()
    found = []
    for pid in _pids():
        try:
            if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") and alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


def belongs(pid: int, state_root: Path) -> bool:
    """True for a live process the lab started, or a child one forked (munin-node forks a
    child per connection that holds the listening socket and renames itself)."""
    return _started_by_the_lab(pid, state_root) or _started_by_the_lab(_parent(pid), state_root)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _started_by_the_lab(pid: int, state_root: Path) -> bool:
    if pid <= 1:
        return False
    proc = Path(f"/proc/{pid}")
    try:
        if f"{MARKER_ENV}={state_root}".encode() in (proc / "environ").read_bytes().split(b"\0"):
            return alive(pid)
        prefix = f"{state_root}/"
        links = [proc / "cwd"] + list((proc / "fd").iterdir())
    except OSError:
        return False
    for link in links:
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith(prefix) or target == str(state_root):
            return alive(pid)
    return False


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _ancestors() -> set[int]:
    """This process and its parents, which may hold the lab's lock or logs open."""
    chain, pid = set(), os.getpid()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return chain


def running_pid(pid_file: Path, state_root: Path | None = None) -> int | None:
    """The live process a pid file names; with `state_root`, only if it is the lab's (a pid
    file that outlived a reboot may name an unrelated process)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not alive(pid) or (state_root is not None and not belongs(pid, state_root)):
        return None
    return pid


def answers(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    address: str,
    port: int,
    *,
    timeout: float,
    pid: int | None = None,
    log_file: Path | None = None,
    what: str = "service",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(address, port, timeout=0.5):
            return
        if pid is not None and not alive(pid):
            raise LabError(f"{what} exited during start-up" + _log_hint(log_file))
        time.sleep(0.05)
    raise LabError(f"{what} did not listen on {address}:{port} within {timeout:g} s" + _log_hint(log_file))


def wait_for_http(address: str, port: int, path: str, *, timeout: float, what: str) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(address, port, timeout=max(0.5, deadline - time.monotonic()))
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read(300).decode(errors="replace")
            if response.status == 200:
                return
            last = f"HTTP {response.status}: {body}"
        except OSError as exc:
            last = str(exc)
        finally:
            connection.close()
        time.sleep(0.2)
    raise LabError(f"{what}: GET {path} did not answer 200 within {timeout:g} s ({last})")


def _log_hint(log_file: Path | None) -> str:
    if not log_file or not log_file.exists():
        return ""
    return f": {_tail(log_file.read_text(errors='replace'), 2)} (log: {log_file})"


def ensure_free(address: str, port: int, what: str) -> None:
    """Refuse when another program listens on an address the lab needs."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((address, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        holders = [
            holder
            for (host, listening_port), found in listeners().items()
            if listening_port == port and host in (address, "0.0.0.0", "*", "[::]")
            for holder in found
        ]
        named = f" by {', '.join(f'{name} (pid {pid})' for pid, name in holders)}" if holders else ""
        raise RefusedError(
            f"{address}:{port} (for the lab's {what}) is already in use{named}",
            "stop that program or run `igops lab down` if it is a lab left over",
        ) from None
    finally:
        probe.close()


def listeners() -> dict[tuple[str, int], list[tuple[int, str]]]:
    """Listening TCP sockets: (address, port) -> [(pid, program)]."""
    output = run(["ss", "-Hltnp"], check=False).stdout
    found: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        host, _, port = fields[3].rpartition(":")
        holders = [(int(pid), name) for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line)]
        found.setdefault((host, int(port)), []).extend(holders)
    return found
