"""What the API does, independent of HTTP.

Every write is idempotent (explicit ids, ON CONFLICT DO NOTHING, LREM before
LPUSH) because failovers make the retry layers run some work twice, e.g. when
a COMMIT's reply is lost with the connection.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import psycopg2

from app.cache import UserCache
from app.config import AppConfig
from app.db import Cursor, PgConnections, is_retryable
from app.directory import Directory
from app.errors import ApiError, BadRequest, Conflict, NotFound, ServiceUnavailable, Unauthorized
from app.ids import shard_of
from app.redis_client import RedisMaster
from app.schema import schema_for
from app.shardmap import UnknownShard
from app.stats import Stats
from app.storage import PhotoStore, photo_key
from app.validation import sniff_content_type

log = logging.getLogger(__name__)
T = TypeVar("T")

FEED_FANOUT_BATCH = 500


# Shard schemas are spliced into SQL text: schema_for only ever yields
# "insta" plus an integer, so they are safe identifiers.
def _select_photos(schema: str) -> str:
    return (
        "SELECT p.id, p.user_id, p.s3_key, p.caption, p.created_at, "
        f"(SELECT count(*) FROM {schema}.likes l WHERE l.photo_id = p.id) "
        f"FROM {schema}.photos p"
    )


def _unmapped_user(user_id: int) -> ServiceUnavailable:
    # the user is authenticated, so the map ought to have the user's shard
    return ServiceUnavailable(f"logical shard {shard_of(user_id)} of user {user_id} is not in the shard map")


def session_key(token: str) -> str:
    return f"session:{token}"


def feed_key(user_id: int) -> str:
    return f"feed:{user_id}"


def _timestamp(value: datetime) -> str:
    return value.isoformat()


def _photo(row: tuple) -> dict[str, Any]:
    photo_id, user_id, s3_key, caption, created_at, like_count = row
    return {
        "id": photo_id,
        "user_id": user_id,
        "s3_key": s3_key,
        "caption": caption,
        "created_at": _timestamp(created_at),
        "like_count": like_count,
        "image_url": f"/api/photos/{photo_id}/image",
    }


class PhotoService:
    def __init__(
        self,
        config: AppConfig,
        pg: PgConnections,
        directory: Directory,
        redis_master: RedisMaster,
        user_cache: UserCache,
        photo_store: PhotoStore,
        stats: Stats,
    ):
        self.config = config
        self.pg = pg
        self.directory = directory
        self.redis = redis_master
        self.user_cache = user_cache
        self.photo_store = photo_store
        self.stats = stats

    # -- plumbing

    def _before_pg_retry(self, exc: BaseException) -> bool:
        self.stats.bump("db_retries")
        previous = self.directory.cached
        # a moved shard is worth retrying at once at its new place
        return self.directory.refresh().shard_map is not (previous.shard_map if previous else None)

    def _run(self, resolve_database: Callable[[], str], work: Callable[[Cursor], T]) -> T:
        try:
            return self.pg.run(resolve_database, work, before_retry=self._before_pg_retry)
        except psycopg2.Error as exc:
            if is_retryable(exc):
                raise ServiceUnavailable(f"database unavailable: {str(exc).strip()}") from exc
            raise

    def _in_shard(self, logical_shard: int, work: Callable[[Cursor], T], unmapped: ApiError) -> T:
        """Run `work` where the shard map puts `logical_shard`; `unmapped` is
        raised when the map has no such shard: a NotFound for ids from
        requests, since ids embed their shard, and a ServiceUnavailable where
        the shard is known to exist."""

        def resolve() -> str:
            try:
                return self.directory.snapshot().shard_map.database_for(logical_shard)
            except UnknownShard:
                raise unmapped from None

        return self._run(resolve, work)

    def _in_directory(self, work: Callable[[Cursor], T]) -> T:
        return self._run(lambda: self.directory.database, work)

    # -- users and sessions

    def sign_up(self, username: str) -> dict[str, Any]:
        shards = self.directory.snapshot().shard_map.logical_shards
        if not shards:
            raise ServiceUnavailable("the shard map is empty: no shard can take new users")
        shard = random.choice(shards)
        schema = schema_for(shard)

        def next_id(cursor: Cursor) -> int:
            cursor.execute(f"SELECT {schema}.next_id()")
            return cursor.fetchone()[0]

        shard_gone = ServiceUnavailable(f"logical shard {shard} left the shard map during sign-up")
        user_id = self._in_shard(shard, next_id, shard_gone)

        def claim(cursor: Cursor) -> int:
            cursor.execute(
                "INSERT INTO usernames (username, user_id) VALUES (%s, %s) "
                "ON CONFLICT (username) DO NOTHING RETURNING user_id",
                (username, user_id),
            )
            row = cursor.fetchone()
            if row is None:
                cursor.execute("SELECT user_id FROM usernames WHERE username = %s", (username,))
                row = cursor.fetchone()
            return row[0]

        # a retried claim finds its own earlier insert, hence the id comparison
        if self._in_directory(claim) != user_id:
            raise Conflict(f"username {username!r} is taken")

        def insert_user(cursor: Cursor) -> datetime | None:
            cursor.execute(
                f"INSERT INTO {schema}.users (id, username) VALUES (%s, %s) ON CONFLICT DO NOTHING", (user_id, username)
            )
            cursor.execute(f"SELECT created_at FROM {schema}.users WHERE id = %s", (user_id,))
            row = cursor.fetchone()
            return row[0] if row else None

        try:
            created_at = self._in_shard(shard, insert_user, shard_gone)
            if created_at is None:
                raise Conflict(f"username {username!r} is taken")
        except BaseException:
            self._release_username(username, user_id)
            raise

        token = secrets.token_urlsafe(32)
        self.redis.execute(lambda r: r.set(session_key(token), user_id, ex=self.config.redis.session_ttl))
        self.stats.bump("signups")
        user = {"id": user_id, "username": username, "created_at": _timestamp(created_at)}
        self.user_cache.set(user_id, user)
        return {**user, "token": token}

    def _release_username(self, username: str, user_id: int) -> None:
        def release(cursor: Cursor) -> None:
            cursor.execute("DELETE FROM usernames WHERE username = %s AND user_id = %s", (username, user_id))

        try:
            self._in_directory(release)
        except Exception:
            log.exception("sign-up of %r failed and its username claim could not be released", username)

    def authenticate(self, token: str) -> int:
        user_id = self.redis.execute(lambda r: r.get(session_key(token)))
        if user_id is None:
            raise Unauthorized("unknown or expired token")
        return int(user_id)

    def get_user(self, user_id: int) -> dict[str, Any]:
        cached = self.user_cache.get(user_id)
        if cached is not None:
            return cached
        schema = schema_for(shard_of(user_id))

        def select(cursor: Cursor) -> tuple | None:
            cursor.execute(f"SELECT id, username, created_at FROM {schema}.users WHERE id = %s", (user_id,))
            return cursor.fetchone()

        row = self._in_shard(shard_of(user_id), select, NotFound(f"no user {user_id}"))
        if row is None:
            raise NotFound(f"no user {user_id}")
        user = {"id": row[0], "username": row[1], "created_at": _timestamp(row[2])}
        self.user_cache.set(user_id, user)
        return user

    # -- the social graph

    def follow(self, follower_id: int, followee_id: int) -> bool:
        """Returns whether the follow is new."""
        if follower_id == followee_id:
            raise BadRequest("a user cannot follow themselves")
        self.get_user(followee_id)
        followee_schema = schema_for(shard_of(followee_id))
        follower_schema = schema_for(shard_of(follower_id))

        def add_follower(cursor: Cursor) -> None:
            cursor.execute(
                f"INSERT INTO {followee_schema}.followers (user_id, follower_id) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (followee_id, follower_id),
            )

        def add_following(cursor: Cursor) -> bool:
            cursor.execute(
                f"INSERT INTO {follower_schema}.following (user_id, followee_id) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (follower_id, followee_id),
            )
            return cursor.fetchone() is not None

        # followers first: fan-out reads it, so a follow is effective once that row exists
        self._in_shard(shard_of(followee_id), add_follower, NotFound(f"no user {followee_id}"))
        created = self._in_shard(shard_of(follower_id), add_following, _unmapped_user(follower_id))
        if created:
            self.stats.bump("follows")
        return created

    # -- photos

    def post_photo(self, user_id: int, caption: str, image: bytes) -> dict[str, Any]:
        shard = shard_of(user_id)
        schema = schema_for(shard)
        unmapped = _unmapped_user(user_id)

        def next_id(cursor: Cursor) -> int:
            cursor.execute(f"SELECT {schema}.next_id()")
            return cursor.fetchone()[0]

        photo_id = self._in_shard(shard, next_id, unmapped)
        s3_key = photo_key(photo_id)
        # bytes before metadata: a visible photo row always has its image
        self.photo_store.put(s3_key, image, sniff_content_type(image))

        def insert(cursor: Cursor) -> tuple[datetime, list[int]]:
            cursor.execute(
                f"INSERT INTO {schema}.photos (id, user_id, s3_key, caption) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING",
                (photo_id, user_id, s3_key, caption),
            )
            cursor.execute(f"SELECT created_at FROM {schema}.photos WHERE id = %s", (photo_id,))
            (created_at,) = cursor.fetchone()
            cursor.execute(f"SELECT follower_id FROM {schema}.followers WHERE user_id = %s", (user_id,))
            return created_at, [follower for (follower,) in cursor.fetchall()]

        created_at, followers = self._in_shard(shard, insert, unmapped)
        self._fan_out(photo_id, [user_id, *followers])
        self.stats.bump("photos_posted")
        return _photo((photo_id, user_id, s3_key, caption, created_at, 0))

    def _fan_out(self, photo_id: int, recipients: list[int]) -> None:
        cap = self.config.redis.feed_length
        for start in range(0, len(recipients), FEED_FANOUT_BATCH):
            batch = recipients[start : start + FEED_FANOUT_BATCH]

            def push(client, batch: list[int] = batch) -> None:
                # MULTI so a batch applies wholly or not at all; the LREM makes
                # a retry after a lost EXEC reply leave one copy, not two
                pipe = client.pipeline(transaction=True)
                for recipient in batch:
                    key = feed_key(recipient)
                    pipe.lrem(key, 0, photo_id)
                    pipe.lpush(key, photo_id)
                    pipe.ltrim(key, 0, cap - 1)
                pipe.execute()

            self.redis.execute(push)

    def like(self, user_id: int, photo_id: int) -> bool:
        """Returns whether the like is new."""
        schema = schema_for(shard_of(photo_id))
        missing = NotFound(f"no photo {photo_id}")

        def insert(cursor: Cursor) -> bool | None:
            cursor.execute(
                f"INSERT INTO {schema}.likes (photo_id, user_id) "
                f"SELECT %s, %s WHERE EXISTS (SELECT 1 FROM {schema}.photos WHERE id = %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (photo_id, user_id, photo_id),
            )
            if cursor.fetchone() is not None:
                return True
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {schema}.photos WHERE id = %s)", (photo_id,))
            return False if cursor.fetchone()[0] else None

        created = self._in_shard(shard_of(photo_id), insert, missing)
        if created is None:
            raise missing
        if created:
            self.stats.bump("likes")
        return created

    def get_photo(self, photo_id: int) -> dict[str, Any]:
        schema = schema_for(shard_of(photo_id))

        def select(cursor: Cursor) -> tuple | None:
            cursor.execute(f"{_select_photos(schema)} WHERE p.id = %s", (photo_id,))
            return cursor.fetchone()

        missing = NotFound(f"no photo {photo_id}")
        row = self._in_shard(shard_of(photo_id), select, missing)
        if row is None:
            raise missing
        return _photo(row)

    def photo_image(self, photo_id: int) -> tuple[bytes, str]:
        photo = self.get_photo(photo_id)
        image = self.photo_store.get(photo["s3_key"])
        if image is None:
            raise NotFound(f"photo {photo_id} has no stored image")
        return image

    def feed(self, user_id: int, limit: int) -> list[dict[str, Any]]:
        entries = self.redis.execute(lambda r: r.lrange(feed_key(user_id), 0, limit - 1))
        photo_ids = [int(entry) for entry in entries if entry.isdigit()]
        by_shard: dict[int, list[int]] = defaultdict(list)
        for photo_id in photo_ids:
            by_shard[shard_of(photo_id)].append(photo_id)

        photos: dict[int, dict[str, Any]] = {}
        for shard, ids in by_shard.items():
            schema = schema_for(shard)

            def select(cursor: Cursor, ids: list[int] = ids, schema: str = schema) -> list[tuple]:
                cursor.execute(f"{_select_photos(schema)} WHERE p.id = ANY(%s)", (ids,))
                return cursor.fetchall()

            try:
                rows = self._in_shard(shard, select, NotFound(f"logical shard {shard}"))
            except NotFound:
                log.warning(
                    "feed of user %s names photos on logical shard %s, which is not in the shard map", user_id, shard
                )
                continue
            photos.update((row[0], _photo(row)) for row in rows)
        return [photos[photo_id] for photo_id in photo_ids if photo_id in photos]
