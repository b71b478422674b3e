"""Which block devices, and which EBS volumes, lie under each mount.

Usage: blockdevs.py MOUNT [MOUNT ...]. Prints one JSON object:
{"mounts": [{"mount", "source", "fstype", "device", "raid": null | {"level", "uuid", "members"}, "members":
[{"device", "raid_index", "volume_id"}]}]}. volume_id comes from the NVMe serial
(/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…) when the host has one, else null: the
caller maps device names through the EC2 API. The parsers are pure, for testing on recordings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, TypedDict

    class MdArray(TypedDict):
        level: str
        members: list[tuple[str, int]]

    class MdDetail(TypedDict):
        level: str | None
        uuid: str | None
        members: list[tuple[str, int]]


BY_ID = "/dev/disk/by-id"
EBS_SERIAL = re.compile(r"^nvme-Amazon_Elastic_Block_Store_(vol)_?([0-9a-f]+)$")


def parse_mountinfo(text: str) -> dict[str, tuple[str, str]]:
    """mount point -> (source device, fstype)."""
    mounts = {}
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields = before.split()
        if len(fields) < 5 or not after:
            continue
        point = fields[4].encode().decode("unicode_escape") if "\\" in fields[4] else fields[4]
        fstype, source = after.split()[:2]
        mounts[point] = (source, fstype)
    return mounts


def parse_mdstat(text: str) -> dict[str, MdArray]:
    """md name -> {"level", "members": [(device, raid_index)]} from /proc/mdstat."""
    arrays: dict[str, MdArray] = {}
    for line in text.splitlines():
        match = re.match(r"^(md\w+)\s*:\s*(\w+)\s+(?:\(\S+\)\s+)?(raid\d+|linear)\s+(.*)$", line)
        if not match:
            continue
        name, _, level, rest = match.groups()
        members = []
        for item in rest.split():
            member = re.match(r"^([\w-]+)\[(\d+)\]", item)
            if member:
                members.append((member.group(1), int(member.group(2))))
        arrays[name] = {"level": level, "members": sorted(members, key=lambda m: m[1])}
    return arrays


def parse_mdadm_detail(text: str) -> MdDetail:
    """{"level", "uuid", "members": [(device, raid_device)]} from `mdadm --detail /dev/mdX`."""
    level = re.search(r"Raid Level\s*:\s*(\S+)", text)
    uuid = re.search(r"UUID\s*:\s*(\S+)", text)
    members = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"\s*Number\s+Major\s+Minor\s+RaidDevice", line):
            in_table = True
            continue
        if in_table:
            fields = line.split()
            if len(fields) >= 5 and fields[0].isdigit() and fields[-1].startswith("/dev/"):
                raid_device = fields[3]
                if raid_device.isdigit():
                    members.append((fields[-1].rsplit("/", 1)[-1], int(raid_device)))
    return {
        "level": level.group(1) if level else None,
        "uuid": uuid.group(1) if uuid else None,
        "members": sorted(members, key=lambda m: m[1]),
    }


def parse_by_id(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """device name -> EBS volume id, from (link name, link target) pairs of /dev/disk/by-id."""
    volumes = {}
    for name, target in entries:
        match = EBS_SERIAL.match(name)
        if match and "-part" not in name:
            volumes[target.rsplit("/", 1)[-1]] = f"vol-{match.group(2)}"
    return volumes


def _by_id_entries() -> list[tuple[str, str]]:
    try:
        names = os.listdir(BY_ID)
    except OSError:
        return []
    return [
        (name, os.readlink(os.path.join(BY_ID, name))) for name in names if os.path.islink(os.path.join(BY_ID, name))
    ]


def _md_members(name: str) -> MdDetail:
    """Members of an md array in RAID order, from mdadm when present, else sysfs slots."""
    try:
        detail = subprocess.run(["mdadm", "--detail", f"/dev/{name}"], capture_output=True, text=True, timeout=10)
        if detail.returncode == 0:
            return parse_mdadm_detail(detail.stdout)
    except (OSError, subprocess.TimeoutExpired):
        pass
    members = []
    for slave in sorted(os.listdir(f"/sys/block/{name}/slaves")):
        try:
            with open(f"/sys/block/{name}/md/dev-{slave}/slot") as handle:
                members.append((slave, int(handle.read().strip())))
        except (OSError, ValueError):
            members.append((slave, len(members)))
    with open(f"/sys/block/{name}/md/level") as handle:
        level = handle.read().strip()
    return {"level": level, "uuid": None, "members": sorted(members, key=lambda m: m[1])}


def describe(mount: str, mountinfo: dict[str, tuple[str, str]], by_id: dict[str, str]) -> dict[str, Any]:
    real = os.path.realpath(mount)
    if real not in mountinfo:
        return {"mount": mount, "error": "not a mount point"}
    source, fstype = mountinfo[real]
    device = os.path.realpath(source) if source.startswith("/dev/") else source
    name = device.rsplit("/", 1)[-1]
    entry: dict[str, Any] = {"mount": mount, "source": source, "fstype": fstype, "device": device, "raid": None}
    if os.path.isdir(f"/sys/block/{name}/md"):
        raid = _md_members(name)
        entry["raid"] = {"level": raid["level"], "uuid": raid["uuid"], "members": len(raid["members"])}
        members = [(f"/dev/{member}", index) for member, index in raid["members"]]
    else:
        members = [(device, 0)]
    entry["members"] = [
        {"device": path, "raid_index": index, "volume_id": by_id.get(path.rsplit("/", 1)[-1])}
        for path, index in members
    ]
    return entry


def main() -> None:
    with open("/proc/self/mountinfo") as handle:
        mountinfo = parse_mountinfo(handle.read())
    by_id = parse_by_id(_by_id_entries())
    print(json.dumps({"mounts": [describe(mount, mountinfo, by_id) for mount in sys.argv[1:]]}))


if __name__ == "__main__":
    main()
