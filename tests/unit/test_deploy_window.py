"""The window a canary analysis reads: the upstream agent's reads of an access log from where it
ended (as a host runs it), across a rotation; requests charged to the app host that answered;
and the worker restarts /stats counts."""

import base64
import http.server
import json
import os
import subprocess
import zlib

from igops import agent, deploy_window
from igops.deploy_accesslog import Request
from tests.serving import served
from tests.unit.test_deploy import app_fleet


def agent_reads(requests):
    """Each request's answer from the upstream agent run here as SSH runs it on a host."""
    command, prefix = agent.invocation("upstream", ["/nonexistent/upstream.conf", "true", "true", "1"])
    lines = b"".join(json.dumps(request).encode() + b"\n" for request in requests)
    done = subprocess.run(["sh", "-c", command], input=prefix + lines, capture_output=True, timeout=60)
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def since(log, mark):
    """The request that reads what was appended to `log` since the agent's answer `mark`."""
    return {
        "log": {"path": str(log), "inode": mark["log"]["inode"], "offset": mark["log"]["size"], "max_bytes": 1 << 20}
    }


def data_of(answer):
    return zlib.decompress(base64.b64decode(answer["log"]["data"]))


def test_only_what_was_appended_since_the_mark_is_read(tmp_path):
    log = tmp_path / "access.log"
    log.write_bytes(b"old 1\nold 2\n")
    [mark] = agent_reads([{"log": {"path": str(log)}}])
    assert mark["log"]["size"] == 12 and "data" not in mark["log"]
    with log.open("ab") as handle:
        handle.write(b"new 1\nnew 2\npartial")
    [read] = agent_reads([since(log, mark)])
    assert data_of(read) == b"new 1\nnew 2\npartial" and not read["log"]["rotated"]


def test_a_log_rotated_in_the_window_is_read_across_the_rotation(tmp_path):
    log = tmp_path / "access.log"
    log.write_bytes(b"before\n")
    [mark] = agent_reads([{"log": {"path": str(log)}}])
    with log.open("ab") as handle:
        handle.write(b"in window, old file\n")
    os.rename(log, tmp_path / "access.log.1")  # logrotate's create mode
    log.write_bytes(b"in window, new file\n")
    [read] = agent_reads([since(log, mark)])
    assert read["log"]["rotated"]
    assert data_of(read) == b"in window, old file\nin window, new file\n"
    # Truncated in place (copytruncate): what is there now is all new.
    log.write_bytes(b"x\n")
    [again] = agent_reads(
        [{"log": {"path": str(log), "inode": os.stat(log).st_ino, "offset": 500, "max_bytes": 1 << 20}}]
    )
    assert again["log"]["rotated"] and data_of(again) == b"x\n"


def test_a_read_stops_at_its_budget_and_says_so(tmp_path):
    log = tmp_path / "access.log"
    log.write_bytes(b"")
    inode = os.stat(log).st_ino
    log.write_bytes(b"y" * 5000)
    [read] = agent_reads([{"log": {"path": str(log), "inode": inode, "offset": 0, "max_bytes": 1000}}])
    assert read["log"]["truncated"] and len(data_of(read)) == 1000
    [missing] = agent_reads([{"log": {"path": str(tmp_path / "none.log")}}])
    assert "FileNotFoundError" in missing["error"]


def test_requests_are_charged_to_the_host_the_inventory_names_for_the_server(tmp_path):
    app = app_fleet(tmp_path)
    names = deploy_window.server_names(app)
    assert names["127.0.20.1:8000"] == "app1" and names["127.0.20.3:8000"] == "app3"
    records = [
        Request(1.0, "127.0.20.1:8000", 200, 0.01, "GET /x"),
        Request(2.0, "127.0.20.2:8000", 500, 0.02, "GET /x"),
        Request(3.0, "10.9.9.9:8000", 200, 0.01, "GET /x"),  # not an app server of this fleet
        Request(4.0, "127.0.20.1:8000", 201, 0.03, "POST /y"),
    ]
    charged = deploy_window.charge(records, names)
    assert {host: [r.time for r in found] for host, found in charged.items()} == {"app1": [1.0, 4.0], "app2": [2.0]}


class StatsHandler(http.server.BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_worker_starts_come_from_the_apps_stats_and_none_when_it_does_not_say():
    with served(http.server.HTTPServer(("127.0.0.1", 0), StatsHandler)) as server:
        port = server.server_address[1]
        StatsHandler.body = json.dumps({"requests": 5, "worker_starts": 7}).encode()
        assert deploy_window.fetch_worker_starts("127.0.0.1", port) == 7
        StatsHandler.body = json.dumps({"requests": 5}).encode()
        assert deploy_window.fetch_worker_starts("127.0.0.1", port) is None
        StatsHandler.body = b"not json"
        assert deploy_window.fetch_worker_starts("127.0.0.1", port) is None
    assert deploy_window.fetch_worker_starts("127.0.0.1", 9) is None
