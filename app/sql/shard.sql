-- One logical shard: a schema holding every sharded table.
-- A template filled with Python str.format. It has two placeholders, each
-- written as its name in braces: schema (the app finds logical shard N in the
-- schema named insta followed by N, e.g. insta5) and shard_id (N itself).
-- Braces appear nowhere else; a literal brace would have to be doubled.
-- Every table has a primary key because shard moves use logical replication.

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE SEQUENCE IF NOT EXISTS {schema}.table_id_seq;

-- 41 bits of milliseconds since Instagram's epoch (2011-08-24 21:07:01.721
-- UTC), 13 bits of logical shard, 10 bits of a per-shard sequence: ids sort
-- by creation time and decode to their shard as (id >> 10) & 8191.
CREATE OR REPLACE FUNCTION {schema}.next_id(OUT result bigint) AS $$
DECLARE
    our_epoch bigint := 1314220021721;
    seq_id bigint;
    now_millis bigint;
    shard_id bigint := {shard_id};
BEGIN
    SELECT nextval('{schema}.table_id_seq') % 1024 INTO seq_id;
    SELECT FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000) INTO now_millis;
    result := (now_millis - our_epoch) << 23;
    result := result | (shard_id << 10);
    result := result | (seq_id);
END;
$$ LANGUAGE plpgsql;

CREATE TABLE IF NOT EXISTS {schema}.users (
    id bigint PRIMARY KEY DEFAULT {schema}.next_id(),
    username text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS {schema}.photos (
    id bigint PRIMARY KEY DEFAULT {schema}.next_id(),
    user_id bigint NOT NULL,
    s3_key text NOT NULL,
    caption text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS photos_user_id_idx ON {schema}.photos (user_id, id DESC);

-- In the photo's shard, so a like count is one local query.
CREATE TABLE IF NOT EXISTS {schema}.likes (
    photo_id bigint NOT NULL,
    user_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (photo_id, user_id)
);

-- In the follower's shard: whom a user follows.
CREATE TABLE IF NOT EXISTS {schema}.following (
    user_id bigint NOT NULL,
    followee_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, followee_id)
);

-- In the followee's shard: who follows a user, read for feed fan-out.
CREATE TABLE IF NOT EXISTS {schema}.followers (
    user_id bigint NOT NULL,
    follower_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, follower_id)
);
