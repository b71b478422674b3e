"""One command on one fleet host over SSH, as the role changes (igops.failover) run them: its
output or the lines that say why it failed, reading a file and replacing one whole; and the
same call on several hosts (or clusters) at once.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from igops import remote
from igops.errors import RemoteError

if TYPE_CHECKING:
    from igops.inventory import Fleet

T = TypeVar("T")
R = TypeVar("R")


def ssh(fleet: Fleet, host: Any, argv: list[str], timeout: float = 60, stdin: bytes | None = None) -> remote.HostResult:
    [result] = remote.run(
        remote.targets_for(fleet, [host]),
        remote.quote_command(argv),
        remote.settings_for(fleet),
        timeout=timeout,
        stdin=stdin,
    )
    return result


def connect_ahead(fleet: Fleet, hosts: list[Any]) -> None:
    """Log in to `hosts` now, for the commands an operation under remote.keep_connections()
    runs there later (in a pause, where a login would add to it)."""
    remote.connect_ahead(remote.targets_for(fleet, hosts), remote.settings_for(fleet))


def ssh_ok(fleet: Fleet, host: Any, argv: list[str], what: str, timeout: float = 60, stdin: bytes | None = None) -> str:
    result = ssh(fleet, host, argv, timeout, stdin)
    if not result.ok:
        raise RemoteError(f"{host.name}: {what} failed: {failure_reason(result)}")
    return result.stdout


def failure_reason(result: remote.HostResult) -> str:
    """The lines that say why (repmgr and Postgres tools prefix them), else the output's tail."""
    if result.error:
        return result.error
    text = (result.stderr + "\n" + result.stdout).strip()
    said = [
        line.strip()
        for line in text.splitlines()
        if line.lstrip().startswith(("ERROR", "FATAL", "DETAIL", "HINT", "pg_rewind: error", "pg_ctl: "))
    ]
    return (" / ".join(said) or text[-600:] or f"exit {result.exit_code}")[:1200]


def read_file(fleet: Fleet, host: Any, path: str) -> str:
    return ssh_ok(fleet, host, ["cat", path], f"reading {path}", timeout=30)


# A client killed while it sends a file closes the SSH channel, and the remote `cat` takes that
# end of input for the end of the file: without a count, a cut-off run would put an empty or half
# file in place (a PgBouncer databases file without its entries, say). So a file sent on stdin is
# written only once all "$size" bytes came (the script sets size).
def stdin_into(file: str) -> str:
    """Shell that copies stdin into `file` (a shell word) and, unless all "$size" bytes came,
    removes it and fails."""
    return (
        f'cat > {file}; if [ "$(wc -c < {file})" -ne "$size" ]; then rm -f {file}; '
        'echo "igops: the input ended early (the run sending it was cut off); nothing written" >&2; exit 1; fi'
    )


# Written beside the original and renamed over it, so a reader never sees half a file; the new
# file keeps the original's owner and mode, and is on disk before the rename (XFS does not flush
# a file renamed over another on its own: a host that crashed then could come back with it empty).
_REPLACE_FILE = (
    'set -e; size="$2"; tmp="$1.igops-$$"; trap \'rm -f "$tmp"\' EXIT; '
    + stdin_into('"$tmp"')
    + '; chown --reference="$1" "$tmp"; chmod --reference="$1" "$tmp"; sync "$tmp"; mv -f "$tmp" "$1"'
)


def replace_file(fleet: Fleet, host: Any, path: str, text: str) -> None:
    data = text.encode()
    argv = ["sh", "-c", _REPLACE_FILE, "sh", path, str(len(data))]
    ssh_ok(fleet, host, argv, f"writing {path}", timeout=30, stdin=data)


def parallel_map(function: Callable[[T], R], items: list[T]) -> list[R]:
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(16, len(items)), thread_name_prefix="failover") as pool:
        return list(pool.map(function, items))
