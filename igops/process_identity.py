"""Whether the process a record names (a lease's holder, an operation's) still runs, judged from
here: the one place igops decides it may treat another igops as dead without waiting for its
lease to expire.

A host name and a pid alone do not name a process. Containers may share a host name but not
a PID namespace, so a pid that does not exist here may be a live igops in the next container;
and after a reboot or a wrap a dead holder's pid may belong to an unrelated process. So a record
also carries its process's identity (`own()`): the kernel's boot id, the inode of its PID
namespace, and its start time in clock ticks since boot. Only a record of this host, this boot
and this PID namespace is judged; the process is gone when its pid is, or when the process under
that pid started at another time. Anything else, a record without the identity (written by an
older igops, or on a machine without /proc) included, cannot be told from here.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from igops import safety

# The keys of the identity in a record, beside its "host" and "pid".
FIELDS = ("boot_id", "pid_namespace", "process_start")


class Verdict(enum.Enum):
    RUNNING = "running"
    GONE = "gone"
    UNKNOWN = "cannot tell"


def own() -> dict[str, Any]:
    """This process's identity, each part None where this machine cannot tell it."""
    namespace = pid_namespace()
    return {
        "boot_id": boot_id(),
        "pid_namespace": namespace,
        # Read only when /proc numbers processes as this one does (see pid_namespace).
        "process_start": process_start(os.getpid()) if namespace is not None else None,
    }


def judge(record: Mapping[str, Any]) -> Verdict:
    """Whether the process `record` names by its "host", "pid" and identity still runs."""
    pid, boot, namespace, started = (record.get(key) for key in ("pid", *FIELDS))
    if not (
        isinstance(pid, int)
        and pid > 0
        and isinstance(boot, str)
        and isinstance(namespace, int)
        and isinstance(started, int)
    ):
        return Verdict.UNKNOWN
    # The host too, though the boot id alone tells kernels apart: a VM cloned while it runs
    # keeps its boot id, and its clone's igops may well hold the same target.
    if record.get("host") != safety.operator_host() or boot != boot_id() or namespace != pid_namespace():
        return Verdict.UNKNOWN
    if not process_alive(pid):
        return Verdict.GONE
    now_started = process_start(pid)
    if now_started is None:
        return Verdict.UNKNOWN  # hidden from this user (hidepid), or exited just now
    return Verdict.RUNNING if now_started == started else Verdict.GONE


def boot_id() -> str | None:
    """The running kernel's boot id: a new random one at every boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def pid_namespace() -> int | None:
    """The inode of this process's PID namespace, or None when /proc is not this namespace's own
    (a container given its host's /proc): its pids then name other processes than ours do."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When the process started, in clock ticks after boot: field 22 of /proc/<pid>/stat."""
    try:
        # Fields 3 on follow the command's name, which is in parentheses and may hold any of them.
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine. Where /proc tells, a process runs
    while any of its threads does: a killed one that its parent has not reaped yet (a zombie) does
    not, though a signal still reaches it, and a killed multi-threaded one shows its main thread a
    zombie while the others still hold its sockets."""
    if pid <= 0:
        return False
    if not Path("/proc/self/task").is_dir():  # no /proc (a macOS controller)
        return _signal_reaches(pid)
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False
    except OSError:  # hidden from this user (hidepid)
        return _signal_reaches(pid)
    return any(_thread_runs(task) for task in tasks)


def _thread_runs(task: Path) -> bool:
    try:
        state = (task / "stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False  # gone since the listing
    return state not in ("Z", "X")


def _signal_reaches(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
