"""The WAL repository as S3 objects: its size, and the expiry of WAL no retained snapshot group
needs (run by `igops snapshot prune`).

Why igops expires WAL itself: pgBackRest's `expire` removes WAL only relative to pgBackRest's own
backups, and a fleet whose base backups are EBS snapshot groups has none (pgbackrest#2166: the
two are stitched together by hand). pgBackRest has no supported command to remove a file either
(`repo-rm` is for its own tests). So igops deletes, with the S3 API, the archived files whose WAL
position is before the start of every snapshot group that remains, in the archive pgBackRest is
writing now; it never touches timeline history files, `archive.info`, or an older archive id
(from before a major upgrade).

Why the position alone decides: a restore from a group replays forward from the segment its
backup_label names, on that group's timeline and those after it, so a file before every remaining
group's start is never read, on whichever timeline it is. Only groups that record their WAL
position (igops.snapshot_wal) count: a group without one cannot be restored to a point in time.
A cluster none of whose remaining groups records a position keeps all its WAL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops.output import Reporter, human_bytes, plural

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.snapshot_groups import SnapshotGroup
    from igops.snapshot_policy import PrunePlan

# A WAL file in the archive: the segment's 24 hex digits, then pgBackRest's "-<sha1>" with an
# extension, or ".<offset>.backup" / ".partial" for a backup history or partial segment.
WAL_FILE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{16})[.-]")
ARCHIVE_ID = re.compile(r"^(\d+)-(\d+)$")  # pgBackRest's <major version>-<db id>
LABEL_START = re.compile(r"^START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)$", re.MULTILINE)
DELETE_BATCH = 1000  # S3's DeleteObjects limit


def start_segment(label: str) -> str | None:
    """The first WAL segment a group's backup_label says replay reads."""
    found = LABEL_START.search(label)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Needed:
    """The oldest WAL a cluster's remaining groups need: from `segment`, for group `group_id`."""

    segment: str
    group_id: str


def oldest_needed(cluster: str, remaining: list[SnapshotGroup]) -> Needed | None:
    """The earliest start among the cluster's remaining complete groups that record a WAL
    position (None: no such group, keep everything). A group whose label names no start
    segment keeps everything too: its need is unknown."""
    starts = []
    for group in remaining:
        if not group.complete or group.wal is None or group.wal.cluster != cluster:
            continue
        segment = start_segment(group.wal.label)
        if segment is None:
            return None
        starts.append(Needed(segment, group.group_id))
    return min(starts, key=lambda needed: needed.segment[8:]) if starts else None


def current_archive_prefix(keys: list[str], stanza_prefix: str) -> str | None:
    """The prefix of the archive id pgBackRest writes now (the highest db id), or None."""
    ids: dict[int, str] = {}
    for key in keys:
        first = key[len(stanza_prefix) :].split("/", 1)[0]
        matched = ARCHIVE_ID.match(first)
        if matched:
            ids[int(matched.group(2))] = first
    return f"{stanza_prefix}{ids[max(ids)]}/" if ids else None


def expirable(objects: list[tuple[str, int]], stanza_prefix: str, keep_from: str) -> list[tuple[str, int]]:
    """The WAL files (key, size) of the current archive id positioned before `keep_from`, on any
    timeline; history files, archive.info and other archive ids are never among them."""
    current = current_archive_prefix([key for key, _ in objects], stanza_prefix)
    if current is None:
        return []
    expired = []
    for key, size in objects:
        if not key.startswith(current):
            continue
        matched = WAL_FILE.match(key.rsplit("/", 1)[-1])
        if matched and matched.group(2) < keep_from[8:]:
            expired.append((key, size))
    return expired


@dataclass
class WalExpiry:
    """One cluster's part of a prune: the archived WAL files no remaining group needs."""

    cluster: str
    needed: Needed
    keys: list[str] = field(default_factory=list)
    bytes: int = 0

    def step(self) -> str:
        return (
            f"expire {plural(len(self.keys), 'WAL file')} of {self.cluster} ({human_bytes(self.bytes)}) "
            f"before segment {self.needed.segment}, where group {self.needed.group_id}, the oldest it keeps, starts"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "keep_from": self.needed.segment,
            "needed_by": self.needed.group_id,
            "files": len(self.keys),
            "bytes": self.bytes,
        }


def plan_expiry(fleet: Fleet, remaining: list[SnapshotGroup]) -> list[WalExpiry]:
    """Per archived cluster, the WAL files to expire once the prune leaves `remaining`."""
    from igops.pg.archive import stanza

    if fleet.model.archive is None:
        return []
    repository = Repository(fleet)
    plans = []
    for cluster in fleet.model.postgres.clusters:
        needed = oldest_needed(cluster, remaining)
        if needed is None:
            continue
        prefix = repository.stanza_prefix(stanza(fleet, cluster))
        files = expirable(repository.objects(prefix), prefix, needed.segment)
        if files:
            plans.append(WalExpiry(cluster, needed, [key for key, _ in files], sum(size for _, size in files)))
    return plans


def expire(fleet: Fleet, plans: list[WalExpiry], reporter: Reporter = Reporter()) -> int:
    """Delete the planned WAL files; the number deleted."""
    repository = Repository(fleet)
    deleted = 0
    for plan in plans:
        with reporter.step(f"expire WAL of {plan.cluster} before {plan.needed.segment}") as step:
            repository.delete(plan.keys)
            deleted += len(plan.keys)
            step.detail = f"{plural(len(plan.keys), 'file')}, {human_bytes(plan.bytes)}"
    return deleted


class Repository:
    """The repository's bucket, reached with its own key from where igops runs."""

    def __init__(self, fleet: Fleet):
        import os

        import boto3
        from botocore.config import Config

        from igops.pg.archive import archive_settings
        from igops.secrets import Secrets

        self.settings = archive_settings(fleet).repository
        repo = self.settings
        secrets = Secrets(fleet.model.secrets.file)
        # The CA file is a path on the database hosts; where igops runs it may not be.
        verify: Any = (
            repo.ca_file if repo.verify_tls and repo.ca_file and os.path.exists(repo.ca_file) else repo.verify_tls
        )
        self.client = boto3.client(
            "s3",
            endpoint_url=f"https://{repo.endpoint}:{repo.port}",
            region_name=repo.region,
            aws_access_key_id=secrets.require("archive_s3_key"),
            aws_secret_access_key=secrets.require("archive_s3_key_secret"),
            verify=verify,
            config=Config(
                s3={"addressing_style": "path" if repo.uri_style == "path" else "virtual"}, retries={"max_attempts": 2}
            ),
        )

    def root(self) -> str:
        return self.settings.path.strip("/") + "/"

    def stanza_prefix(self, stanza: str) -> str:
        return f"{self.root()}archive/{stanza}/"

    def objects(self, prefix: str) -> list[tuple[str, int]]:
        """Every object under `prefix`: (key, size)."""
        objects = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.settings.bucket, Prefix=prefix):
            objects += [(item["Key"], int(item["Size"])) for item in page.get("Contents", [])]
        return objects

    def delete(self, keys: list[str]) -> None:
        from igops.errors import IgopsError

        for at in range(0, len(keys), DELETE_BATCH):
            batch = keys[at : at + DELETE_BATCH]
            answer = self.client.delete_objects(
                Bucket=self.settings.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise IgopsError(
                    f"the WAL repository refused to delete {plural(len(answer['Errors']), 'file')} "
                    f"(first {first.get('Key')}: {first.get('Code')} {first.get('Message')})",
                    "check the repository key's permissions, then run `igops snapshot prune` again",
                )


def repository_bytes(fleet: Fleet) -> int | None:
    """The bytes of every object under the repository's path (None: the bucket does not answer)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        repository = Repository(fleet)
        return sum(size for _, size in repository.objects(repository.root()))
    except (BotoCoreError, ClientError):
        return None


def for_prune(fleet: Fleet, groups: list[SnapshotGroup], plan: PrunePlan) -> PrunePlan:
    """The prune plan with the WAL expiry the groups it leaves allow (nothing without [archive])."""
    from botocore.exceptions import BotoCoreError, ClientError

    from igops.errors import IgopsError, first_line

    doomed = {group.group_id for group in plan.delete}
    try:
        plan.wal = plan_expiry(fleet, [group for group in groups if group.group_id not in doomed])
    except (BotoCoreError, ClientError) as exc:
        raise IgopsError(
            f"the WAL repository does not answer, so what WAL the prune may expire is unknown: {first_line(exc)}",
            "check `igops pg archive status`, then prune again",
        ) from exc
    return plan
