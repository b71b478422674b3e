"""`igops warm` against the lab: db1 and db2 each have their own XFS filesystems on loop devices
with direct I/O, so their page caches are separate, and the tests read both directly with
mincore to check what the commands claim. This machine's kernel runs a proactive reclaimer
(DAMON's kdamond) that pages out page-cache pages it sees idle, a few every second, but only
pages that no process maps. So db1's known resident set is held mapped for the whole test, which
makes it exact; db2's pages, which the commands warm and no one maps, are checked within the
seconds after a command, or against counts taken just before and after it."""

import json
import mmap
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from igops import profile
from igops.agent import pagecache
from igops.errors import ExitCode
from tests.conftest import run_igops

pytestmark = pytest.mark.lab

PAGE = mmap.PAGESIZE
FILES = {"base/1/a": 1024, "base/1/b": 2048, "base/2/c": 1536, "cold": 512}  # pages: 20 MiB in all
NOBODY = "127.0.40.99"  # nothing listens here


def data_mount(fleet, name: str) -> Path:
    return Path(next(mount.path for mount in fleet.host(name).mounts if mount.purpose == "data"))


def pgdata(fleet, name: str) -> Path:
    return Path(fleet.path_for(fleet.model.postgres.data_directory, fleet.host(name)))


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def residency(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.resident_map(fd, os.fstat(fd).st_size, PAGE)
    finally:
        os.close(fd)


def scattered_runs(pages: int, rng: random.Random):
    runs, position = [], 0
    while True:
        position += rng.randint(1, 40)
        length = rng.randint(1, 24)
        if position + length > pages:
            return tuple(runs)
        runs.append((position, length))
        position += length


@pytest.fixture
def pattern(lab, tmp_path):
    """The same files on db1 and db2; on db1 a known scattered set of pages is resident (none of
    'cold'), on db2 nothing."""
    rng = random.Random(7)
    trees = [data_mount(lab, "db1") / "igops-warm-test", data_mount(lab, "db2") / "igops-warm-test"]
    runs = {}
    for relative, pages in FILES.items():
        content = rng.randbytes(pages * PAGE)
        for tree in trees:
            path = tree / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(content)
                os.fsync(handle.fileno())
            evict(path)
        runs[relative] = scattered_runs(pages, rng) if relative != "cold" else ()
    held = [hold_resident(trees[0] / relative, runs[relative]) for relative in FILES if runs[relative]]
    try:
        assert profiled_share(trees[0], runs) == (1.0, 0)
        assert all(residency(trees[1] / relative).count(1) == 0 for relative in FILES)
        yield trees[0], trees[1], runs
    finally:
        for mapping in held:
            mapping.close()
        for tree in trees:
            subprocess.run(["rm", "-rf", str(tree)], check=True)


def hold_resident(path: Path, runs) -> mmap.mmap:
    """Read exactly these pages into the page cache through a mapping that stays open: a mapped
    page is one the reclaimer leaves alone. MADV_RANDOM keeps the faults from reading ahead."""
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    for first, count in runs:
        for page in range(first, first + count):
            mapping[page * PAGE]
    return mapping


def resident_pages(tree: Path) -> int:
    return sum(residency(tree / relative).count(1) for relative in FILES)


def igops(config, *args: str) -> tuple[int, dict]:
    result = run_igops("-c", str(config), "warm", *args, "--json")
    return result.returncode, json.loads(result.stdout)


def profiled_share(target: Path, runs: dict) -> tuple[float, int]:
    """The share of the profiled pages resident on the target, and how many other pages are."""
    resident = outside = total = 0
    for relative, file_runs in runs.items():
        present = residency(target / relative)
        inside = bytearray(len(present))
        for first, count in file_runs:
            inside[first : first + count] = b"\x01" * count
            resident += present[first : first + count].count(1)
            total += count
        outside += sum(1 for page, flag in enumerate(present) if flag and not inside[page])
    return resident / total, outside


def test_copy_warms_exactly_the_profiled_pages(lab, pattern):
    source, target, runs = pattern
    code, envelope = igops(lab.source, "copy", "db1", "--to", "db2", str(source), "--yes")
    assert code == 0, envelope["error"]
    result = envelope["data"]
    pages = sum(count for file_runs in runs.values() for _, count in file_runs)
    assert result["pages"] == pages and result["files"] == 3 and result["skipped_files"] == 0
    # Measured the moment the command ends: what it counted resident as it ended is no fewer.
    share, outside = profiled_share(target, runs)
    assert share >= 0.98 and outside == 0 and resident_pages(target) <= result["resident_pages"]
    assert result["hit_ratio"] >= 0.99 and result["read_bytes"] <= 1.05 * result["pages"] * PAGE

    code, envelope = igops(lab.source, "diff", "db1", "db2", str(source), "--at-least", "0.95")
    assert code == 0 and envelope["data"]["share"] >= 0.95 and envelope["data"]["source_pages"] == pages


def test_capture_apply_and_show(lab, pattern, tmp_path):
    source, target, runs = pattern
    saved = tmp_path / "db1.pagecache.gz"
    code, envelope = igops(lab.source, "capture", "db1", str(source), "-o", str(saved), "--emit-vmtouch")
    assert code == 0, envelope["error"]
    assert envelope["data"]["files"] == 3 and envelope["data"]["scanned_files"] == 4 and saved.exists()
    assert envelope["data"]["vmtouch"][0] == f": ${{ROOT0:={source}}}"

    code, envelope = igops(lab.source, "apply", str(saved), "--to", "db2", "--dry-run")
    assert code == 0 and envelope["data"]["dry_run"] and envelope["data"]["plan"]["target_paths"] == [str(target)]
    assert profiled_share(target, runs)[0] == 0

    code, envelope = igops(
        lab.source, "apply", str(saved), "--to", "db2", "--yes", "--concurrency", "2", "--rate", "40M"
    )
    assert code == 0, envelope["error"]
    profiled = {entry.path: entry.runs for entry in profile.load(saved)[0].files}
    share, outside = profiled_share(target, {**{relative: () for relative in FILES}, **profiled})
    assert share >= 0.99 and outside == 0

    # db2's warmed pages are no one's mappings: the reclaimer may take some while `show` runs,
    # so what it counts must lie between what mincore finds just before and just after it.
    before = resident_pages(target)
    code, envelope = igops(lab.source, "show", "db2", str(target))
    after = resident_pages(target)
    pages = sum(count for file_runs in profiled.values() for _, count in file_runs)
    assert code == 0 and after <= envelope["data"]["resident_pages"] <= before <= pages
    assert envelope["data"]["pages"] == sum(FILES.values()) and envelope["data"]["files"] == 4


def relation_files(tree: Path) -> list[Path]:
    return [path for path in (tree / "base").rglob("*") if path.is_file() and not path.is_symlink()]


def test_a_real_postgres_data_directory_while_postgres_runs(lab):
    # Relations cached on the primary (as a busy one has them), none on the standby.
    for path in relation_files(pgdata(lab, "db1")):
        path.read_bytes()
    for path in relation_files(pgdata(lab, "db2")):
        evict(path)
    code, envelope = igops(lab.source, "copy", "db1", "--to", "db2", "--match", "path", "--yes")
    assert code == 0, envelope["error"]
    result = envelope["data"]
    assert result["pages"] > 1000 and result["warmed_pages"] >= 0.9 * result["pages"]
    # Files only the primary has (pg_internal.init), and relations the standby has not yet
    # extended as far (it replays behind the primary while Postgres runs on both).
    assert set(result["skipped_by_reason"]) <= {"missing", "shorter than the profiled pages"}
    assert result["warmed_pages"] + result["skipped_pages"] == result["pages"]
    assert result["resident_pages"] >= 0.99 * result["warmed_pages"]
    assert result["read_bytes"] <= 1.05 * result["warmed_bytes"] + 64 * PAGE  # Postgres reads too

    code, envelope = igops(lab.source, "diff", "db1", "db2")
    assert code == 0 and envelope["data"]["share"] >= 0.9, envelope["data"]["files"][:5]


def test_a_profile_of_another_cluster_is_refused(lab, pattern, tmp_path):
    source, target, runs = pattern
    saved = tmp_path / "db3.pagecache"
    code, envelope = igops(lab.source, "capture", "db3", "-o", str(saved))
    assert code == 0, envelope["error"]
    code, envelope = igops(lab.source, "apply", str(saved), "--to", "db2", "--yes")
    assert code == ExitCode.REFUSED and "cluster 'pg2'" in envelope["error"]["message"]

    # An inventory that wrongly puts db3 in db1's cluster: the host itself refuses, by the
    # system identifier in global/pg_control, before reading anything.
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(with_db3_in_db1s_cluster(lab))
    code, envelope = igops(wrong, "copy", "db1", "--to", "db3", f"{pgdata(lab, 'db1')}/global", "--yes")
    assert code == ExitCode.REFUSED
    assert "this host's cluster is" in envelope["error"]["message"]
    assert envelope["error"]["hint"] == "nothing was read or warmed"


def with_db3_in_db1s_cluster(fleet) -> str:
    """The lab's inventory with db3 listed as a standby of db1's cluster, whoever is primary."""
    text = fleet.source.read_text()
    for name, cluster in fleet.model.postgres.clusters.items():
        members = [cluster.primary, *cluster.standbys]
        if "db1" in members:
            members.append("db3")
        elif "db3" in members:
            members.remove("db3")
        section = (
            f"[postgres.clusters.{name}]\nprimary = {json.dumps(members[0])}\nstandbys = {json.dumps(members[1:])}\n"
        )
        text = re.sub(rf"\[postgres\.clusters\.{name}\]\n(?:(?:primary|standbys) = .*\n)+", section, text)
    return text


def test_a_truncated_profile_warms_nothing(lab, pattern, tmp_path):
    source, target, runs = pattern
    saved = tmp_path / "db1.pagecache"
    code, _ = igops(lab.source, "capture", "db1", str(source), "-o", str(saved))
    assert code == 0
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 1):
        saved.write_bytes(data[:cut])
        code, envelope = igops(lab.source, "apply", str(saved), "--to", "db2", "--yes")
        assert code == ExitCode.USAGE and "truncated" in envelope["error"]["message"]
    assert profiled_share(target, runs)[0] == 0


def test_paths_outside_the_data_mounts_are_refused(lab, pattern):
    source, target, runs = pattern
    for args in (
        ["capture", "db1", "/etc"],
        ["show", "db1", "/var/lib/igops-lab"],
        ["copy", "db1", "--to", "db2", str(source.parent.parent), "--yes"],
        ["copy", "db1", "--to", "db2", f"{source}/../../../../../etc", "--yes"],
    ):
        code, envelope = igops(lab.source, *args)
        assert code == ExitCode.REFUSED and "outside db1's data mounts" in envelope["error"]["message"], args
    assert profiled_share(target, runs)[0] == 0


def test_an_unreachable_host_is_a_clear_error(lab, pattern, tmp_path):
    source, target, runs = pattern
    moved = tmp_path / "moved.toml"
    moved.write_text(lab.source.read_text().replace('address = "127.0.10.22"', f'address = "{NOBODY}"'))
    code, envelope = igops(moved, "copy", "db1", "--to", "db2", str(source), "--yes")
    assert code == ExitCode.FAILED and "connection refused" in envelope["error"]["message"]
    code, envelope = igops(moved, "diff", "db2", "db1", str(target))
    assert code == ExitCode.FAILED and "db2: connection refused" in envelope["error"]["message"]
    assert profiled_share(target, runs)[0] == 0
