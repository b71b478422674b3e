"""The app's own counters (GET /stats), with the real app and its dependencies out of reach."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[postgres]
host = "127.0.20.250"
port = 9
user = "app"
directory_database = "directory"
connect_timeout = 2
[redis]
nodes = ["127.0.20.250:9"]
[memcached]
servers = ["127.0.20.250:9"]
[s3]
bucket = "b"
[stats]
path = "{stats}"
"""

REQUESTS = """
import json, django
django.setup()
from django.test import Client
client = Client()
health = client.get("/health").status_code
missing = client.get("/no-such-page").status_code
print(json.dumps({"health": health, "missing": missing, "stats": client.get("/stats").json()}))
"""


def test_a_health_probe_is_not_counted_as_a_request_nor_a_server_error(tmp_path):
    """Counted, the checks' own probes (each up to the health deadline, 0.9 s) made an idle app's
    mean latency theirs, and igops_app warned about it."""
    config = tmp_path / "app.toml"
    config.write_text(CONFIG.format(stats=tmp_path / "stats.db"))
    done = subprocess.run(
        [sys.executable, "-c", REQUESTS],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "IGOPS_APP_CONFIG": str(config), "DJANGO_SETTINGS_MODULE": "app.settings"},
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout.splitlines()[-1])
    assert (answers["health"], answers["missing"]) == (503, 404)
    stats = answers["stats"]
    assert (stats["requests"], stats["errors"], stats["client_errors"]) == (1, 0, 1)


BOOT = """
import json
import app.wsgi
from app.stats import CounterStore
from django.conf import settings
print(json.dumps(CounterStore(settings.IGOPS_CONFIG.stats.path).read()))
"""


def test_each_worker_boot_counts_a_worker_start(tmp_path):
    """gunicorn's workers each load app.wsgi (no --preload): /stats counts them, and a deploy's
    canary analysis reads the count's growth over its window as worker restarts."""
    config = tmp_path / "app.toml"
    config.write_text(CONFIG.format(stats=tmp_path / "stats.db"))
    counts = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", BOOT],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={"PATH": "/usr/bin:/bin", "IGOPS_APP_CONFIG": str(config)},
        )
        assert done.returncode == 0, done.stderr
        counts.append(json.loads(done.stdout.splitlines()[-1])["worker_starts"])
    assert counts == [1, 2]
