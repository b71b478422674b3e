"""The logical-shard to PgBouncer-database mapping, as read from the directory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from app.config import HostPort


class UnknownShard(LookupError):
    pass


@dataclass(frozen=True)
class ShardMap:
    version: int | None
    cluster_of_shard: Mapping[int, str]
    database_of_cluster: Mapping[str, str]
    logical_shards: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "logical_shards", tuple(sorted(self.cluster_of_shard)))

    def database_for(self, logical_shard: int) -> str:
        try:
            return self.database_of_cluster[self.cluster_of_shard[logical_shard]]
        except KeyError:
            raise UnknownShard(f"logical shard {logical_shard} is not in shard map version {self.version}") from None


@dataclass(frozen=True)
class DirectorySnapshot:
    shard_map: ShardMap
    # None when the directory has no redis_master endpoint row yet
    redis_master: HostPort | None
    redis_master_version: int | None
