"""The load balancers' access-log lines as the canary analysis reads them: the format igops
installs, retries charged to the server that failed, endpoints with their ids collapsed."""

import re
from pathlib import Path

import pytest

from igops import deploy_accesslog as accesslog

ROOT = Path(__file__).resolve().parents[2]

LINE = (
    '127.0.0.1 [12/Mar/2026:10:00:01 +0000] "GET /api/photos/1234567/image?size=2 HTTP/1.1" 200 5120 '
    "upstream=127.0.10.11:8000 rt=0.012 urt=0.011 ts=1773309601.123 ust=200"
)


def test_a_line_is_one_record_of_the_server_that_answered():
    [record] = accesslog.parse_line(LINE)
    assert record == accesslog.Request(1773309601.123, "127.0.10.11:8000", 200, 0.011, "GET /api/photos/:id/image")


def test_a_retried_request_charges_each_server_with_its_own_answer():
    line = (
        '10.0.0.5 [12/Mar/2026:10:00:01 +0000] "POST /api/photos HTTP/1.1" 201 310 '
        "upstream=127.0.10.11:8000, 127.0.10.12:8000 rt=2.010 urt=2.001, 0.008 ts=1773309601.5 ust=502, 201"
    )
    first, second = accesslog.parse_line(line)
    assert (first.upstream, first.status, first.request_time) == ("127.0.10.11:8000", 502, 2.001)
    assert (second.upstream, second.status, second.request_time) == ("127.0.10.12:8000", 201, 0.008)
    assert first.endpoint == second.endpoint == "POST /api/photos"


def test_the_older_format_still_parses_timed_to_the_second():
    line = (
        '127.0.0.1 [12/Mar/2026:10:00:01 +0000] "GET /api/feed?limit=5 HTTP/1.1" 503 40 '
        "upstream=127.0.10.13:8000, 127.0.10.11:8000 rt=0.100 urt=0.050, 0.050"
    )
    first, second = accesslog.parse_line(line)
    assert first.time == 1773309601.0 and first.status == accesslog.FAILED_ATTEMPT_STATUS
    assert second.status == 503 and second.endpoint == "GET /api/feed"


def test_fields_are_read_by_name_and_lines_of_another_format_are_counted_not_guessed():
    reordered = (
        '127.0.0.1 [12/Mar/2026:10:00:01 +0000] "GET /health HTTP/1.1" 200 40 '
        "ts=1773309601.2 ust=200 extra=abc upstream=127.0.10.11:8000 rt=0.004 urt=0.004"
    )
    parsed = accesslog.parse_lines(
        [
            reordered,
            '127.0.0.1 - - [12/Mar/2026:10:00:01 +0000] "GET / HTTP/1.1" 200 612 "-" "curl/8"',  # nginx's combined
            '127.0.0.1 [12/Mar/2026:10:00:01 +0000] "\\x16\\x03\\x01" 400 150 upstream=- rt=0.000 urt=- ts=1.0 ust=-',
            '127.0.0.1 [12/Mar/2026:10:00:01 +0000] "GET /x HTTP/1.1" 502 150 upstream=app rt=0.000 urt=- ts=1.0 ust=-',
            "",
        ]
    )
    assert [(r.endpoint, r.status) for r in parsed.records] == [("GET /health", 200)]
    assert (parsed.unparsed, parsed.unattributed) == (2, 1), "no live upstreams names no server"


@pytest.mark.parametrize(
    ("target", "endpoint"),
    [
        ("/api/users/123", "/api/users/:id"),
        ("/api/users/not-a-number", "/api/users/:id"),  # the app's 400 for it is still that view's
        ("/api/photos/9/like", "/api/photos/:id/like"),
        ("/api/photos?x=1", "/api/photos"),
        ("/health", "/health"),
        ("/no/such/42/path", "/no/such/:id/path"),
        ("/static/0123456789abcdef0123/logo.png", "/static/:id/logo.png"),
        ("http://example.com/api/feed?limit=2", "/api/feed"),
        ("/", "/"),
    ],
)
def test_ids_in_paths_collapse_so_one_view_is_one_endpoint(target, endpoint):
    assert accesslog.normalise_path(target) == endpoint


def test_the_routes_are_the_apps_own():
    """igops cannot import the app (Django): the routes it collapses ids in are kept equal to
    app/urls.py's by this test."""
    text = (ROOT / "app" / "urls.py").read_text()
    declared = [re.sub(r"<\w+:(\w+)>", r"<\1>", route) for route in re.findall(r'path\("([^"]*)"', text)]
    assert sorted(declared) == sorted(accesslog.APP_ROUTES)


def test_the_labs_log_format_gives_lines_the_parser_reads():
    """The template's format, filled as nginx would fill it, is what parse_line reads."""
    template = (ROOT / "igops" / "lab" / "templates" / "nginx.conf").read_text()
    [body] = re.findall(r"log_format upstream ((?:'[^']*'\s*)+);", template)
    format_text = "".join(re.findall(r"'([^']*)'", body)).replace("$$", "$")
    values = {
        "remote_addr": "127.0.0.1",
        "time_local": "12/Mar/2026:10:00:01 +0000",
        "request": "GET /api/users/5 HTTP/1.1",
        "status": "200",
        "body_bytes_sent": "99",
        "upstream_addr": "127.0.10.12:8000",
        "request_time": "0.020",
        "upstream_response_time": "0.019",
        "msec": "1773309601.250",
        "upstream_status": "200",
    }
    line = re.sub(r"\$(\w+)", lambda found: values[found.group(1)], format_text)
    [record] = accesslog.parse_line(line)
    assert record == accesslog.Request(1773309601.25, "127.0.10.12:8000", 200, 0.019, "GET /api/users/:id")


def test_a_line_still_being_written_is_left_for_the_next_read():
    assert accesslog.complete_lines(b"one\ntwo\nthr") == ["one", "two"]
    assert accesslog.complete_lines(b"") == []
