"""The app's /health under concurrent probes: the app of this tree, started with gunicorn as the
lab runs it (threads sharing one worker), against the lab's real PgBouncer, Postgres, Redis and
memcached. A load balancer, a monitor and `igops status` probe at once; each must get a true
answer."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from igops.lab import state
from tests.conftest import ROOT

pytestmark = pytest.mark.lab

THREADS = 8
PROBES = 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture
def app_url(lab, tmp_path):
    """This tree's app on a free port, configured as app1 is but with its own stats file."""
    config = (state.paths().app_root("app1") / "shared" / "app.toml").read_text()
    stats = f'path = "{tmp_path / "stats.db"}"'
    config = "\n".join(stats if line.startswith("path = ") else line for line in config.splitlines()) + "\n"
    (tmp_path / "app.toml").write_text(config)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
                "--threads",
                str(THREADS),
                "--worker-class",
                "gthread",
                "--chdir",
                str(ROOT),
                "app.wsgi:application",
            ],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "IGOPS_APP_CONFIG": str(tmp_path / "app.toml")},
        )
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = get_health(url)
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
                continue
            assert status == 200, f"the lab is not healthy: {body}"
            break
        yield url
    finally:
        server.terminate()
        server.wait(30)


def test_concurrent_health_probes_each_get_a_true_answer(app_url):
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def probe(start: threading.Barrier) -> None:
        start.wait()
        answer = get_health(app_url)
        with lock:
            answers.append(answer)

    for _ in range(PROBES // THREADS):
        start = threading.Barrier(THREADS)
        probes = [threading.Thread(target=probe, args=(start,)) for _ in range(THREADS)]
        for thread in probes:
            thread.start()
        for thread in probes:
            thread.join(30)
    assert len(answers) == PROBES
    failed = [body for status, body in answers if status != 200]
    assert not failed, f"{len(failed)} of {PROBES} concurrent probes failed, e.g. {failed[0]}"
    assert all(body["checks"]["directory"]["ok"] and body["checks"]["redis"]["ok"] for _, body in answers)


def test_a_directory_read_slower_than_the_first_wait_does_not_fail_a_cold_thread(lab, app_url):
    """A worker thread that has served no API request has no directory of its own. When the
    directory answers more slowly than the check's first wait (0.4 s: a busy primary), every
    probe must still get a true answer, not 503 "cluster list unknown"."""
    from igops import postgres_admin
    from tests.labtools import postgres

    primary = postgres_admin.primary_of(lab, lab.model.shards.directory_cluster)
    holder = postgres(lab, primary.name, lab.model.shards.directory_database)
    holder.autocommit = False
    try:
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLE shard_map_version IN ACCESS EXCLUSIVE MODE")
        release = threading.Timer(0.6, holder.rollback)
        release.start()
        answers: list[tuple[int, dict]] = []
        probes = [threading.Thread(target=lambda: answers.append(get_health(app_url))) for _ in range(THREADS)]
        for thread in probes:
            thread.start()
        for thread in probes:
            thread.join(30)
        release.join()
    finally:
        holder.close()
    failed = [body for status, body in answers if status != 200]
    assert len(answers) == THREADS and not failed, f"{len(failed)} of {THREADS} probes failed, e.g. {failed[:1]}"
