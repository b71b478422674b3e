"""Checks every acknowledged write in a ledger against the authoritative stores.

Postgres is read through PgBouncer at the place the current shard map names,
Redis at the master the directory names, and S3 directly, so a write lost by a
failover, switchover or shard move is found wherever it should have landed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from app.config import load_config
from app.db import Cursor, PgConnections
from app.directory import read_snapshot
from app.ids import shard_of, unix_millis_of
from app.loadgen.client import LoadgenError
from app.loadgen.ledger import read_ledger
from app.loadgen.report import MissingWrite, VerifyReport
from app.redis_client import discover_master, make_client
from app.schema import schema_for
from app.service import feed_key
from app.shardmap import UnknownShard
from app.storage import make_s3_client

T = TypeVar("T")
Key = tuple[int, ...]

BATCH = 5000
# Feeds are ordered by push time, ids by creation time; the two can differ by a
# post's own duration (retries included), so near the cap's edge a photo's
# absence proves nothing and it is not checked.
FEED_ORDER_SLACK_MS = 10_000
UNMAPPED = "its logical shard is not in the shard map"


def _batches(items: list, size: int = BATCH) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fetch_all(sql: str, params: Any) -> Callable[[Cursor], list[tuple]]:
    def fetch(cursor: Cursor) -> list[tuple]:
        cursor.execute(sql, params)
        return cursor.fetchall()

    return fetch


def _pairs_query(table: str, first: str, second: str) -> str:
    """A lookup of (first, second) pairs, with a slot for the shard's schema."""
    return (
        f"SELECT {first}, {second} FROM {{schema}}.{table} "
        f"WHERE ({first}, {second}) IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))"
    )


class Stores:
    def __init__(self, config_path: str):
        self.config = load_config(config_path)
        self.pg = PgConnections(self.config.postgres)
        self.snapshot = self.query(self.config.postgres.directory_database, read_snapshot)

    def query(self, database: str, work: Callable[[Cursor], T]) -> T:
        # verify often runs right after a failover drill, when the first
        # connection through PgBouncer may still meet a dead server connection
        return self.pg.run(lambda: database, work, before_retry=lambda exc: False)

    def close(self) -> None:
        self.pg.close()

    def find_rows(self, keys: Iterable[Key], query: str) -> tuple[set[Key], set[Key]]:
        """Runs `query` (a {schema} slot, one bigint[] parameter per key column)
        on the shard of each key's first id; returns the keys found and the
        keys whose shard the map does not have."""
        by_shard: dict[int, list[Key]] = defaultdict(list)
        for key in set(keys):
            by_shard[shard_of(key[0])].append(key)
        found: set[Key] = set()
        unmapped: set[Key] = set()
        for shard, shard_keys in by_shard.items():
            try:
                database = self.snapshot.shard_map.database_for(shard)
            except UnknownShard:
                unmapped.update(shard_keys)
                continue
            sql = query.format(schema=schema_for(shard))
            for batch in _batches(shard_keys):
                columns = [list(column) for column in zip(*batch, strict=True)]
                found.update(tuple(row) for row in self.query(database, _fetch_all(sql, columns)))
        return found, unmapped

    def username_claims(self, usernames: list[str]) -> dict[str, int]:
        claims: dict[str, int] = {}
        sql = "SELECT username, user_id FROM usernames WHERE username = ANY(%s)"
        for batch in _batches(usernames):
            claims.update(self.query(self.config.postgres.directory_database, _fetch_all(sql, (batch,))))
        return claims

    def feeds(self, user_ids: Iterable[int]) -> dict[int, list[int]]:
        address = self.snapshot.redis_master or discover_master(self.config.redis.nodes)
        if address is None:
            raise LoadgenError("no Redis master: no redis_master endpoint and no single node reports role master")
        client = make_client(address)
        try:
            pipe = client.pipeline(transaction=False)
            ordered = sorted(set(user_ids))
            for user_id in ordered:
                pipe.lrange(feed_key(user_id), 0, -1)
            feeds = pipe.execute()
        finally:
            client.close()
        return {user_id: [int(entry) for entry in feed] for user_id, feed in zip(ordered, feeds, strict=True)}

    def missing_objects(self, keys: list[str]) -> set[str]:
        """The keys the bucket lacks. One listing of the key range the run wrote (1,000 keys a
        request) rather than a HEAD per key: a long run posts tens of thousands of photos."""
        wanted = set(keys)
        if not wanted:
            return set()
        low, high = min(wanted), max(wanted)
        client = make_s3_client(self.config.s3)
        present: set[str] = set()
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=self.config.s3.bucket, Prefix=os.path.commonprefix([low, high]), StartAfter=low[:-1]
        )
        for page in pages:
            listed = [item["Key"] for item in page.get("Contents", [])]
            present.update(key for key in listed if key in wanted)
            if listed and listed[-1] >= high:
                break
        return wanted - present


class _Findings:
    """What is missing, per ledger record."""

    def __init__(self) -> None:
        self.missing: dict[tuple[str, Key], list[str]] = defaultdict(list)
        self.records: dict[tuple[str, Key], dict[str, Any]] = {}

    def add(self, op: str, key: Key, record: dict[str, Any], what: str) -> None:
        self.records[op, key] = record
        self.missing[op, key].append(what)


def _unique(records: list[dict[str, Any]], *fields: str) -> dict[Key, dict[str, Any]]:
    unique: dict[Key, dict[str, Any]] = {}
    for record in records:
        unique.setdefault(tuple(record[name] for name in fields), record)
    return unique


def _check_signups(stores: Stores, signups: dict[Key, dict[str, Any]], findings: _Findings) -> None:
    found, unmapped = stores.find_rows(signups, "SELECT id FROM {schema}.users WHERE id = ANY(%s)")
    claims = stores.username_claims([record["username"] for record in signups.values()])
    for key, record in signups.items():
        if key in unmapped:
            findings.add("signup", key, record, UNMAPPED)
        elif key not in found:
            findings.add("signup", key, record, "users row")
        if claims.get(record["username"]) != record["user_id"]:
            findings.add("signup", key, record, "username claim in the directory")


def _check_posts(stores: Stores, posts: dict[Key, dict[str, Any]], findings: _Findings) -> int:
    """Returns how many feed entries were not checked because the poster's
    feed has since been trimmed past them."""
    owned = {(record["photo_id"], record["user_id"]): key for key, record in posts.items()}
    found, unmapped = stores.find_rows(owned, _pairs_query("photos", "id", "user_id"))
    absent_objects = stores.missing_objects([record["s3_key"] for record in posts.values()])
    feeds = stores.feeds(record["user_id"] for record in posts.values())
    feed_length = stores.config.redis.feed_length
    beyond_cap = 0
    for pair, key in owned.items():
        record = posts[key]
        if pair in unmapped:
            findings.add("post", key, record, UNMAPPED)
        elif pair not in found:
            findings.add("post", key, record, "photos row")
        if record["s3_key"] in absent_objects:
            findings.add("post", key, record, "S3 object")
        feed = feeds.get(record["user_id"], [])
        if record["photo_id"] in feed:
            continue
        if (
            len(feed) >= feed_length
            and unix_millis_of(record["photo_id"]) <= unix_millis_of(feed[-1]) + FEED_ORDER_SLACK_MS
        ):
            beyond_cap += 1
        else:
            findings.add("post", key, record, "entry in the poster's feed")
    return beyond_cap


def _check_likes(stores: Stores, likes: dict[Key, dict[str, Any]], findings: _Findings) -> None:
    found, unmapped = stores.find_rows(likes, _pairs_query("likes", "photo_id", "user_id"))
    for key, record in likes.items():
        if key in unmapped:
            findings.add("like", key, record, UNMAPPED)
        elif key not in found:
            findings.add("like", key, record, "likes row")


def _check_follows(stores: Stores, follows: dict[Key, dict[str, Any]], findings: _Findings) -> None:
    following, following_unmapped = stores.find_rows(follows, _pairs_query("following", "user_id", "followee_id"))
    followers, followers_unmapped = stores.find_rows(
        ((followee, follower) for follower, followee in follows), _pairs_query("followers", "user_id", "follower_id")
    )
    for (follower, followee), record in follows.items():
        key = (follower, followee)
        if key in following_unmapped or (followee, follower) in followers_unmapped:
            findings.add("follow", key, record, UNMAPPED)
            continue
        if key not in following:
            findings.add("follow", key, record, "following row in the follower's shard")
        if (followee, follower) not in followers:
            findings.add("follow", key, record, "followers row in the followee's shard")


def verify_ledger(ledger_path: str | os.PathLike[str], config_path: str | os.PathLike[str]) -> VerifyReport:
    records, unparsable = read_ledger(ledger_path)
    by_op: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_op[record["op"]].append(record)
    signups = _unique(by_op["signup"], "user_id")
    posts = _unique(by_op["post"], "photo_id")
    likes = _unique(by_op["like"], "photo_id", "user_id")
    follows = _unique(by_op["follow"], "user_id", "followee_id")

    findings = _Findings()
    stores = Stores(os.fspath(config_path))
    try:
        _check_signups(stores, signups, findings)
        beyond_cap = _check_posts(stores, posts, findings)
        _check_likes(stores, likes, findings)
        _check_follows(stores, follows, findings)
    finally:
        stores.close()

    missing_writes = [
        MissingWrite(op=op, record=findings.records[op, key], missing=what)
        for (op, key), what in findings.missing.items()
    ]
    checked = {"signup": len(signups), "post": len(posts), "like": len(likes), "follow": len(follows)}
    return VerifyReport(
        ledger=os.fspath(ledger_path),
        checked=checked,
        missing={op: sum(1 for missing in missing_writes if missing.op == op) for op in checked},
        missing_writes=missing_writes,
        feed_entries_beyond_cap=beyond_cap,
        unparsable_lines=unparsable,
    )
