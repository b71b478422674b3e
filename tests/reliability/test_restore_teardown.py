"""The shell a restore's undo and cleanup run on the host before the volumes are detached, run
here against real XFS on loop devices (no lab): what it unmounts is found by device, never by
the paths the volumes' tags name. A volume mounted by a restore cut off before its tag is
unmounted; a mount of another device at a tagged path stays; a device mounted nowhere is no
failure; a mount of one of the restore's devices anywhere else is unmounted too.

The md branch (arrays over the devices stopped) is not run here: this kernel has no md."""

import os
import shutil
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from igops.restore_scripts import teardown_script


@dataclass
class FakePostgres:
    os_user: str = "postgres"
    bin_dir: str = "/usr/lib/postgresql/15/bin"


@pytest.fixture
def loops(tmp_path):
    """Makes loop devices over XFS images in tmp_path; afterwards, whatever the test left,
    unmounts every mount of them (and every mount the test listed in `loops.mounted`) and
    detaches them. Only devices made here are ever touched."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices and mounts")
    if not shutil.which("mkfs.xfs"):
        pytest.skip("needs mkfs.xfs (xfsprogs)")
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        with ExitStack() as stack:
            # Each step of the clean-up runs even when one before it failed.
            for device in reversed(made.devices):
                stack.callback(subprocess.run, ["losetup", "-d", device], capture_output=True)
            for path in made.mounted:
                stack.callback(unmount_all_at, path)
            stack.callback(unmount_all_of, made.devices)


class Loops:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.devices: list[str] = []
        self.mounted: list[str] = []  # mount points of anything else the test mounted

    def xfs(self) -> str:
        image = self.tmp_path / f"volume{len(self.devices)}.img"
        image.touch()
        os.truncate(image, 320 << 20)  # mkfs.xfs's smallest
        device = subprocess.run(
            ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.devices.append(device)
        subprocess.run(["mkfs.xfs", "-q", device], check=True, capture_output=True)
        return device

    def mount(self, source: str, path: Path, *options: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.mounted.append(str(path))
        subprocess.run(["mount", *options, source, str(path)], check=True, capture_output=True)


def device_number(device: str) -> str:
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def mounts() -> list[tuple[str, str]]:
    """(major:minor, mount point) of every mount here, in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        path = fields[4]
        for escaped in ("\\040", "\\011", "\\012", "\\134"):
            path = path.replace(escaped, chr(int(escaped[1:], 8)))
        found.append((fields[2], path))
    return found


def mount_points_of(device: str) -> list[str]:
    number = device_number(device)
    return [path for found, path in mounts() if found == number]


def unmount_all_of(devices: list[str]) -> None:
    numbers = {device_number(device) for device in devices if Path(device).exists()}
    for number, path in reversed(mounts()):
        if number in numbers:
            subprocess.run(["umount", "-l", path], capture_output=True)


def unmount_all_at(path: str) -> None:
    while subprocess.run(["mountpoint", "-q", path]).returncode == 0:
        if subprocess.run(["umount", "-l", path], capture_output=True).returncode:
            return


def teardown(devices: list[str], tagged: list[str], root: Path) -> subprocess.CompletedProcess:
    """The script as the host runs it (`sh -c`, as igops.remote does)."""
    script = teardown_script(None, str(root.parent / "g1.postgres"), devices, tagged, str(root), FakePostgres())
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


def test_the_restores_devices_are_unmounted_wherever_mounted_and_no_other_mount(loops, tmp_path):
    root = tmp_path / "restore"
    untagged, elsewhere, idle, others = loops.xfs(), loops.xfs(), loops.xfs(), loops.xfs()
    # (1) The data volume, mounted by a restore cut off before its tag: no tag names the path.
    # EBS names the device /dev/sdf, a link on the host to the device itself (/dev/nvme1n1).
    data = root / "g1/srv/db2/my data"
    loops.mount(untagged, data)
    alias = tmp_path / "sdf"
    alias.symlink_to(untagged)
    # (2) The WAL mount's tagged path holds a filesystem of another device: not the restore's.
    wal = root / "g1/srv/db2/wal"
    loops.mount(others, wal)
    # (4) One of the restore's devices mounted at a path nobody expects, outside the root.
    unexpected = tmp_path / "operator looked here"
    loops.mount(elsewhere, unexpected)
    (root.parent / "g1.postgres").mkdir()

    # (3) `idle` is mounted nowhere, and a device that is not on the host at all is passed over.
    done = teardown([str(alias), elsewhere, idle, "/dev/igops-test-absent"], [str(wal)], root)

    assert done.returncode == 0, done.stderr
    assert mount_points_of(untagged) == [] and mount_points_of(elsewhere) == []
    assert mount_points_of(others) == [str(wal)]
    assert not data.exists(), "the mount point it emptied is removed"
    assert wal.is_dir() and root.is_dir(), "the other device's mount point, and the root, stay"
    assert unexpected.is_dir(), "a mount point outside the restore root is never removed"
    assert not (root.parent / "g1.postgres").exists()
    # Nothing holds the devices any more: detaching them takes nothing from under a filesystem.
    for device in (untagged, elsewhere, idle):
        assert os.listdir(f"/sys/class/block/{Path(device).name}/holders") == []


def test_a_mount_stacked_on_another_of_the_restores_comes_off_first(loops, tmp_path):
    root = tmp_path / "restore"
    outer, inner = loops.xfs(), loops.xfs()
    loops.mount(outer, root / "g1/srv/db2/data")
    loops.mount(inner, root / "g1/srv/db2/data/pg_wal")
    # Named outer first, as the tags would be.
    done = teardown([outer, inner], [str(root / "g1/srv/db2/data")], root)
    assert done.returncode == 0, done.stderr
    assert mount_points_of(outer) == [] and mount_points_of(inner) == []
    assert not (root / "g1").exists() and root.is_dir()


def test_the_restores_filesystem_under_another_mount_is_not_unmounted_and_nothing_is_detached(loops, tmp_path):
    """umount takes the topmost mount at a path: with another filesystem over the restore's, the
    teardown stops rather than unmount that one, and fails, so that no volume is detached."""
    root = tmp_path / "restore"
    ours = loops.xfs()
    path = root / "g1/srv/db2/data"
    loops.mount(ours, path)
    loops.mount("igops-test-over", path, "-t", "tmpfs", "-o", "size=1m")
    done = teardown([ours], [str(path)], root)
    assert done.returncode != 0
    assert "under another mount" in done.stderr
    assert mount_points_of(ours) == [str(path)]
    assert [m for _, m in mounts()].count(str(path)) == 2, "the other filesystem stays mounted"
