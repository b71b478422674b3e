"""`igops warm` without a fleet: which directories may be captured and where they land on another
host, the refusals made before any host is contacted, and the page-cache agent itself run here
on real files (capture with mincore, warm exactly, skip what changed, throttle)."""

import io
import json
import mmap
import os
import struct
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from igops import agent, inventory, profile, vmtouch, warm_paths
from igops.agent import pagecache, pagecache_profile
from igops.errors import RefusedError, UsageError

PAGE = mmap.PAGESIZE


def fleet_of(tmp_path: Path, extra: str = ""):
    text = f"""
[fleet]
name = "unit"
[postgres]
data_directory = "/srv/{{host}}/pg/data"
[postgres.clusters.main]
primary = "db1"
standbys = ["db2"]
[postgres.clusters.other]
primary = "db3"
[[hosts]]
name = "db1"
address = "10.0.0.1"
roles = ["postgres"]
[[hosts.mounts]]
path = "/srv/db1/pg"
[[hosts.mounts]]
path = "/srv/db1/wal"
purpose = "wal"
[[hosts]]
name = "db2"
address = "10.0.0.2"
roles = ["postgres"]
[[hosts.mounts]]
path = "/srv/db2/pg"
[[hosts.mounts]]
path = "/srv/db2/wal"
purpose = "wal"
[[hosts]]
name = "db3"
address = "10.0.0.3"
roles = ["postgres"]
[[hosts]]
name = "media1"
address = "10.0.0.4"
roles = ["app"]
[[hosts.mounts]]
path = "/data1"
[[hosts.mounts]]
path = "/data2"
{extra}"""
    return inventory.validate(tomllib.loads(text), tmp_path / "igops.toml")


# --- where, and whether ----------------------------------------------------------------------------
def test_default_root_is_the_postgres_data_directory(tmp_path):
    fleet = fleet_of(tmp_path)
    [root] = warm_paths.source_roots(fleet, fleet.host("db1"), None)
    assert root == profile.Root("/srv/db1/pg/data", "postgres", "")
    assert warm_paths.target_paths(fleet, [root], fleet.host("db2")) == ["/srv/db2/pg/data"]


def test_roots_map_through_their_base(tmp_path):
    fleet = fleet_of(tmp_path)
    roots = warm_paths.source_roots(fleet, fleet.host("db1"), ["/srv/db1/pg/data/base/16384/", "/srv/db1/wal/archive"])
    assert roots == [
        profile.Root("/srv/db1/pg/data/base/16384", "postgres", "base/16384"),
        profile.Root("/srv/db1/wal/archive", "mount:wal", "archive"),
    ]
    assert warm_paths.target_paths(fleet, roots, fleet.host("db2")) == [
        "/srv/db2/pg/data/base/16384",
        "/srv/db2/wal/archive",
    ]


def test_mounts_sharing_a_purpose_keep_their_path(tmp_path):
    fleet = fleet_of(tmp_path)
    [root] = warm_paths.source_roots(fleet, fleet.host("media1"), ["/data2/photos"])
    assert root == profile.Root("/data2/photos", "path", "")
    with pytest.raises(RefusedError, match="outside db2's data mounts"):
        warm_paths.target_paths(fleet, [root], fleet.host("db2"))


@pytest.mark.parametrize("path", ["/etc", "/srv/db1/pg/../../../etc", "/srv/db1", "/srv/db1/pgx"])
def test_paths_outside_the_data_mounts_are_refused(tmp_path, path):
    fleet = fleet_of(tmp_path)
    with pytest.raises(RefusedError, match="outside db1's data mounts"):
        warm_paths.source_roots(fleet, fleet.host("db1"), [path])


def test_bad_path_arguments_are_usage_errors(tmp_path):
    fleet = fleet_of(tmp_path)
    with pytest.raises(UsageError, match="not an absolute path"):
        warm_paths.source_roots(fleet, fleet.host("db1"), ["data"])
    with pytest.raises(UsageError, match="lies inside"):
        warm_paths.source_roots(fleet, fleet.host("db1"), ["/srv/db1/pg", "/srv/db1/pg/data"])
    with pytest.raises(UsageError, match="no Postgres role"):
        warm_paths.source_roots(fleet, fleet.host("media1"), None)


def test_profiles_of_another_cluster_or_fleet_are_refused(tmp_path):
    fleet = fleet_of(tmp_path)
    roots = warm_paths.source_roots(fleet, fleet.host("db3"), ["/srv/db3/pg/data"])
    with pytest.raises(RefusedError, match="cluster 'other' .*db2 is in cluster 'main'"):
        warm_paths.check_target(fleet, "unit", "db3", "other", roots, fleet.host("db2"))
    with pytest.raises(RefusedError, match="from fleet 'staging'"):
        warm_paths.check_target(fleet, "staging", "db1", "main", roots, fleet.host("db2"))
    with pytest.raises(RefusedError, match="no postgres role"):
        warm_paths.target_paths(fleet, roots, fleet.host("media1"))


def test_copy_plans_refuse_before_contacting_a_host(tmp_path):
    fleet = fleet_of(tmp_path)
    options = vmtouch.WarmOptions()
    with pytest.raises(UsageError, match="both source and target"):
        vmtouch.plan_copy(fleet, "db1", "db1", None, options)
    with pytest.raises(RefusedError, match="cluster"):
        vmtouch.plan_copy(fleet, "db1", "db3", None, options)
    with pytest.raises(UsageError, match="unknown host"):
        vmtouch.plan_copy(fleet, "db1", "db9", None, options)
    plan = vmtouch.plan_copy(fleet, "db1", "db2", None, vmtouch.WarmOptions(concurrency=4, rate=50 << 20))
    steps = plan.steps()
    assert "Postgres system identifier is db1's" in steps[1]
    assert "4 reads in flight, at most 50.0 MiB/s" in steps[2]
    assert "db1:/srv/db1/pg/data -> db2:/srv/db2/pg/data" in steps[2]


def test_a_restored_copy_is_warmed_in_its_own_directory_only(tmp_path):
    fleet = fleet_of(tmp_path)
    with pytest.raises(UsageError, match="db1 is not a member of other") as refused:
        vmtouch.plan_copy_onto_restored(fleet, "db1", "media1", "other", "/data1/g/pg/data", vmtouch.WarmOptions())
    assert refused.value.hint == "warm from a member of other: db3"
    plan = vmtouch.plan_copy_onto_restored(fleet, "db2", "media1", "main", "/data1/g/pg/data", vmtouch.WarmOptions())
    assert "db2:/srv/db2/pg/data -> media1:/data1/g/pg/data" in plan.steps()[2]
    command, _ = vmtouch._warm_invocation(fleet, fleet.host("media1"), plan)
    args = command.split("igops-pagecache", 1)[1]
    assert "--cluster-dir /data1/g/pg/data --within /data1/g/pg/data" in args
    assert args.count("--within") == 1


def test_apply_plan_counts_the_profile(tmp_path):
    fleet = fleet_of(tmp_path)
    stream = io.BytesIO()
    header = {
        "host": "db1",
        "fleet": "unit",
        "postgres_cluster": "main",
        "cluster_id": "42",
        "page_size": PAGE,
        "captured_at": "now",
        "roots": [{"path": "/srv/db1/pg/data", "base": "postgres", "within": ""}],
    }
    writer = pagecache_profile.Writer(stream, header)
    writer.add(pagecache_profile.FileEntry(0, "base/1/1", 100 * PAGE, 0, ((0, 10), (50, 5))))
    writer.finish(1, 1, 100, 0)
    plan = vmtouch.plan_apply(fleet, profile.parse(stream.getvalue()), "db2", vmtouch.WarmOptions(), "p.gz")
    assert (plan.files, plan.pages, plan.bytes, plan.target_paths) == (1, 15, 15 * PAGE, ["/srv/db2/pg/data"])
    assert "system identifier is 42" in plan.steps()[1]


@pytest.mark.parametrize("text, value", [("50M", 50 << 20), ("1.5G", 3 << 29), ("4096", 4096), ("64kib/s", 64 << 10)])
def test_rates(text, value):
    assert vmtouch.parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "10 M M", "100"])
def test_bad_rates(text):
    with pytest.raises(UsageError):
        vmtouch.parse_rate(text)


# --- the agent, on real files here ------------------------------------------------------------------
def make_file(path: Path, pages: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(os.urandom(pages * PAGE))
        os.fsync(handle.fileno())
    return path


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def touch_runs(path: Path, runs) -> None:
    """Make exactly these pages resident: evict, then read them with readahead off."""
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    for first, count in runs:
        os.pread(fd, count * PAGE, first * PAGE)
    os.close(fd)


def residency(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.resident_map(fd, os.fstat(fd).st_size, PAGE)
    finally:
        os.close(fd)


def resident_runs(path: Path):
    return pagecache.runs_of(residency(path))


PATTERN = {"base/1/1000": ((0, 1), (7, 9), (40, 3), (63, 1)), "base/1/1001": ((10, 30),), "base/2/1": ((5, 1),)}


@pytest.fixture
def two_hosts(tmp_path):
    """A source and a target directory holding the same files; the source has PATTERN resident."""
    source, target = tmp_path / "source", tmp_path / "target"
    for relative in [*PATTERN, "base/1/cold"]:
        make_file(source / relative, 64)
        target.joinpath(relative).parent.mkdir(parents=True, exist_ok=True)
        target.joinpath(relative).write_bytes(source.joinpath(relative).read_bytes())
        os.sync()
        evict(target / relative)
        evict(source / relative)
    for relative, runs in PATTERN.items():
        touch_runs(source / relative, runs)
    return source, target


def capture_here(root: Path, cluster_dir: Path | None = None, base: str = "path") -> bytes:
    stream = io.BytesIO()
    header = {
        "host": "src",
        "fleet": "unit",
        "postgres_cluster": None,
        "roots": [{"path": str(root), "base": base, "within": ""}],
    }
    pagecache.capture(header, str(cluster_dir) if cluster_dir else None, [str(root)], stream)
    return stream.getvalue()


def warm_here(text: bytes, root: Path, match="size", concurrency=4, rate=0, cluster_dir=None):
    events = []
    reader = pagecache_profile.Reader(io.BytesIO(text))
    pagecache.check_header_here(reader.header, [str(root)], cluster_dir)
    code = pagecache.Warmer(
        [str(root)], match, concurrency, rate, lambda event, **fields: events.append(dict(fields, event=event))
    ).run(reader)
    return code, events


def test_capture_records_exactly_the_resident_pages(two_hosts):
    source, _ = two_hosts
    found = profile.parse(capture_here(source))
    assert {entry.path: entry.runs for entry in found.files} == PATTERN
    assert found.scanned_files == 4 and found.scanned_pages == 4 * 64 and found.unreadable == 0
    assert all(entry.size == 64 * PAGE for entry in found.files)


def test_apply_warms_exactly_the_profiled_pages(two_hosts):
    source, target = two_hosts
    code, events = warm_here(capture_here(source), target)
    summary = events[-1]
    assert code == 0 and summary["event"] == "summary"
    for relative, runs in PATTERN.items():
        assert resident_runs(target / relative) == runs  # and every other page stays cold
    assert resident_runs(target / "base/1/cold") == ()
    pages = sum(count for runs in PATTERN.values() for _, count in runs)
    assert (summary["pages"], summary["warmed_pages"], summary["resident_pages"]) == (pages, pages, pages)
    assert summary["warmed_bytes"] == pages * PAGE and summary["skipped_files"] == 0
    assert summary["read_bytes"] <= 1.05 * pages * PAGE
    assert [e for e in events if e["event"] == "progress"][-1]["bytes"] == pages * PAGE


def test_missing_and_changed_files_are_skipped_and_counted(two_hosts):
    source, target = two_hosts
    text = capture_here(source)
    (target / "base/1/1000").unlink()
    with open(target / "base/1/1001", "ab") as handle:
        handle.write(b"grown")
    os.utime(target / "base/2/1", ns=(1, 1))
    code, events = warm_here(text, target)
    summary = events[-1]
    assert code == 0 and summary["skipped_by_reason"] == {"missing": 1, "size differs": 1}
    assert summary["warmed_files"] == 1 and resident_runs(target / "base/2/1") == PATTERN["base/2/1"]
    assert {item["path"] for item in summary["skipped"]} == {"base/1/1000", "base/1/1001"}
    assert residency(target / "base/1/1001")[:64].count(1) == 0  # only the appended page is cached

    evict(target / "base/2/1")
    _, events = warm_here(text, target, match="mtime")
    assert events[-1]["skipped_by_reason"] == {"missing": 1, "size differs": 1, "mtime differs": 1}
    assert resident_runs(target / "base/2/1") == ()

    _, events = warm_here(text, target, match="path")
    assert events[-1]["skipped_by_reason"] == {"missing": 1}
    assert resident_runs(target / "base/1/1001") == PATTERN["base/1/1001"] + ((64, 1),)


def test_path_matching_skips_pages_past_a_shorter_file(two_hosts):
    source, target = two_hosts
    text = capture_here(source)
    os.truncate(target / "base/1/1000", 41 * PAGE)
    _, events = warm_here(text, target, match="path")
    assert resident_runs(target / "base/1/1000") == ((0, 1), (7, 9), (40, 1))
    assert events[-1]["skipped_pages"] == 2 + 1


def test_a_symlinked_directory_cannot_lead_out_of_the_root(two_hosts, tmp_path):
    source, target = two_hosts
    text = capture_here(source)
    outside = tmp_path / "outside"
    (target / "base/2").rename(outside)
    (target / "base/2").symlink_to(outside)
    _, events = warm_here(text, target)
    assert events[-1]["skipped_by_reason"] == {"outside its root": 1}
    assert resident_runs(outside / "1") == ()


def test_capture_does_not_follow_symlinks(two_hosts):
    source, _ = two_hosts
    (source / "link").symlink_to(source / "base")
    (source / "file-link").symlink_to(source / "base/2/1")
    found = profile.parse(capture_here(source))
    assert sorted(entry.path for entry in found.files) == sorted(PATTERN)


def test_rate_limit_holds(tmp_path):
    source, target = tmp_path / "s", tmp_path / "t"
    make_file(source / "big", 2048)
    target.mkdir()
    (target / "big").write_bytes((source / "big").read_bytes())
    os.sync()
    evict(target / "big")
    touch_runs(source / "big", ((0, 2048),))
    started = time.monotonic()
    code, events = warm_here(capture_here(source), target, rate=4 << 20)
    elapsed = time.monotonic() - started
    assert code == 0 and events[-1]["warmed_bytes"] == 8 << 20
    assert 1.6 <= elapsed <= 4, elapsed  # 8 MiB at 4 MiB/s, less the first MiB of burst


def write_pg_control(directory: Path, system_identifier: int) -> Path:
    (directory / "global").mkdir(parents=True, exist_ok=True)
    (directory / "global/pg_control").write_bytes(struct.pack("=Q", system_identifier) + bytes(8184))
    return directory


def test_cluster_identity_is_checked_on_the_host(two_hosts):
    source, target = two_hosts
    write_pg_control(source, 7312345678901234567)
    text = capture_here(source, cluster_dir=source, base="postgres")
    assert profile.parse(text).cluster_id == "7312345678901234567"
    write_pg_control(target, 7399999999999999999)
    with pytest.raises(pagecache.Refused, match="cluster 7312345678901234567 .*this host's cluster is 73999"):
        warm_here(text, target, cluster_dir=str(target))
    with pytest.raises(pagecache.Refused, match="no data directory was given"):
        warm_here(text, target)
    assert all(resident_runs(target / relative) == () for relative in PATTERN)


def test_a_stream_cut_short_stops_warming_and_says_so(two_hosts):
    source, target = two_hosts
    text = capture_here(source)
    cut = text[: text.index(b'"base/2/1"')]
    code, events = warm_here(cut, target)
    assert code == 2 and events[-1]["event"] == "error" and "truncated" in events[-1]["message"]
    assert events[-1]["summary"]["files"] == 2


def test_residency_counts_the_profiled_pages_present(two_hosts):
    source, target = two_hosts
    text = capture_here(source)
    touch_runs(target / "base/1/1001", ((10, 15),))
    (target / "base/2/1").unlink()
    events = []
    pagecache.residency(
        pagecache_profile.Reader(io.BytesIO(text)), [str(target)], lambda event, **fields: events.append(fields)
    )
    files = {path: (profiled, resident, status) for _, path, profiled, resident, status in events[0]["files"]}
    assert files == {
        "base/1/1000": (14, 0, "mtime differs"),
        "base/1/1001": (30, 15, "mtime differs"),
        "base/2/1": (1, 0, "missing"),
    }


def test_the_agent_runs_from_its_stdin_bootstrap(two_hosts):
    """The remote command line and stdin igops sends over SSH, run by a local shell."""
    source, target = two_hosts
    header = {
        "host": "src",
        "fleet": "unit",
        "postgres_cluster": None,
        "roots": [{"path": str(source), "base": "path", "within": ""}],
    }
    command, prefix = agent.invocation(
        "pagecache", ["capture", "--header", json.dumps(header), "--within", str(source.parent)]
    )
    captured = subprocess.run(command, shell=True, input=prefix, capture_output=True, timeout=60)
    assert captured.returncode == 0, captured.stderr
    command, prefix = agent.invocation("pagecache", ["apply", str(target), "--concurrency", "2"])
    warmed = subprocess.run(command, shell=True, input=prefix + captured.stdout, capture_output=True, timeout=60)
    events = [json.loads(line) for line in warmed.stdout.splitlines()]
    assert warmed.returncode == 0 and events[-1]["event"] == "summary" and events[-1]["skipped_files"] == 0
    assert resident_runs(target / "base/1/1000") == PATTERN["base/1/1000"]


def test_the_agent_refuses_roots_outside_the_allowed_prefixes(two_hosts, tmp_path):
    source, target = two_hosts
    command, prefix = agent.invocation("pagecache", ["residency", str(target), "--within", str(source)])
    result = subprocess.run(command, shell=True, input=prefix + capture_here(source), capture_output=True, timeout=60)
    event = json.loads(result.stdout)
    assert result.returncode == 2 and event["refused"] and "outside" in event["message"]


def test_the_default_warm_timeout_is_an_hour_and_the_plan_says_so(tmp_path):
    """Twice the time to read 244 GiB at a gp2 volume's 128 MiB/s, not 6 h (docs/warm.md)."""
    assert vmtouch.WarmOptions().timeout == vmtouch.DEFAULT_TIMEOUT == 3600
    plan = vmtouch.plan_copy(fleet_of(tmp_path), "db1", "db2", None, vmtouch.WarmOptions())
    assert "readahead off, giving up after 1 h;" in plan.steps()[2]
    slow = vmtouch.plan_copy(fleet_of(tmp_path), "db1", "db2", None, vmtouch.WarmOptions(timeout=5400))
    assert "giving up after 1.5 h;" in slow.steps()[2]


def test_warm_progress_is_in_mib_with_a_rate_and_the_time_left():
    """Rendered through the real output layer on a terminal: binary units, as every size shown."""
    import re
    import time as clock

    from rich.console import Console

    from igops.output import Output

    out = Output("warm copy")
    screen = io.StringIO()
    out._err = Console(file=screen, force_terminal=True, width=160, highlight=False, soft_wrap=True)
    with out.progress("warm db2", total=64 << 20, unit="bytes") as advance:
        for _ in range(6):
            advance(4 << 20)
            clock.sleep(0.12)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert re.search(r"24\.0/64\.0 MiB [0-9.]+ MiB/s, 0:0[0-9] left", shown), shown[-400:]
    assert " MB" not in shown


@pytest.mark.parametrize(
    ("rate", "left", "expected"),
    [
        (None, None, "measuring the rate"),
        (12.5 * (1 << 20), 187.4, "12.5 MiB/s, 3:07 left"),
        (3 << 30, 3725, "3.0 GiB/s, 1:02:05 left"),
        (512, None, "512 B/s, time left unknown"),
    ],
)
def test_rate_and_time_left_words(rate, left, expected):
    from igops.output import rate_and_time_left

    assert rate_and_time_left(rate, left) == expected
