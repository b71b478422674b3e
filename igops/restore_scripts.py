"""The shell a restore runs on the host it restores onto, and the restored server's layout:
where its data directory lands, how it is started (a socket of its own, settings on its command
line), and how it is all taken away again. igops.restore decides what runs; this says how.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from igops import remote
from igops.errors import RefusedError, RemoteError, UsageError

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host, Postgres


@dataclass
class PostgresStart:
    """Where the restored data directory is and how its server is started."""

    data_directory: str
    wal_links: dict[str, str]  # original mount -> where it is restored, for pg_wal's link
    run_directory: str  # socket, configuration and log of the restored server
    port: int
    bin_dir: str
    os_user: str
    settings: dict[str, str] = field(default_factory=dict)  # more of them: a recovery's

    @property
    def log(self) -> str:
        return f"{self.run_directory}/postgres.log"

    @property
    def status(self) -> str:
        """Succeeds while the restored server runs."""
        return (
            f"runuser -u {shlex.quote(self.os_user)} -- {shlex.quote(self.bin_dir)}/pg_ctl status "
            f"-D {shlex.quote(self.data_directory)} >/dev/null 2>&1"
        )

    @property
    def psql(self) -> str:
        return (
            f"runuser -u {shlex.quote(self.os_user)} -- {shlex.quote(self.bin_dir)}/psql "
            f"-h {shlex.quote(self.run_directory)} -p {self.port} -d postgres"
        )


def postgres_start(fleet: Fleet, group_id: str, source_host: str, restored: dict[str, str], port: int) -> PostgresStart:
    """The restored data directory: the source's, moved from its mount to where that mount is restored."""
    source = fleet.hosts_by_name.get(source_host)
    if source is None:
        raise UsageError(
            f"the group's host {source_host} is not in the inventory",
            "its data directory is found from the inventory's [postgres] data_directory",
        )
    data_directory = PurePosixPath(fleet.path_for(fleet.model.postgres.data_directory, source))
    holder = max((mount for mount in restored if data_directory.is_relative_to(mount)), key=len, default=None)
    if holder is None:
        raise RefusedError(
            f"{source_host}'s data directory {data_directory} is on none of the group's mounts ({', '.join(restored)})",
            "restore a group taken of the data directory's mount",
        )
    moved = PurePosixPath(restored[holder]) / data_directory.relative_to(holder)
    model = fleet.model
    return PostgresStart(
        str(moved),
        {mount: path for mount, path in restored.items() if mount != holder},
        f"{model.snapshot.restore_root.rstrip('/')}/{group_id}.postgres",
        port,
        model.postgres.bin_dir.rstrip("/"),
        model.postgres.os_user,
    )


def host_script(
    fleet: Fleet, host: Host, script: str, what: str, timeout: float = 300, stdin: bytes | None = None
) -> str:
    """What `script` printed on the host (stripped); RemoteError, saying `what` failed, if it did."""
    [target] = remote.targets_for(fleet, [host])
    [done] = remote.run([target], script, remote.settings_for(fleet), timeout=timeout, stdin=stdin)
    if not done.ok:
        raise RemoteError(
            f"{what} on {host.name} failed: {done.error or done.stderr.strip()[-300:] or 'exit ' + str(done.exit_code)}"
        )
    return done.stdout.strip()


def mount_script(devices: list[str], path: str, fstype: str, array_name: str) -> str:
    """Shell for the host: wait for the devices, assemble RAID when there is one, mount.
    A restored XFS carries its source's UUID, which may be mounted on the same host: nouuid."""
    quoted = " ".join(shlex.quote(device) for device in devices)
    lines = [
        "set -e",
        f'for d in {quoted}; do i=0; while [ ! -b "$d" ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done; '
        '[ -b "$d" ] || { echo "device $d did not appear" >&2; exit 1; }; done',
        f"if mountpoint -q {shlex.quote(path)}; then "
        f"echo {shlex.quote(path + ' is already a mount point')} >&2; exit 3; fi",
        f"mkdir -p {shlex.quote(path)}",
    ]
    options = "nouuid" if fstype == "xfs" else "defaults"
    mount = f"mount -t {shlex.quote(fstype)} -o {options}"
    if len(devices) == 1:
        lines.append(f"{mount} {shlex.quote(devices[0])} {shlex.quote(path)}")
        return "\n".join(lines)
    md = shlex.quote("/dev/md/" + "".join(c if c.isalnum() else "-" for c in array_name)[-32:])
    lines += [
        f"mdadm --assemble --run {md} {quoted}",
        # A mount that fails leaves no array assembled over the volumes, which are then detached.
        f"{mount} {md} {shlex.quote(path)} || {{ status=$?; mdadm --stop {md} >/dev/null; exit $status; }}",
    ]
    return "\n".join(lines)


def prepare_script(pg: PostgresStart) -> str:
    """Remove what belonged to the running source, and repoint pg_wal when WAL had a mount of
    its own: its link names the source's WAL mount, which is restored elsewhere."""
    data = shlex.quote(pg.data_directory)
    lines = [
        "set -e",
        f"data={data}",
        '[ -f "$data/PG_VERSION" ] || { echo "no data directory at $data" >&2; exit 1; }',
        'rm -f "$data/postmaster.pid" "$data/standby.signal" "$data/recovery.signal"',
        'if [ -L "$data/pg_wal" ]; then',
        '  wal=$(readlink "$data/pg_wal")',
        '  case "$wal" in',
    ]
    for original, restored in sorted(pg.wal_links.items(), key=lambda item: -len(item[0])):
        prefix = original.rstrip("/")
        lines.append(
            f'    {shlex.quote(prefix)}/*) ln -sfn {shlex.quote(restored.rstrip("/"))}"/${{wal#{prefix}/}}" '
            '"$data/pg_wal" ;;'
        )
    lines += [
        '    /*) [ -d "$wal" ] || { echo "pg_wal points at $wal, which the group does not hold" >&2; exit 3; } ;;',
        "  esac",
        "fi",
    ]
    return "\n".join(lines)


def server_options(pg: PostgresStart) -> str:
    """Command-line settings: they win over postgresql.auto.conf, which the copy carries from its
    source (archiving, replication settings must not act from a restored copy)."""
    run = pg.run_directory
    settings = {
        "config_file": f"{run}/postgresql.conf",
        "hba_file": f"{run}/pg_hba.conf",
        "ident_file": f"{run}/pg_ident.conf",
        "port": str(pg.port),
        "listen_addresses": "",
        "unix_socket_directories": run,
        "archive_mode": "off",
        "hot_standby": "on",
        # Replay reads the pages the WAL touches from volumes fresh from snapshots, whose blocks
        # arrive on first read: many reads in flight hide that latency (the copy is nobody's).
        "recovery_prefetch": "on",
        "maintenance_io_concurrency": "64",
        **pg.settings,
    }
    # pg_ctl hands -o to a shell: each value is quoted for it.
    return " ".join(f"-c {name}={shlex.quote(value)}" for name, value in settings.items())


# Settings a server replaying WAL must hold at no less than the primary that wrote it, or
# recovery aborts ("insufficient parameter settings"): pg_control records the primary's, under
# these names.
_REQUIRED_AT_LEAST = {
    "max_connections setting": "max_connections",
    "max_worker_processes setting": "max_worker_processes",
    "max_wal_senders setting": "max_wal_senders",
    "max_prepared_xacts setting": "max_prepared_transactions",
    "max_locks_per_xact setting": "max_locks_per_transaction",
}


def start_script(pg: PostgresStart) -> str:
    run, user, log = shlex.quote(pg.run_directory), shlex.quote(pg.os_user), shlex.quote(pg.log)
    data = shlex.quote(pg.data_directory)
    as_user = f"runuser -u {user} -- env -C /"
    awk = " ".join(f'$1=="{label}"{{printf " -c {name}=%d", $2}}' for label, name in _REQUIRED_AT_LEAST.items())
    return "\n".join(
        [
            "set -e",
            f"mkdir -p {run}",
            f"chown {user} {run}",
            f"chmod 0700 {run}",
            f"printf '# the restored copy: every setting is on its command line\\n' > {run}/postgresql.conf",
            f"printf 'local all {pg.os_user} peer\\n' > {run}/pg_hba.conf",
            f": > {run}/pg_ident.conf",
            f"chown {user} {run}/postgresql.conf {run}/pg_hba.conf {run}/pg_ident.conf",
            f"required=$({as_user} {shlex.quote(pg.bin_dir + '/pg_controldata')} -D {data} | "
            f"awk -F': *' {shlex.quote(awk)})",
            f"{as_user} {shlex.quote(pg.bin_dir + '/pg_ctl')} -D {data} "
            f'-o {shlex.quote(server_options(pg))}"$required" -l {log} -w -t 300 start >/dev/null '
            # The cause is the server's FATAL or PANIC line, not the shutdown lines after it.
            f"|| {{ grep -E 'FATAL|PANIC' {log} | tail -n 2 >&2 || tail -n 3 {log} >&2; exit 1; }}",
        ]
    )


# Mounts (major:minor, then mount point) of the filesystems on the devices whose major:minor
# numbers `ours` lists (space-separated, space-bounded), the newest first: the order to unmount
# them in, a mount stacked on another before it. /proc/self/mountinfo escapes a mount point's
# space, tab, newline and backslash as octal (\040); they are turned back here.
_MOUNTS_OF = r"""index(ours, " " $3 " ") {
  p = $5; m = ""
  while (match(p, /\\[0-7][0-7][0-7]/)) {
    c = substr(p, RSTART + 1, 1) * 64 + substr(p, RSTART + 2, 1) * 8 + substr(p, RSTART + 3, 1)
    m = m substr(p, 1, RSTART - 1) sprintf("%c", c)
    p = substr(p, RSTART + 4)
  }
  found[n++] = $3 " " m p
}
END { while (n) print found[--n] }"""


def teardown_script(
    data_directory: str | None,
    run_directory: str,
    devices: list[str],
    mounted: list[str],
    restore_root: str,
    postgres: Postgres,
) -> str:
    """Shell for the host: stop the restored server, then take every filesystem on the restore's
    volumes off the host, wherever it is mounted and whether or not a tag says so.

    `devices`: where the volumes are attached (EBS names them; on the host the name may be a
    link, /dev/sdf -> /dev/nvme1n1). A mount is the restore's when its filesystem is on one of
    them, or on an md array holding one of them: the kernel's device numbers say so, never a
    path; the arrays are stopped once unmounted. A mount at a path `mounted` names but of
    another device is no business of the restore's and stays. The script fails while anything
    still holds a device, so that no volume is detached from under it. Mount points emptied here,
    and those of `mounted`, are removed, with their emptied parents up to the restore root."""
    lines = []
    if data_directory:
        # Only a server this restore started: its postmaster.pid names our socket directory (line
        # 5). The one copied from the source names the source's, and its PID is no process of ours.
        data = shlex.quote(data_directory)
        lines.append(
            f'if [ -f {data}/postmaster.pid ] && [ "$(sed -n 5p {data}/postmaster.pid)" = '
            f"{shlex.quote(run_directory)} ]; then runuser -u {shlex.quote(postgres.os_user)} -- "
            f"env -C / {shlex.quote(postgres.bin_dir.rstrip('/') + '/pg_ctl')} -D {data} -m fast -w -t 60 "
            "stop >/dev/null; fi"
        )
    # Remove an emptied mount point and its empty parents, never above the restore root.
    climb = 'while [ "${d#"$root"/}" != "$d" ] && rmdir "$d" 2>/dev/null; do d=$(dirname "$d"); done'
    lines += [
        f"root={shlex.quote(restore_root.rstrip('/'))}",
        f"mounts_of={shlex.quote(_MOUNTS_OF)}",
        "ours=' '; arrays=' '; blocks=''",
        f"for d in {' '.join(shlex.quote(device) for device in devices)}; do",
        # Not on the host (never appeared, or gone): nothing can be mounted from it.
        '  dev=$(readlink -f "$d") && [ -b "$dev" ] || continue',
        '  b=/sys/class/block/${dev##*/}; blocks="$blocks $b"; ours="$ours$(cat "$b/dev") "',
        '  for p in "$b/${b##*/}"*; do [ ! -e "$p/partition" ] || ours="$ours$(cat "$p/dev") "; done',
        '  for h in "$b"/holders/md*; do',
        '    [ -e "$h/dev" ] || continue',
        '    case "$arrays" in *" ${h##*/} "*) ;; *) arrays="$arrays${h##*/} "; ours="$ours$(cat "$h/dev") " ;; esac',
        "  done",
        "done",
        'mounts=$(awk -v ours="$ours" "$mounts_of" /proc/self/mountinfo)',
        "printf '%s\\n' \"$mounts\" | while IFS= read -r line; do",
        '  [ -n "$line" ] || continue',
        "  mm=${line%% *}; m=${line#* }",
        # Gone with another one's unmount (a shared subtree's copy of a mount): nothing to do.
        '  awk -v ours=" $mm " "$mounts_of" /proc/self/mountinfo | grep -qxF "$line" || continue',
        # umount takes the topmost mount at a path: it must be ours.
        '  [ "$(mountpoint -d "$m" 2>/dev/null)" = "$mm" ] || '
        "{ printf '%s\\n' \"$m: the restore's filesystem there is under another mount\" >&2; exit 1; }",
        '  umount "$m"',
        f"  d=$m; {climb}",
        "done",
        'for a in $arrays; do mdadm --stop "/dev/$a" >/dev/null; done',
        'for b in $blocks; do [ -z "$(ls "$b/holders")" ] || '
        '{ echo "${b##*/} is still held by $(ls "$b/holders"): not detached" >&2; exit 1; }; done',
    ]
    for path in mounted:
        # Only emptied: another filesystem mounted there stays (rmdir fails on a mount point).
        lines.append(f"d={shlex.quote(path)}; {climb}")
    lines.append(f"rm -rf {shlex.quote(run_directory)}")
    return "\n".join(["set -e", *lines])
