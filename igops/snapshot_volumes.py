"""What lies under a host's data mounts: each mount's block devices (md RAID members in order,
read on the host by the agent's blockdevs program), and the EBS volume behind each, matched by
the inventory's explicit list, the NVMe serial or the EC2 attachment's device name. A snapshot
create discovers this before anything is frozen, and refuses what it cannot map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops import agent, remote
from igops.errors import RefusedError, RemoteError
from igops.output import plural

if TYPE_CHECKING:
    from igops.ebs import Attachment
    from igops.inventory import Fleet
    from igops.inventory_model import Host


@dataclass(frozen=True)
class VolumeTarget:
    mount: str
    device: str
    fstype: str
    raid_index: int
    raid_members: int
    raid_level: str | None
    volume_id: str


def discover(fleet: Fleet, host: Host, mounts: list[str]) -> list[dict[str, Any]]:
    command, stdin = agent.invocation("blockdevs", mounts)
    settings = remote.settings_for(fleet)
    [result] = remote.run(remote.targets_for(fleet, [host]), command, settings, stdin=stdin, timeout=30)
    if not result.ok:
        raise RemoteError(
            f"cannot inspect block devices on {host.name}: "
            f"{result.error or result.stderr.strip() or 'exit ' + str(result.exit_code)}",
            f"nothing was frozen; check that {host.name} answers over SSH (`igops status`)",
        )
    entries: list[dict[str, Any]] = json.loads(result.stdout)["mounts"]
    for entry in entries:
        if "error" in entry:
            raise RefusedError(
                f"{host.name}:{entry['mount']} is {entry['error']}", "pass the mount point of a data filesystem"
            )
    return entries


def map_volumes(host: Host, discovered: list[dict[str, Any]], attachments: list[Attachment]) -> list[VolumeTarget]:
    """Each member device under each mount -> its EBS volume: the inventory's explicit list
    first (RAID member order), then the NVMe serial, then the EC2 attachment's device name."""
    by_device: dict[str, Attachment] = {}
    for attachment in attachments:
        for alias in device_aliases(attachment.device):
            by_device[alias] = attachment
    attached_ids = {attachment.volume_id for attachment in attachments}
    explicit = {mount.path: mount.volumes for mount in host.mounts if mount.volumes}
    targets = []
    for entry in discovered:
        members = sorted(entry["members"], key=lambda member: member["raid_index"])
        listed = explicit.get(entry["mount"])
        if listed and len(listed) != len(members):
            raise RefusedError(
                f"{host.name}:{entry['mount']} has {plural(len(members), 'member device')} but the inventory lists "
                f"{plural(len(listed), 'volume')}",
                "fix that mount's volumes list (RAID member order)",
            )
        for position, member in enumerate(members):
            volume_id = (listed[position] if listed else member.get("volume_id")) or next(
                (by_device[alias].volume_id for alias in device_aliases(member["device"]) if alias in by_device), None
            )
            if not volume_id or volume_id not in attached_ids:
                raise RefusedError(
                    f"{host.name}:{entry['mount']}: {member['device']} is not a known EBS volume of {host.instance_id}"
                    + (f" ({volume_id} is not attached to it)" if volume_id else ""),
                    "list the mount's volumes in the inventory, or check the instance id",
                )
            if any(attachment.root for attachment in attachments if attachment.volume_id == volume_id):
                raise RefusedError(f"{entry['mount']} lies on the root volume {volume_id}", "never freeze the root")
            raid = entry.get("raid")
            targets.append(
                VolumeTarget(
                    entry["mount"],
                    member["device"],
                    entry["fstype"],
                    member["raid_index"],
                    len(members),
                    raid["level"] if raid else None,
                    volume_id,
                )
            )
    return targets


def device_aliases(device: str) -> set[str]:
    """EC2 names a device /dev/sdf; Xen guests see /dev/xvdf. Both spellings match."""
    name = device.rsplit("/", 1)[-1]
    aliases = {device, f"/dev/{name}"}
    if name.startswith("sd"):
        aliases.add(f"/dev/xvd{name[2:]}")
    elif name.startswith("xvd"):
        aliases.add(f"/dev/sd{name[3:]}")
    return aliases
