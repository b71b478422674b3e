"""The lab's AWS: moto's server as the EC2 and S3 endpoint, holding an instance per lab host,
an EBS volume per XFS volume (attached under the loop device's name, as a real EBS volume
appears under its device name), the photo bucket and the WAL repository's bucket.

moto keeps its state in memory, so resources are looked up by their igops tags and created
only when missing; a restarted moto gets a fresh set of ids, which the regenerated inventory
then carries.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igops.lab import proc
from igops.lab.state import (
    AVAILABILITY_ZONE,
    AWS_ACCESS_KEY_ID,
    AWS_REGION,
    AWS_SECRET_ACCESS_KEY,
    HOSTS,
    MOTO,
    PHOTO_BUCKET,
    WAL_BUCKET,
    Paths,
)
from igops.lab.storage import VolumeState

ENDPOINT = f"http://{MOTO[0]}:{MOTO[1]}"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET_ACCESS_KEY,
    "AWS_DEFAULT_REGION": AWS_REGION,
}
LAB_AMI = "ami-0abcdef1234567890"


@dataclass
class AwsState:
    instances: dict[str, str] = field(default_factory=dict)  # host -> instance id
    volumes: dict[tuple[str, str], str] = field(default_factory=dict)  # (host, mount path) -> volume id


def daemon(paths: Paths) -> proc.Daemon:
    moto_server = Path(sys.executable).with_name("moto_server")
    return proc.Daemon(
        "moto",
        (str(moto_server), "-H", MOTO[0], "-p", str(MOTO[1])),
        paths.services / "moto.pid",
        paths.services / "moto.log",
        endpoint=MOTO,
        env=tuple({**AWS_ENV, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}.items()),
    )


def client(service: str) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=ENDPOINT,
        region_name=AWS_REGION,
        aws_access_key_id=AWS_ACCESS_KEY_ID,
        aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
    )


def _tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in items or []}


def _current_volume(candidates: list[dict[str, Any]], instance_id: str, device: str) -> dict[str, Any] | None:
    """Of the volumes that were ever a host's disk at one mount point, the one it has now: the
    one attached where the mounted loop device is, else one not replaced by another."""

    def attached_here(volume: dict[str, Any]) -> bool:
        return any(
            item["InstanceId"] == instance_id and item["Device"] == device for item in volume.get("Attachments") or []
        )

    for choose in (attached_here, lambda volume: "igops:replaced-by" not in _tags(volume.get("Tags"))):
        chosen = [volume for volume in candidates if choose(volume)]
        if chosen:
            return chosen[0]
    return None


def _link_image(wanted: VolumeState, volume_id: str) -> None:
    """igops' image store (the inventory's [aws] volume_images) finds a volume's contents as
    restored/<volume id>.img: for the lab's own volumes, a link to the image the host mounts."""
    link = Path(wanted.image).parents[1] / "restored" / f"{volume_id}.img"
    if link == Path(wanted.image) or (link.is_symlink() and link.resolve() == Path(wanted.image).resolve()):
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(wanted.image)


def build(volumes: list[VolumeState]) -> AwsState:
    ec2 = client("ec2")
    state = AwsState()
    existing = {}
    for reservation in ec2.describe_instances(Filters=[{"Name": "tag-key", "Values": ["igops:host"]}])["Reservations"]:
        for instance in reservation["Instances"]:
            if instance["State"]["Name"] not in ("terminated", "shutting-down"):
                existing[_tags(instance.get("Tags"))["igops:host"]] = instance["InstanceId"]
    for lab_host in HOSTS:
        if lab_host.name not in existing:
            tags = [
                {"Key": "Name", "Value": lab_host.name},
                {"Key": "igops:host", "Value": lab_host.name},
                {"Key": "igops:roles", "Value": ",".join(lab_host.roles)},
            ]
            reply = ec2.run_instances(
                ImageId=LAB_AMI,
                MinCount=1,
                MaxCount=1,
                InstanceType="t3.small",
                PrivateIpAddress=lab_host.address,
                Placement={"AvailabilityZone": AVAILABILITY_ZONE},
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
            )
            existing[lab_host.name] = reply["Instances"][0]["InstanceId"]
        state.instances[lab_host.name] = existing[lab_host.name]

    known: dict[tuple[str, str], list[dict[str, Any]]] = {}
    # igops:purpose marks the lab's own volumes (and one swapped in for them, which took their
    # tags); igops:rebuilds one being swapped in. Restored copies carry igops:mount too.
    for volume in ec2.describe_volumes()["Volumes"]:
        volume_tags = _tags(volume.get("Tags"))
        host = volume_tags.get("igops:rebuilds") or (
            volume_tags.get("igops:host") if "igops:purpose" in volume_tags else None
        )
        if host and "igops:mount" in volume_tags:
            known.setdefault((host, volume_tags["igops:mount"]), []).append(volume)
    for wanted in volumes:
        key = (wanted.host, wanted.mount_point)
        instance_id = state.instances[wanted.host]
        volume = _current_volume(known.get(key, []), instance_id, wanted.device)
        if volume is None:
            tags = [
                {"Key": "Name", "Value": f"{wanted.host}-{wanted.purpose}"},
                {"Key": "igops:host", "Value": wanted.host},
                {"Key": "igops:mount", "Value": wanted.mount_point},
                {"Key": "igops:purpose", "Value": wanted.purpose},
            ]
            volume = ec2.create_volume(
                Size=1,
                AvailabilityZone=AVAILABILITY_ZONE,
                VolumeType="gp3",
                TagSpecifications=[{"ResourceType": "volume", "Tags": tags}],
            )
        attachments = volume.get("Attachments") or []
        current = [(item["InstanceId"], item["Device"]) for item in attachments]
        if current != [(instance_id, wanted.device)]:
            for attached_to, device in current:
                ec2.detach_volume(VolumeId=volume["VolumeId"], InstanceId=attached_to, Device=device, Force=True)
            ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=instance_id, Device=wanted.device)
        state.volumes[key] = volume["VolumeId"]
        _link_image(wanted, volume["VolumeId"])

    s3 = client("s3")
    existing_buckets = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
    for bucket in (PHOTO_BUCKET, WAL_BUCKET):
        if bucket not in existing_buckets:
            s3.create_bucket(Bucket=bucket)
    return state
