"""EBS through the EC2 API (boto3): the only module that talks to AWS for volumes and snapshots.

The endpoint comes from the inventory, so the same code drives AWS in production and moto in the
lab. moto keeps no volume contents, so a lab inventory names a volume image store
([aws] volume_images): the lab's volumes are loop devices over image files, and this adapter
copies those images (reflink, instant on XFS) wherever AWS would copy blocks.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError, RemoteError

if TYPE_CHECKING:
    from igops.inventory import Fleet

MAX_PENDING_SNAPSHOTS = 5  # per volume: EC2 refuses more with ConcurrentSnapshotLimitExceeded


@dataclass(frozen=True)
class Attachment:
    volume_id: str
    device: str
    size_gib: int
    root: bool


class Ebs:
    def __init__(self, fleet: Fleet):
        import boto3
        from botocore.config import Config

        from igops.secrets import Secrets

        aws = fleet.model.aws
        secrets = Secrets(fleet.model.secrets.file)
        # Keys from the environment or the secrets file; without them boto3's own chain
        # (instance profile, ~/.aws) applies.
        self._where = {
            "region_name": aws.region,
            "endpoint_url": aws.endpoint_url,
            "aws_access_key_id": secrets.get("aws_access_key_id"),
            "aws_secret_access_key": secrets.get("aws_secret_access_key"),
        }
        self._ec2 = boto3.client(
            "ec2",
            **self._where,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
                max_pool_connections=64,
            ),
        )
        self._images = ImageStore(Path(aws.volume_images)) if aws.volume_images else None

    # --- reading ----------------------------------------------------------------------------
    def instance_volumes(self, instance_id: str) -> list[Attachment]:
        instance = self._instance(instance_id)
        root_device = instance.get("RootDeviceName")
        volumes = self._call(
            "DescribeVolumes",
            self._ec2.describe_volumes,
            Filters=[{"Name": "attachment.instance-id", "Values": [instance_id]}],
        )["Volumes"]
        found = []
        for volume in volumes:
            for attachment in volume.get("Attachments", []):
                if attachment.get("InstanceId") == instance_id:
                    found.append(
                        Attachment(
                            volume["VolumeId"],
                            attachment["Device"],
                            volume["Size"],
                            attachment["Device"] == root_device,
                        )
                    )
        return sorted(found, key=lambda item: item.device)

    def availability_zone(self, instance_id: str) -> str:
        zone: str = self._instance(instance_id)["Placement"]["AvailabilityZone"]
        return zone

    def pending_snapshots(self, volume_ids: list[str]) -> dict[str, int]:
        snapshots = self._call(
            "DescribeSnapshots",
            self._ec2.describe_snapshots,
            OwnerIds=["self"],
            Filters=[{"Name": "volume-id", "Values": volume_ids}],
        )["Snapshots"]
        counts = {volume_id: 0 for volume_id in volume_ids}
        for snapshot in snapshots:
            if snapshot["State"] == "pending":
                counts[snapshot["VolumeId"]] = counts.get(snapshot["VolumeId"], 0) + 1
        return counts

    def snapshots(self, tag_filters: dict[str, str | None]) -> list[dict[str, Any]]:
        filters = [
            {"Name": f"tag:{key}", "Values": [value]} if value is not None else {"Name": "tag-key", "Values": [key]}
            for key, value in tag_filters.items()
        ]
        paginator = self._ec2.get_paginator("describe_snapshots")
        found: list[dict[str, Any]] = []
        try:
            for page in paginator.paginate(OwnerIds=["self"], Filters=filters):
                found += page["Snapshots"]
        except Exception as exc:  # noqa: BLE001
            raise self._error("DescribeSnapshots", exc) from None
        return found

    def volumes(self, tag_filters: dict[str, str]) -> list[dict[str, Any]]:
        filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in tag_filters.items()]
        found: list[dict[str, Any]] = self._call("DescribeVolumes", self._ec2.describe_volumes, Filters=filters)[
            "Volumes"
        ]
        return found

    def volume(self, volume_id: str) -> dict[str, Any] | None:
        """One volume, or None if EC2 has none by that id."""
        try:
            found: list[dict[str, Any]] = self._ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
        except Exception as exc:  # noqa: BLE001 - botocore's exception tree is wide
            if "NotFound" in str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")):
                return None
            raise self._error("DescribeVolumes", exc) from None
        return found[0] if found else None

    # --- writing ----------------------------------------------------------------------------
    def create_snapshots(self, instance_id: str, description: str, tags: dict[str, str]) -> dict[str, str]:
        """One multi-volume call for every data volume of the instance: volume id -> snapshot id."""
        answer = self._call(
            "CreateSnapshots",
            self._ec2.create_snapshots,
            InstanceSpecification={"InstanceId": instance_id, "ExcludeBootVolume": True},
            Description=description,
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": _tag_list(tags)}],
        )
        made = {item["VolumeId"]: item["SnapshotId"] for item in answer["Snapshots"]}
        self._copy_images(made)
        return made

    def create_snapshot(self, volume_id: str, description: str, tags: dict[str, str]) -> str:
        answer = self._call(
            "CreateSnapshot",
            self._ec2.create_snapshot,
            VolumeId=volume_id,
            Description=description,
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": _tag_list(tags)}],
        )
        snapshot_id: str = answer["SnapshotId"]
        self._copy_images({volume_id: snapshot_id})
        return snapshot_id

    def _copy_images(self, made: dict[str, str]) -> None:
        """Lab only: copy the volumes' images while still frozen. A snapshot whose contents could
        not be kept must not survive as if it were good."""
        if not self._images:
            return
        try:
            self._images.copy_for_snapshots(self, made)
        except IgopsError:
            for snapshot_id in made.values():
                self.delete_snapshot(snapshot_id)
            raise

    def tag(self, resource_ids: list[str], tags: dict[str, str]) -> None:
        if resource_ids:
            self._call("CreateTags", self._ec2.create_tags, Resources=resource_ids, Tags=_tag_list(tags))

    def untag(self, resource_ids: list[str], keys: list[str]) -> None:
        if resource_ids:
            self._call("DeleteTags", self._ec2.delete_tags, Resources=resource_ids, Tags=[{"Key": key} for key in keys])

    def delete_snapshot(self, snapshot_id: str) -> None:
        self._call("DeleteSnapshot", self._ec2.delete_snapshot, SnapshotId=snapshot_id)
        if self._images:
            self._images.forget_snapshot(snapshot_id)

    def fast_restores(self, snapshot_ids: list[str], zone: str) -> dict[str, bool] | None:
        """Which of the snapshots have EBS fast snapshot restore enabled in `zone` (a volume from
        one is fully initialised at once; from any other, each block is fetched from S3 on its
        first read). None: the endpoint does not answer the question (an account or an API
        without it)."""
        import boto3
        from botocore.config import Config

        # One attempt: an endpoint without the API (moto) answers 500, which is not worth retrying.
        once = boto3.client("ec2", **self._where, config=Config(retries={"total_max_attempts": 1}, read_timeout=30))
        try:
            answer = once.describe_fast_snapshot_restores(
                Filters=[
                    {"Name": "snapshot-id", "Values": snapshot_ids},
                    {"Name": "availability-zone", "Values": [zone]},
                    {"Name": "state", "Values": ["enabled"]},
                ]
            )
        except Exception:  # noqa: BLE001 - any failure means the same: not known
            return None
        enabled = {item["SnapshotId"] for item in answer.get("FastSnapshotRestores", [])}
        return {snapshot_id: snapshot_id in enabled for snapshot_id in snapshot_ids}

    def create_volume(self, snapshot_id: str, zone: str, tags: dict[str, str]) -> str:
        answer = self._call(
            "CreateVolume",
            self._ec2.create_volume,
            SnapshotId=snapshot_id,
            AvailabilityZone=zone,
            VolumeType="gp3",
            TagSpecifications=[{"ResourceType": "volume", "Tags": _tag_list(tags)}],
        )
        volume_id: str = answer["VolumeId"]
        if self._images:
            self._images.volume_from_snapshot(snapshot_id, volume_id)
        self._wait_volume(volume_id, "available")
        return volume_id

    def attach(self, volume_id: str, instance_id: str) -> str:
        """Attach at a free device name; returns the name the host will see it under."""
        if self._images:
            device = self._images.attach(volume_id)
        else:
            used = {item.device for item in self.instance_volumes(instance_id)}
            free = [f"/dev/sd{letter}" for letter in "fghijklmnop" if f"/dev/sd{letter}" not in used]
            if not free:
                raise IgopsError(
                    f"instance {instance_id} has no free device name for {volume_id}", "detach unused volumes first"
                )
            device = free[0]
        self._call("AttachVolume", self._ec2.attach_volume, VolumeId=volume_id, InstanceId=instance_id, Device=device)
        self._wait_volume(volume_id, "in-use")
        return device

    def detach(self, volume_id: str) -> None:
        """Detach a volume from wherever it is attached (its filesystem unmounted first) and wait
        until it is available."""
        volume = self._call("DescribeVolumes", self._ec2.describe_volumes, VolumeIds=[volume_id])["Volumes"][0]
        for attachment in volume.get("Attachments") or []:
            if self._images:
                self._images.detach(attachment["Device"], volume_id)
            self._call(
                "DetachVolume",
                self._ec2.detach_volume,
                VolumeId=volume_id,
                InstanceId=attachment["InstanceId"],
                Device=attachment["Device"],
            )
        self._wait_volume(volume_id, "available")

    def delete_volume(self, volume_id: str) -> None:
        self._call("DeleteVolume", self._ec2.delete_volume, VolumeId=volume_id)
        if self._images:
            self._images.forget_volume(volume_id)

    # --- plumbing ---------------------------------------------------------------------------
    def _instance(self, instance_id: str) -> dict[str, Any]:
        answer = self._call("DescribeInstances", self._ec2.describe_instances, InstanceIds=[instance_id])
        for reservation in answer["Reservations"]:
            for instance in reservation["Instances"]:
                found: dict[str, Any] = instance
                return found
        raise IgopsError(f"EC2 instance {instance_id} not found", "check the host's instance_id in the inventory")

    def _wait_volume(self, volume_id: str, state: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            volume = self._call("DescribeVolumes", self._ec2.describe_volumes, VolumeIds=[volume_id])["Volumes"][0]
            if volume["State"] == state:
                return
            if volume["State"] == "error" or time.monotonic() > deadline:
                raise IgopsError(
                    f"volume {volume_id} is {volume['State']}, not {state}",
                    "see the EC2 console for the volume's state",
                )
            time.sleep(1)

    def _call(self, name: str, method: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return method(**kwargs)
        except Exception as exc:  # noqa: BLE001 - botocore's exception tree is wide
            raise self._error(name, exc) from None

    @staticmethod
    def _error(name: str, exc: Exception) -> IgopsError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") if code else str(exc)
        return IgopsError(
            f"EC2 {name} failed: {code + ': ' if code else ''}{message}",
            "check the AWS endpoint, credentials and the ids named",
        )


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": str(value)} for key, value in tags.items()]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


class ImageStore:
    """Volume contents for the lab, where EC2 is moto: each volume is a loop device over an image
    file, and a snapshot is a reflink copy of that image taken while the filesystem is frozen."""

    def __init__(self, root: Path):
        self.root = root

    def snapshot_image(self, snapshot_id: str) -> Path:
        return self.root / "snapshots" / f"{snapshot_id}.img"

    def volume_image(self, volume_id: str) -> Path:
        return self.root / "restored" / f"{volume_id}.img"

    def copy_for_snapshots(self, ebs: Ebs, made: dict[str, str]) -> None:
        devices = {}
        for volume_id in made:
            volume = ebs._call("DescribeVolumes", ebs._ec2.describe_volumes, VolumeIds=[volume_id])["Volumes"][0]
            attachments = volume.get("Attachments") or []
            if not attachments:
                raise IgopsError(f"lab volume {volume_id} is not attached", "run `igops lab up`")
            devices[volume_id] = attachments[0]["Device"]
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)

        def copy(volume_id: str) -> None:
            image = _lab_image(devices[volume_id])
            _run(["cp", "--reflink=always", image, str(self.snapshot_image(made[volume_id]))])

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(copy, made))

    def forget_snapshot(self, snapshot_id: str) -> None:
        self.snapshot_image(snapshot_id).unlink(missing_ok=True)

    def volume_from_snapshot(self, snapshot_id: str, volume_id: str) -> None:
        source = self.snapshot_image(snapshot_id)
        if not source.exists():
            raise IgopsError(
                f"lab snapshot {snapshot_id} has no image in {self.root}",
                "it was taken before the lab's image store existed; take a new one",
            )
        self.volume_image(volume_id).parent.mkdir(parents=True, exist_ok=True)
        _run(["cp", "--reflink=always", str(source), str(self.volume_image(volume_id))])

    def forget_volume(self, volume_id: str) -> None:
        self.volume_image(volume_id).unlink(missing_ok=True)

    def detach(self, device: str, volume_id: str) -> None:
        """Release the loop device, if it is still the one over this volume's image."""
        backing = loop_backing_file(device)
        # A volume's image may be a link (the lab's own volumes): the loop names the file itself.
        if backing is not None and Path(backing).resolve() == self.volume_image(volume_id).resolve():
            _run(["losetup", "-d", device])

    def attach(self, volume_id: str) -> str:
        # The filesystems were made on 512-byte sectors; a fresh reflinked image may otherwise
        # be given 4 KiB logical sectors, which XFS refuses to mount.
        device = _run(
            ["losetup", "--find", "--show", "--sector-size", "512", "--direct-io=on", str(self.volume_image(volume_id))]
        ).strip()
        read_ahead_like_ebs(device)
        return device


# What Linux gives an EBS volume (an NVMe device on Nitro): 128 KiB. A loop device takes its
# backing file's device's, megabytes here, which turns each 8 KiB page Postgres reads at random
# (a restored copy's replay) into a read of that size.
EBS_READ_AHEAD_KB = 128


def read_ahead_like_ebs(device: str) -> None:
    Path(f"/sys/block/{Path(device).name}/queue/read_ahead_kb").write_text(f"{EBS_READ_AHEAD_KB}\n")


def loop_backing_file(device: str) -> str | None:
    """The file a loop device reads and writes, or None if `device` is no attached loop device."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _lab_image(device: str) -> str:
    image = loop_backing_file(device)
    if image is None:
        raise IgopsError(f"{device} is not a lab loop device", "run `igops lab up`")
    return image


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RemoteError(f"{argv[0]} failed: {done.stderr.strip()}")
    return done.stdout
