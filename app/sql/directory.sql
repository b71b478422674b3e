-- The directory: which physical cluster holds each logical shard, where the
-- Redis master is, and the global username claims. igops edits shard_map and
-- endpoints; every app worker polls the two version columns about once a
-- second and reloads when either changes.

CREATE TABLE IF NOT EXISTS clusters (
    name text PRIMARY KEY,
    pgbouncer_database text NOT NULL
);

CREATE TABLE IF NOT EXISTS shard_map (
    logical_shard integer PRIMARY KEY,
    cluster text NOT NULL REFERENCES clusters(name)
);

CREATE TABLE IF NOT EXISTS shard_map_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Seeded so that a map change can always be a plain UPDATE ... version + 1.
INSERT INTO shard_map_version (singleton, version) VALUES (true, 0)
ON CONFLICT (singleton) DO NOTHING;

CREATE TABLE IF NOT EXISTS endpoints (
    name text PRIMARY KEY,
    address text NOT NULL,
    version bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS usernames (
    username text PRIMARY KEY,
    user_id bigint NOT NULL
);

CREATE INDEX IF NOT EXISTS shard_map_cluster_idx ON shard_map (cluster);
