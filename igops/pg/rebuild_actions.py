"""The steps that rebuild a standby in place from a snapshot group (`igops snapshot restore
--in-place`, planned by igops.restore_in_place): its volumes out, volumes made from the group in
at the same mount points, its data made a standby's again, started and following the primary.
The volumes taken out are kept, detached and tagged, for whoever decides to delete them; until
the volumes made take over their tags, an abort puts them back.

Every step finds what it works on from tags (the group, the host, the mount), so that a resume or
an abort needs nothing but the journaled arguments.
"""

from __future__ import annotations

import shlex
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops import postgres
from igops.errors import IgopsError
from igops.host_commands import ssh_ok
from igops.pg import archive
from igops.pg.cluster import cluster_of
from igops.pg.hostcmd import (
    POSTMASTER_RUNNING,
    WAIT_STOPPED,
    data_directory,
    postgres_sh,
    repmgr_argv,
    start_unless_answering,
)
from igops.pg.timeouts import REJOIN_TIMEOUT, STOP_TIMEOUT
from igops.restore_scripts import host_script, mount_script
from igops.snapshot_groups import TAG_FSTYPE, TAG_GROUP, TAG_HOST, TAG_MOUNT, SnapshotGroup, find_group

if TYPE_CHECKING:
    from igops.ebs import Ebs
    from igops.inventory import Fleet

TAG_REBUILDS = "igops:rebuilds"  # on a volume made for an in-place rebuild: the host it rebuilds
TAG_REPLACED_BY = "igops:replaced-by"  # on a volume taken out: the group whose volume replaced it
TAG_REPLACED_ON = "igops:replaced-on"  # ... and the host:mount it was taken out of
TAG_REPLACED_AT = "igops:replaced-at"
# Tags a volume made for a rebuild keeps of its own when it takes over the old one's.
_OWN_TAGS = (TAG_GROUP, TAG_HOST, TAG_MOUNT, TAG_FSTYPE)


def made_for(ebs: Ebs, group_id: str, node: str, mount: str) -> list[dict[str, Any]]:
    """The volumes an in-place rebuild of `node` made from `group_id` for `mount`. One a later
    rebuild (from another group) took out again is kept for that one, and no longer counts: a
    rebuild from this group again makes a volume of its own, and its undo never deletes that one."""
    from igops.ebs import tags_of

    return [
        volume
        for volume in ebs.volumes({TAG_GROUP: group_id, TAG_REBUILDS: node})
        if tags_of(volume).get(TAG_MOUNT) == mount and TAG_REPLACED_BY not in tags_of(volume)
    ]


# Unmount only what is mounted there; a mount that stays busy fails the step and names its users.
_UNMOUNT = (
    'mount="$1"; mountpoint -q "$mount" || exit 0; umount "$mount" && exit 0; '
    'echo "$mount is busy" >&2; ! command -v fuser >/dev/null || fuser -vm "$mount" 2>&1 | tail -n 5 >&2; exit 1'
)

# fstab's entry for the mount point (its other fields kept) names the filesystem now there by
# UUID; a host with no entry for it is left alone (it mounts it some other way). Each file
# rewritten here is synced before it is renamed over the old one: XFS does not flush a file
# renamed over another, and a host that crashed then would find it empty.
_FSTAB = (
    'set -e; fstab="$1"; mount="$2"; device="$3"; [ -f "$fstab" ] || exit 0; '
    'uuid=$(blkid -o value -s UUID "$device"); [ -n "$uuid" ] || { echo "no UUID on $device" >&2; exit 1; }; '
    'awk -v m="$mount" -v u="UUID=$uuid" \'BEGIN{OFS="\\t"} !/^[ \\t]*#/ && $2 == m {$1 = u; found=1} {print} '
    'END{exit !found}\' "$fstab" > "$fstab.igops" && sync "$fstab.igops" && mv "$fstab.igops" "$fstab" '
    '&& echo "UUID=$uuid" '
    '|| { rm -f "$fstab.igops"; echo "no entry"; }'
)


# What the undo of a start prints when no postmaster runs (see stop_rebuilt).
NOT_RUNNING = "no postmaster runs"

# The rebuilt data's restore_command, for its catch-up: the archive's, the one the data had (or
# none) kept beside it first, once (a rerun keeps the first), to be put back once it streams.
_SAVED_RESTORE = '"$data/igops-rebuild.restore_command"'
_SET_CATCH_UP_RESTORE = (
    f'set -e; data="$1"; setting="$2"; auto="$data/postgresql.auto.conf"; saved={_SAVED_RESTORE}; touch "$auto"; '
    '[ -e "$saved" ] || { grep "^restore_command" "$auto" > "$saved" || true; chown --reference="$data" "$saved"; }; '
    '{ grep -v "^restore_command" "$auto" || true; printf "%s\n" "$setting"; } > "$auto.igops"; '
    'sync "$auto.igops"; mv "$auto.igops" "$auto"'
)
# ... and put back: the data's own line, or none (the line kept is gone last, so a rerun of an
# interrupted put-back does it again).
_PUT_BACK_RESTORE = (
    f'set -e; data="$1"; auto="$data/postgresql.auto.conf"; saved={_SAVED_RESTORE}; '
    '[ -e "$saved" ] || { echo "put back already"; exit 0; }; '
    '{ grep -v "^restore_command" "$auto" || true; cat "$saved"; } > "$auto.igops"; '
    'chown --reference="$data" "$auto.igops"; chmod 600 "$auto.igops"; sync "$auto.igops"; mv "$auto.igops" "$auto"; '
    'if [ -s "$saved" ]; then echo "its own again"; else echo "none, as its data had"; fi; rm -f "$saved"'
)

# What a volume a rebuild took out is named: its name before, and this.
REPLACED_SUFFIX = " (replaced)"

# How long a rebuilt standby may take to stream on its own before repmgr is asked to point it.
FOLLOW_GRACE_S = 10.0


class RebuildActions:
    """Rebuilding a standby from a group (mixed into igops.pg.actions.PgActions: `fleet` and
    `_host` are PgActions')."""

    fleet: Fleet

    if TYPE_CHECKING:  # PgActions' own (RejoinActions')

        def _host(self, name: str) -> Any: ...

        def follow(self, node: str, primary: str) -> None: ...

        def streaming_replica(self, node: str, primary: str) -> postgres.Replica | None: ...

    _ebs_client: Ebs | None = None

    def _ebs(self) -> Ebs:
        if self._ebs_client is None:
            from igops.ebs import Ebs

            self._ebs_client = Ebs(self.fleet)
        return self._ebs_client

    def wait_stopped(self, node: str) -> str:
        # As the postgres user: pg_ctl refuses to run as root, and no one else may read the data
        # directory, so as anyone else the test found no postmaster at once and waited for none.
        fleet, host = self.fleet, self._host(node)
        script = 'bin="$1"; data="$2"; wait="$3"; ' + WAIT_STOPPED
        wait = str(int(STOP_TIMEOUT * 10))
        argv = postgres_sh(fleet, script, fleet.model.postgres.bin_dir, data_directory(fleet, host), wait)
        ssh_ok(fleet, host, argv, "waiting for Postgres to stop", timeout=STOP_TIMEOUT + 30)
        return "stopped"

    def swap_out(self, node: str, mount: str, volume_id: str, group_id: str) -> str:
        # Tagged first: a run cut off once the volume is unmounted finds it by its tags, not at
        # its mount any more (the plan then detaches it if it is still attached).
        ebs = self._ebs()
        ebs.tag(
            [volume_id],
            {
                TAG_REPLACED_BY: group_id,
                TAG_REPLACED_ON: f"{node}:{mount}",
                TAG_REPLACED_AT: datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        host_script(self.fleet, self._host(node), _sh(_UNMOUNT, mount), f"unmounting {mount}")
        ebs.detach(volume_id)
        return f"{volume_id} detached, kept"

    def swap_back(self, node: str, mount: str, volume_id: str, group_id: str) -> str:
        from igops.ebs import tags_of

        host = self._host(node)
        ebs = self._ebs()
        attached = {a.volume_id: a.device for a in ebs.instance_volumes(host.instance_id)}
        device = attached.get(volume_id) or ebs.attach(volume_id, host.instance_id)
        # Attached and mounted already, or still attached after its unmount (a run cut off there).
        if volume_id not in attached or self._mounted_volume(node, mount) != volume_id:
            fstype = _fstype(find_group(ebs, group_id), mount)
            host_script(self.fleet, host, mount_script([device], mount, fstype, mount), f"mounting {mount}")
        ebs.untag([volume_id], [TAG_REPLACED_BY, TAG_REPLACED_ON, TAG_REPLACED_AT])
        name = tags_of(ebs.volume(volume_id) or {}).get("Name", "")
        if name.endswith(REPLACED_SUFFIX):  # renamed by a tag step the run reached: in use again
            ebs.tag([volume_id], {"Name": name.removesuffix(REPLACED_SUFFIX)})
        return f"{volume_id} back at {mount}"

    def keep_taken_out(self, node: str, group_id: str, taken_out: tuple[tuple[str, str, str], ...]) -> str:
        """The volumes an earlier run took out, made this run's to put back (the step's undo,
        put_back_taken_out): each is still there, attached to no other instance. If one is not,
        the step fails before anything changed, and its undo refuses as well."""
        volumes = self._taken_out_volumes(node, group_id, taken_out)
        return ", ".join(f"{volume_id} ({mount}) {volumes[volume_id]['State']}" for mount, _, volume_id in taken_out)

    def put_back_taken_out(self, node: str, group_id: str, taken_out: tuple[tuple[str, str, str], ...]) -> str:
        """The undo of keep_taken_out: the member stopped if it runs; at each mount, the volume
        made from the group unmounted and deleted, the one taken out attached again and mounted;
        then the member started on them, unless it runs and answers. Refused before any of it if
        one of those taken out cannot come back: the volumes made stay where they are then, rather
        than a mount left with neither."""
        self._taken_out_volumes(node, group_id, taken_out)
        said = [self.stop_rebuilt(node)]
        for mount, snapshot_id, volume_id in taken_out:
            self.discard_rebuilt(node, mount, snapshot_id, group_id)
            said.append(self.swap_back(node, mount, volume_id, group_id))
        return "; ".join([*said, self.start_standby(node)])

    def _taken_out_volumes(
        self, node: str, group_id: str, taken_out: tuple[tuple[str, str, str], ...]
    ) -> dict[str, dict[str, Any]]:
        """volume id -> the volume, for each taken out; refused if one is gone, or attached to
        another instance (it is not this host's to mount)."""
        ebs = self._ebs()
        instance_id = self._host(node).instance_id
        found: dict[str, dict[str, Any]] = {}
        problems = []
        for mount, _, volume_id in taken_out:
            volume = ebs.volume(volume_id)
            elsewhere = [
                attachment["InstanceId"]
                for attachment in (volume or {}).get("Attachments") or []
                if attachment.get("InstanceId") != instance_id
            ]
            if volume is None:
                problems.append(f"{volume_id} (taken out of {mount}) is gone")
            elif elsewhere:
                problems.append(f"{volume_id} (taken out of {mount}) is attached to {elsewhere[0]}")
            else:
                found[volume_id] = volume
        if problems:
            raise IgopsError(
                f"{'; '.join(problems)}: nothing can put {node}'s old volumes back, so nothing was changed",
                f"detach a volume attached elsewhere and try again; or finish the rebuild: "
                f"igops snapshot restore {group_id} --onto {node} --in-place --yes",
            )
        return found

    def volume_from_group(self, node: str, mount: str, snapshot_id: str, group_id: str) -> str:
        host = self._host(node)
        ebs = self._ebs()
        made = made_for(ebs, group_id, node, mount)
        if made:  # an earlier run of this step made it: attach that one
            volume_id = made[0]["VolumeId"]
        else:
            group = find_group(ebs, group_id)
            volume_id = ebs.create_volume(
                snapshot_id,
                ebs.availability_zone(host.instance_id),
                {
                    TAG_GROUP: group_id,
                    TAG_MOUNT: mount,
                    TAG_HOST: group.host,
                    TAG_FSTYPE: _fstype(group, mount),
                    TAG_REBUILDS: node,
                    "Name": f"{node} {mount} from {group_id}",
                },
            )
        if not made or not made[0].get("Attachments"):
            device = ebs.attach(volume_id, host.instance_id)
            return f"{volume_id} at {device}"
        return f"{volume_id}, attached already"

    def discard_rebuilt(self, node: str, mount: str, snapshot_id: str, group_id: str) -> str:
        host = self._host(node)
        ebs = self._ebs()
        made = made_for(ebs, group_id, node, mount)
        if not made:
            return "none was made"
        if self._mounted_volume(node, mount) in {volume["VolumeId"] for volume in made}:
            host_script(self.fleet, host, _sh(_UNMOUNT, mount), f"unmounting {mount}")
        for volume in made:
            ebs.detach(volume["VolumeId"])
            ebs.delete_volume(volume["VolumeId"])
        return "deleted " + ", ".join(volume["VolumeId"] for volume in made)

    def mount_rebuilt(self, node: str, mount: str, snapshot_id: str, group_id: str) -> str:
        from igops.ebs import tags_of

        host = self._host(node)
        made = made_for(self._ebs(), group_id, node, mount)
        attachments = [a for volume in made for a in volume.get("Attachments") or []]
        if not attachments:
            raise IgopsError(f"no volume made from {snapshot_id} is attached to {node}", "run the rebuild again")
        device = attachments[0]["Device"]
        fstype = tags_of(made[0]).get(TAG_FSTYPE, "xfs")
        if self._mounted_volume(node, mount) != made[0]["VolumeId"]:
            host_script(self.fleet, host, mount_script([device], mount, fstype, mount), f"mounting {mount}")
        fstab = self.fleet.path_for(self.fleet.model.snapshot.fstab, host)
        entry = (
            host_script(self.fleet, host, _sh(_FSTAB, fstab, mount, device), f"pointing {fstab} at {mount}")
            or "no entry"
        )
        return f"{device} at {mount}; {fstab}: " + (f"{mount} is {entry}" if entry != "no entry" else "no entry for it")

    def prepare_rebuilt(self, node: str, group_id: str) -> str:
        """The data a standby's again: no postmaster.pid or recovery.signal, standby.signal (it can
        never start as a primary), and restore_command from the archive (the WAL since the group
        may be gone from the primary). The group froze every mount at one instant, so its copy is
        what a crash of that member would have left: it starts as a standby from its last
        restartpoint, as after a crash, with no backup_label (which a second start would misread)."""
        host = self._host(node)
        group = find_group(self._ebs(), group_id)
        data = data_directory(self.fleet, host)
        user = self.fleet.model.postgres.os_user
        cluster = group.wal.cluster if group.wal else cluster_of(self.fleet, node)
        lines = [
            "set -e",
            f"data={shlex.quote(data)}",
            'rm -f "$data/postmaster.pid" "$data/recovery.signal"',
            ': > "$data/standby.signal"',
        ]
        done = ["standby.signal"]
        if cluster and self.fleet.model.archive is not None:
            setting = f"restore_command = {_conf_literal(archive.restore_command(self.fleet, cluster, host))}"
            lines.append(_sh(_SET_CATCH_UP_RESTORE, data, setting))
            done.append("restore_command")
        written = " ".join(f'"$data/{name}"' for name in ("standby.signal", "postgresql.auto.conf"))
        lines.append(f'for f in {written}; do [ ! -e "$f" ] || chown {shlex.quote(user)} "$f"; done')
        host_script(self.fleet, host, "\n".join(lines), "preparing the data directory")
        return ", ".join(done)

    def put_back_restore_command(self, node: str) -> str:
        """The restore_command the rebuilt data had (or none), now that it streams: the archive's
        served its catch-up, and a promotion with one asks the archive for timeline history
        files (some 250 ms of a switchover's write pause in the lab) where the member had not."""
        host = self._host(node)
        said = host_script(
            self.fleet, host, _sh(_PUT_BACK_RESTORE, data_directory(self.fleet, host)), "putting back restore_command"
        )
        connection = postgres.connect(self.fleet, host)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_reload_conf()")  # restore_command takes a reload (Postgres 14 on)
        finally:
            connection.close()
        return said

    def start_standby(self, node: str) -> str:
        """Start it, unless it runs and answers. As the undo of the stop, a kill may have landed
        before the stop reached the server (it runs on) or during its shutdown (waited for); as a
        step run again, after the start it made (still replaying: waited for until it answers)."""
        fleet = self.fleet
        host = self._host(node)
        said = ssh_ok(
            fleet,
            host,
            start_unless_answering(fleet, host, int(STOP_TIMEOUT) * 2),
            "start",
            timeout=STOP_TIMEOUT * 2 + REJOIN_TIMEOUT,
        )
        if said.strip() == "running":
            return "running already, answering"
        started = "was starting already" if said.strip() == "starting" else "started"
        # repmgr's follow needs it to answer: a standby answers once replay has made it consistent
        # (the group's backup_label: from its checkpoint to where the backup ended).
        deadline = time.monotonic() + REJOIN_TIMEOUT
        while True:
            try:
                postgres.connect(self.fleet, host).close()
                return f"{started}, answering"
            except postgres.Unavailable as exc:
                if time.monotonic() > deadline:
                    raise IgopsError(
                        f"{node} does not answer {REJOIN_TIMEOUT:g} s after its start: {exc}",
                        f"see {node}'s Postgres log",
                    ) from None
            time.sleep(0.5)

    def stop_rebuilt(self, node: str) -> str:
        """Stop it if its postmaster runs, and wait until that is gone (the volumes under it can
        go then). A run cut off as its start began may have left none, and repmgr's stop (pg_ctl
        stop) fails on a member that does not run."""
        fleet, host = self.fleet, self._host(node)
        script = f'bin="$1"; data="$2"; shift 2; if {POSTMASTER_RUNNING}; then exec "$@"; fi; echo "{NOT_RUNNING}"'
        stop = repmgr_argv(fleet, host, "node", "service", "--action=stop")
        argv = postgres_sh(fleet, script, fleet.model.postgres.bin_dir, data_directory(fleet, host), *stop)
        if ssh_ok(fleet, host, argv, "stop", timeout=90).strip() == NOT_RUNNING:
            return "it was not running"
        return self.wait_stopped(node)

    def follow_primary(self, node: str, primary: str) -> str:
        """Its primary_conninfo may name the primary already (a group of this member, taken while
        it followed the same one): then it streams on its own, through its replication slot, and
        repmgr's follow would find that slot active and refuse. Else repmgr points it there."""
        deadline = time.monotonic() + FOLLOW_GRACE_S
        while time.monotonic() < deadline:
            if self.streaming_replica(node, primary) is not None:
                return f"streams from {primary} already"
            time.sleep(0.5)
        self.follow(node, primary)
        return f"follows {primary} (repmgr standby follow)"

    def adopt_tags(self, node: str, mount: str, old_volume: str, group_id: str) -> str:
        from igops.ebs import tags_of

        ebs = self._ebs()
        made = made_for(ebs, group_id, node, mount)
        if not made:
            raise IgopsError(f"no volume made from {group_id} for {node}:{mount}", "see igops ops show")
        old = ebs.volume(old_volume) or {}
        inherited = {
            key: value
            for key, value in tags_of(old).items()
            if key not in _OWN_TAGS and key not in (TAG_REPLACED_BY, TAG_REPLACED_ON, TAG_REPLACED_AT, TAG_REBUILDS)
        }
        name = inherited.get("Name", old_volume)
        if "Name" in inherited:
            # Run again, the step finds the old volume renamed already: the new one takes its name
            # from before that.
            inherited["Name"] = name.removesuffix(REPLACED_SUFFIX)
        volume_id = made[0]["VolumeId"]
        if inherited:
            ebs.tag([volume_id], inherited)
        if old and not name.endswith(REPLACED_SUFFIX):
            ebs.tag([old_volume], {"Name": name + REPLACED_SUFFIX})
        return f"{volume_id} has {old_volume}'s tags"

    def _mounted_volume(self, node: str, mount: str) -> str | None:
        return mounted_volumes(self.fleet, self._ebs(), self._host(node), [mount]).get(mount)


def mounted_volumes(fleet: Fleet, ebs: Ebs, host: Any, mounts: list[str]) -> dict[str, str]:
    """mount -> the EBS volume mounted there on the host now, for those of `mounts` that are
    mount points."""
    from igops.snapshot_volumes import discover, map_volumes

    script = 'for m in "$@"; do mountpoint -q "$m" && printf "%s\\n" "$m"; done; true'
    mounted = host_script(fleet, host, _sh(script, *mounts), "looking at mounts").splitlines()
    if not mounted:
        return {}
    targets = map_volumes(host, discover(fleet, host, mounted), ebs.instance_volumes(host.instance_id))
    return {target.mount: target.volume_id for target in targets}


def _sh(script: str, *args: str) -> str:
    return f"sh -c {shlex.quote(script)} sh " + " ".join(shlex.quote(arg) for arg in args)


def _fstype(group: SnapshotGroup, mount: str) -> str:
    """The filesystem the group's snapshot of `mount` holds (its volume's before it, too)."""
    from igops.ebs import tags_of

    found = [tags_of(s).get(TAG_FSTYPE, "xfs") for s in group.snapshots if tags_of(s).get(TAG_MOUNT) == mount]
    return found[0] if found else "xfs"


def _conf_literal(value: str) -> str:
    """A string in postgresql.conf's syntax: quoted, with quotes doubled and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
