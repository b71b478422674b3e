"""The lab fleet end to end: replication, balancing, the app across both clusters, monitoring
agents, moto's view of the volumes, igops status, a load run with its ledger verified, and
the lab's own idempotence and recovery."""

import base64
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from igops.ebs import EBS_READ_AHEAD_KB
from igops.errors import ExitCode
from igops.lab import aws, state, storage
from igops.lab.credentials import load as load_credentials
from igops.secrets import Secrets
from tests.conftest import run_igops
from tests.labtools import verify_lab_ledger

pytestmark = pytest.mark.lab

APP_CONFIG_HOST = "app1"


def _postgres(fleet, host_name: str, database: str = "postgres"):
    import psycopg2

    host = fleet.host(host_name)
    connection = psycopg2.connect(
        host=str(host.address),
        port=fleet.model.postgres.port,
        user=fleet.model.postgres.user,
        dbname=database,
        connect_timeout=5,
        password=Secrets(fleet.model.secrets.file).get("postgres_password"),
    )
    connection.autocommit = True
    return connection


def _eventually(check, timeout: float = 15, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


@pytest.mark.parametrize("cluster", ["main", "pg2"])
def test_row_written_on_primary_appears_on_standby(lab, cluster):
    members = lab.model.postgres.clusters[cluster]
    token = uuid.uuid4().hex
    primary = _postgres(lab, members.primary)
    with primary.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS lab_replication_probe (token text PRIMARY KEY, at timestamptz)")
        cursor.execute("INSERT INTO lab_replication_probe VALUES (%s, now())", (token,))
    primary.close()
    standby = _postgres(lab, members.standbys[0])

    def replicated():
        with standby.cursor() as cursor:
            cursor.execute(
                "SELECT pg_is_in_recovery(), EXISTS (SELECT 1 FROM pg_class WHERE relname = 'lab_replication_probe')"
            )
            in_recovery, exists = cursor.fetchone()
            assert in_recovery, f"{members.standbys[0]} is not a standby"
            if not exists:
                return False
            cursor.execute("SELECT count(*) FROM lab_replication_probe WHERE token = %s", (token,))
            return cursor.fetchone()[0] == 1

    try:
        assert _eventually(replicated), f"row from {members.primary} never reached {members.standbys[0]}"
    finally:
        standby.close()


def test_redis_replica_in_sync(lab):
    import redis

    master = lab.host(lab.model.redis.master)
    replica = lab.host(lab.model.redis.replicas[0])
    port = lab.model.redis.port
    writer = redis.Redis(host=str(master.address), port=port, socket_timeout=5)
    reader = redis.Redis(host=str(replica.address), port=port, socket_timeout=5)
    try:
        key, value = f"lab:probe:{uuid.uuid4().hex}", uuid.uuid4().hex
        writer.set(key, value, ex=60)
        master_offset = writer.info("replication")["master_repl_offset"]
        assert _eventually(lambda: reader.info("replication").get("slave_repl_offset", -1) >= master_offset)
        assert reader.info("replication")["master_link_status"] == "up"
        assert reader.get(key).decode() == value
    finally:
        writer.close()
        reader.close()


def _lb_url(fleet) -> str:
    lb = fleet.with_role("lb")[0]
    return f"http://{lb.address}:{fleet.model.lb.port}"


def test_load_balancer_serves_every_app_server(lab):
    import requests

    expected = {f"{host.address}:{lab.model.app.port}" for host in lab.with_role("app")}
    seen = set()
    with requests.Session() as session:
        for _ in range(60):
            response = session.get(_lb_url(lab) + "/health", timeout=10)
            assert response.status_code == 200, response.text
            seen.add(response.headers["X-Upstream"])
            if seen == expected:
                break
    assert seen == expected


def test_a_dependency_away_on_every_app_server_does_not_take_them_out_of_the_balancer(lab):
    """While PgBouncer is paused (as in a switchover) every app server answers /health 503 alike.
    That is no reason to mark them down: requests that come right after the resume must reach
    them, not get nginx's 502 "no live upstreams"."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from igops.lab import pooler

    credentials = load_credentials(state.paths())
    try:
        with pooler.admin(credentials) as cursor:
            cursor.execute("PAUSE")
        # Enough failing probes that each nginx worker sees max_fails (2) of each server.
        with ThreadPoolExecutor(8) as pool:
            during = list(pool.map(lambda _: requests.get(_lb_url(lab) + "/health", timeout=10).status_code, range(8)))
        assert set(during) == {503}, during
    finally:
        with pooler.admin(credentials) as cursor:
            cursor.execute("RESUME")
    with ThreadPoolExecutor(16) as pool:
        after = list(pool.map(lambda _: requests.get(_lb_url(lab) + "/health", timeout=10).status_code, range(32)))
    assert after.count(502) == 0, after


def _shard_of(user_id: int) -> int:
    return (user_id >> 10) & 8191


def _cluster_of(fleet, shard: int) -> str:
    connection = _postgres(fleet, fleet.model.postgres.clusters["main"].primary, "directory")
    with connection.cursor() as cursor:
        cursor.execute("SELECT cluster FROM shard_map WHERE logical_shard = %s", (shard,))
        cluster = cursor.fetchone()[0]
    connection.close()
    return cluster


def test_app_api_end_to_end_across_both_clusters(lab):
    import requests

    base = _lb_url(lab)
    session = requests.Session()
    users_by_cluster: dict[str, dict] = {}
    for _ in range(60):
        response = session.post(f"{base}/api/users", json={"username": f"lab{uuid.uuid4().hex[:12]}"}, timeout=10)
        assert response.status_code == 201, response.text
        user = response.json()
        users_by_cluster.setdefault(_cluster_of(lab, _shard_of(user["id"])), user)
        if len(users_by_cluster) == 2:
            break
    assert set(users_by_cluster) == {"main", "pg2"}, "sign-ups never landed on both clusters"
    alice, bob = users_by_cluster["main"], users_by_cluster["pg2"]
    auth = lambda user: {"Authorization": f"Token {user['token']}"}  # noqa: E731

    response = session.post(f"{base}/api/follow", json={"user_id": bob["id"]}, headers=auth(alice), timeout=10)
    assert response.status_code == 201, response.text
    image = base64.b64encode(b"\xff\xd8\xff" + os.urandom(512)).decode()
    response = session.post(
        f"{base}/api/photos", json={"caption": "from pg2", "image_base64": image}, headers=auth(bob), timeout=10
    )
    assert response.status_code == 201, response.text
    photo = response.json()
    assert _cluster_of(lab, _shard_of(photo["id"])) == "pg2"

    feed = session.get(f"{base}/api/feed", headers=auth(alice), timeout=10)
    assert feed.status_code == 200, feed.text
    assert photo["id"] in [item["id"] for item in feed.json()["photos"]], "fan-out missed the follower's feed"

    response = session.post(f"{base}/api/photos/{photo['id']}/like", headers=auth(alice), timeout=10)
    assert response.status_code == 201, response.text
    detail = session.get(f"{base}/api/photos/{photo['id']}", timeout=10).json()
    assert detail["like_count"] == 1
    stored = session.get(f"{base}/api/photos/{photo['id']}/image", timeout=10)
    assert stored.status_code == 200 and stored.content == base64.b64decode(image)


def _munin(address: str, command: str) -> str:
    with socket.create_connection((address, 4949), timeout=10) as sock:
        stream = sock.makefile("rwb")
        banner = stream.readline().decode()
        stream.write(f"{command}\n".encode())
        stream.flush()
        answer = stream.readline().decode()
        stream.write(b"quit\n")
        stream.flush()
    return banner + answer


def test_munin_node_answers_list_on_every_host(lab):
    for host in lab.hosts:
        text = _munin(str(host.address), "list")
        assert text.startswith(f"# munin node at {host.name}\n"), text
        assert "load" in text.split("\n")[1].split(), text


def test_moto_holds_each_postgres_mounts_volumes(lab):
    ec2 = aws.client("ec2")
    for host in lab.with_role("postgres"):
        assert {mount.purpose for mount in host.mounts} == {"data", "wal"}
        for mount in host.mounts:
            filters = [
                {"Name": "attachment.instance-id", "Values": [host.instance_id]},
                {"Name": "attachment.device", "Values": [mount.device]},
            ]
            volumes = ec2.describe_volumes(Filters=filters)["Volumes"]
            assert len(volumes) == 1
            attachment = volumes[0]["Attachments"][0]
            assert (attachment["InstanceId"], attachment["Device"]) == (host.instance_id, mount.device)
            tags = {tag["Key"]: tag["Value"] for tag in volumes[0]["Tags"]}
            assert tags["igops:host"] == host.name and tags["igops:mount"] == mount.path
            assert any(
                m.source == mount.device for m in storage.mounts_under(state.paths().root) if str(m.path) == mount.path
            )
            # Read-ahead as on an EBS volume, not the loop's backing disk's megabytes.
            device = Path(mount.device).resolve().name
            assert Path(f"/sys/block/{device}/queue/read_ahead_kb").read_text().strip() == str(EBS_READ_AHEAD_KB)
    assert "igops-photos" in {b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]}


def _until_ok(*args: str):
    """The CLI's result once it exits 0, or its last result after 20 s: a health check may
    miss its deadline once on a busy machine; a broken service keeps failing."""
    deadline = time.monotonic() + 20
    while True:
        result = run_igops(*args)
        if result.returncode == ExitCode.OK or time.monotonic() > deadline:
            return result
        time.sleep(1)


def test_igops_status_against_the_lab(lab):
    result = _until_ok("-c", str(lab.source), "status", "--json")
    assert result.returncode == ExitCode.OK, result.stdout[-2000:] + result.stderr
    data = json.loads(result.stdout)["data"]
    assert len(data["hosts"]) == len(state.HOSTS)
    assert all(host["reachable"] for host in data["hosts"])
    assert all(service["ok"] for service in data["services"])


def test_lab_status_json(lab):
    result = _until_ok("lab", "status", "--json")
    assert result.returncode == ExitCode.OK, result.stdout[-2000:] + result.stderr
    envelope = json.loads(result.stdout)
    assert envelope["ok"] and envelope["command"] == "lab status"
    components = envelope["data"]["components"]
    names = {component["component"] for component in components}
    assert {
        "ssh",
        "postgres",
        "pgbouncer",
        "redis",
        "memcached",
        "munin-node",
        "gunicorn",
        "nginx",
        "moto",
        "moto-tls",
        "pagerduty-receiver",
        "pingdom-receiver",
        "volume data",
        "volume wal",
    } <= names
    assert all(component["ok"] for component in components)


def test_loadgen_through_the_load_balancer_loses_nothing(lab, tmp_path):
    from app.loadgen import run_load

    ledger = tmp_path / "ledger.jsonl"
    report = run_load(url=_lb_url(lab), rate=100, duration=15, ledger=ledger, users=30, seed=7)
    assert report.errors == 0, report.errors_by_kind
    assert report.writes_acked > 0
    result = verify_lab_ledger(ledger, APP_CONFIG_HOST)
    assert result.ok, result.missing_writes[:5]
    # verify must see a photo that is gone: delete one object the run acknowledged, at either
    # end of the key range the verifier lists.
    posts = sorted(
        record["s3_key"]
        for record in map(json.loads, ledger.read_text().splitlines())
        if record.get("op") == "post" and record.get("s3_key")
    )
    assert len(posts) > 2
    s3 = aws.client("s3")
    for key in (posts[0], posts[-1]):
        s3.delete_object(Bucket=state.PHOTO_BUCKET, Key=key)
    missing = verify_lab_ledger(ledger, APP_CONFIG_HOST).missing_writes
    assert sorted(m.record["s3_key"] for m in missing if "s3_key" in m.record) == [posts[0], posts[-1]], missing


def test_a_load_run_ends_when_its_caller_says_stop(lab, tmp_path):
    """A bench that switches over N times stops the load after the last one, not at a
    duration guessed beforehand; that is not an interruption."""
    import threading

    from app.loadgen import run_load

    done = threading.Event()
    stop = threading.Timer(3.0, done.set)
    stop.start()
    report = run_load(url=_lb_url(lab), rate=50, duration=120, ledger=tmp_path / "l.jsonl", users=4, stop=done)
    assert report.duration_s < 30 and report.writes_acked > 0 and not report.interrupted


def test_every_app_host_starts_on_one_release(lab):
    """As one deploy would leave them: a canary analysis compares the canary with the app
    servers still on the canary's release, and finds none when the first ids differ."""
    paths = state.paths()
    currents = {name: (paths.app_root(name) / "current").resolve().name for name in ("app1", "app2", "app3")}
    assert len(set(currents.values())) == 1, currents


def test_lab_up_again_changes_nothing(lab):
    """Also while munin-node serves a connection: the child it forks for it holds the
    listening socket under another name, and is still the lab's own."""
    from igops import lab as lab_module
    from igops.lab import proc
    from igops.output import Reporter

    paths = state.paths()
    pid_files = [paths.pgdata(name) / "postmaster.pid" for name in ("db1", "db2", "db3", "db4")]
    pid_files += [paths.app_root("app1") / "shared" / "gunicorn.pid", paths.nginx_dir() / "nginx.pid"]
    before = [proc.running_pid(pid_file, paths.root) for pid_file in pid_files]
    started = time.monotonic()
    with socket.create_connection((str(lab.host("cache1").address), state.MUNIN_PORT), timeout=5) as munin:
        munin.recv(100)
        report = lab_module.up(Reporter())
    assert time.monotonic() - started < 30
    assert all(component.ok for component in report.components)
    assert [proc.running_pid(pid_file, paths.root) for pid_file in pid_files] == before
    assert str(lab.source) == report.inventory


def test_recovery_thaws_a_frozen_mount(lab):
    from igops import lab as lab_module

    paths = state.paths()
    mount = paths.mount_point("redis2", "data")
    storage.freeze(mount)
    try:
        written = threading.Event()
        writer = threading.Thread(
            target=lambda: ((mount / "lab-freeze-probe").write_text("x"), written.set()), daemon=True
        )
        writer.start()
        assert not written.wait(0.5), "the filesystem did not freeze"
        recovered = lab_module.recover(paths)
        assert f"thawed {mount}" in recovered
        assert written.wait(5), "the write did not complete after the thaw"
    finally:
        storage.thaw(mount)
        (mount / "lab-freeze-probe").unlink(missing_ok=True)
