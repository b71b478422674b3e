"""The lab's "EBS volumes": XFS filesystems on loop devices, and recovery from a killed run.

Every volume image lives inside one XFS image store (itself a loop-mounted sparse file under
the state dir), so a `cp --reflink` of a volume image is an instant snapshot. Volume loops use
direct I/O, so page-cache measurements of files on a volume are not doubled by the image's
own cache. A volume counts as built only once its ready-marker exists next to its image;
anything without one is a leftover of an interrupted build and is made again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from igops.ebs import loop_backing_file, read_ahead_like_ebs
from igops.lab import proc
from igops.lab.state import HOSTS, STORE_SIZE, Paths, volume_size

FITHAW = 0xC0045878  # _IOWR('X', 120, int)
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)


@dataclass(frozen=True)
class Mount:
    path: Path
    source: str
    fstype: str


@dataclass(frozen=True)
class Loop:
    device: str
    backing_file: str


@dataclass(frozen=True)
class VolumeState:
    host: str
    purpose: str
    mount_point: str
    device: str
    image: str


def mounts_under(root: Path) -> list[Mount]:
    """Mounts at or below `root`, deepest first (the order to unmount them in)."""
    found = []
    prefix = f"{root}/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        point = _unescape(before.split()[4])
        fstype, source = after.split()[:2]
        if point.startswith(prefix):
            found.append(Mount(Path(point), _unescape(source), fstype))
    return sorted(found, key=lambda mount: len(mount.path.parts), reverse=True)


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape") if "\\" in text else text


def loops_under(root: Path) -> list[Loop]:
    """Loop devices whose backing file is (or was, before deletion) under `root`."""
    result = proc.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"])
    devices = json.loads(result.stdout or '{"loopdevices": []}')["loopdevices"]
    prefix = f"{root}/"
    return [
        Loop(entry["name"], entry["back-file"].removesuffix(" (deleted)"))
        for entry in devices
        if (entry.get("back-file") or "").startswith(prefix)
    ]


def thaw(mount_point: Path) -> bool:
    """Thaw a frozen filesystem; False if it was not frozen (the kernel says EINVAL)."""
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


def freeze(mount_point: Path) -> None:
    fd = os.open(mount_point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    finally:
        os.close(fd)


def thaw_all(root: Path) -> list[str]:
    """Thaw every filesystem under the state dir (a killed snapshot leaves them frozen);
    parents first, since a frozen store blocks its volumes' I/O."""
    thawed = []
    for mount in reversed(mounts_under(root)):
        if mount.fstype == "xfs" and thaw(mount.path):
            thawed.append(str(mount.path))
    return thawed


def detach_orphans(root: Path) -> list[str]:
    """Detach the lab's loop devices that nothing mounts (left by an interrupted build)."""
    mounted = {mount.source for mount in mounts_under(root)}
    detached = []
    for loop in _inner_first(loops_under(root), root):
        if loop.device not in mounted and _holders(loop.device) == 0:
            proc.run(["losetup", "--detach", loop.device], check=False)
            detached.append(loop.device)
    return detached


def _inner_first(loops: list[Loop], root: Path) -> list[Loop]:
    """Volume loops (backed by files inside the store) before the store's own loop."""
    store = f"{Paths(root).store_mount}/"
    return sorted(loops, key=lambda loop: not loop.backing_file.startswith(store))


def _holders(device: str) -> int:
    name = Path(device).name
    try:
        return len(list(Path(f"/sys/block/{name}/holders").iterdir()))
    except OSError:
        return 0


def build(paths: Paths) -> list[VolumeState]:
    """Make sure the image store and every host volume exist, are attached and mounted."""
    _ensure_store(paths)
    size = volume_size(os.environ)
    volumes = [(host.name, purpose) for host in HOSTS for purpose in host.volumes]
    (paths.store_mount / "volumes").mkdir(exist_ok=True)
    pending = []
    states = []
    remember_swapped(paths)
    for host_name, purpose in volumes:
        image = paths.volume_image(host_name, purpose)
        mount_point = paths.mount_point(host_name, purpose)
        mount_point.mkdir(parents=True, exist_ok=True)
        swapped = _swapped_image(paths, host_name, purpose)
        if swapped is not None:
            device = _mounted_from(mount_point) or _attach(swapped, direct_io=True)
            states.append(VolumeState(host_name, purpose, str(mount_point), device, str(swapped)))
            continue
        fresh = not _ready_marker(image).exists()
        if fresh:
            _unmount_and_detach(mount_point, image)
            image.unlink(missing_ok=True)
            _create_sparse(image, size)
        device = _attach(image, direct_io=True)
        states.append(VolumeState(host_name, purpose, str(mount_point), device, str(image)))
        if fresh:
            pending.append((device, image))
    # mkfs dominates the cold start; the formats are independent.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda job: _mkfs(*job), pending))
    for state in states:
        read_ahead_like_ebs(state.device)
        _mount(state.device, Path(state.mount_point), ["noatime"])
        if Path(state.image).stat().st_size < size:
            _grow(state, size)
    _write_fstabs(paths, states)
    return states


def _write_fstabs(paths: Paths, states: list[VolumeState]) -> None:
    """Each host's fstab names its volumes by UUID, as on EC2; an entry already there stays (an
    in-place rebuild points it at the filesystem swapped in)."""
    for state in states:
        fstab = paths.fstab(state.host)
        fstab.parent.mkdir(parents=True, exist_ok=True)
        lines = fstab.read_text().splitlines() if fstab.exists() else []
        if any(line.split()[1:2] == [state.mount_point] for line in lines if not line.startswith("#")):
            continue
        uuid = proc.run(["blkid", "-o", "value", "-s", "UUID", state.device]).stdout.strip()
        lines.append(f"UUID={uuid}\t{state.mount_point}\txfs\tnoatime\t0\t2")
        fstab.write_text("\n".join(lines) + "\n")


# A volume swapped in for a host's own (`igops snapshot restore --in-place`, through the adapter's
# image store) is that host's disk from then on, as on EC2: which image it is stays recorded next to
# the host's own image, so that a `lab up` after `lab down` mounts it again.


def _swap_record(paths: Paths, host_name: str, purpose: str) -> Path:
    image = paths.volume_image(host_name, purpose)
    return image.with_name(image.name + ".swapped")


def remember_swapped(paths: Paths) -> None:
    """Record, for each host volume mounted from another image than the host's own, that image."""
    for host in HOSTS:
        for purpose in host.volumes:
            device = _mounted_from(paths.mount_point(host.name, purpose))
            if device is None:
                continue
            backing = loop_backing_file(device)
            own = paths.volume_image(host.name, purpose)
            if backing and Path(backing).resolve() != own.resolve() and Path(backing).exists():
                _swap_record(paths, host.name, purpose).write_text(str(Path(backing).resolve()) + "\n")
            elif backing:
                _swap_record(paths, host.name, purpose).unlink(missing_ok=True)


def _swapped_image(paths: Paths, host_name: str, purpose: str) -> Path | None:
    record = _swap_record(paths, host_name, purpose)
    if not record.exists():
        return None
    image = Path(record.read_text().strip())
    return image if image.exists() else None


def _mounted_from(mount_point: Path) -> str | None:
    found = [mount.source for mount in mounts_under(mount_point.parent) if mount.path == mount_point]
    return found[0] if found else None


def _grow(state: VolumeState, size: int) -> None:
    """A bigger image under a mounted volume: the loop device told of it, then XFS grown online."""
    os.truncate(state.image, size)
    proc.run(["losetup", "--set-capacity", state.device])
    proc.run(["xfs_growfs", "-d", state.mount_point])


def _ensure_store(paths: Paths) -> None:
    paths.storage.mkdir(parents=True, exist_ok=True)
    marker = _ready_marker(paths.store_image)
    if not marker.exists():
        _unmount_and_detach(paths.store_mount, paths.store_image)
        paths.store_image.unlink(missing_ok=True)
        _create_sparse(paths.store_image, STORE_SIZE)
        device = _attach(paths.store_image, direct_io=False)
        proc.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-L", "igops-store", device])
        marker.touch()
    device = _attach(paths.store_image, direct_io=False)
    paths.store_mount.mkdir(exist_ok=True)
    _mount(device, paths.store_mount, [])


def _ready_marker(image: Path) -> Path:
    return image.with_name(image.name + ".ready")


def _create_sparse(image: Path, size: int) -> None:
    with open(image, "wb") as handle:
        handle.truncate(size)


def _mkfs(device: str, image: Path) -> None:
    proc.run(["mkfs.xfs", "-q", "-f", device])
    _ready_marker(image).touch()


def _attach(image: Path, direct_io: bool) -> str:
    existing = [loop.device for loop in loops_under(image.parent) if loop.backing_file == str(image)]
    if existing:
        return existing[0]
    # The images are formatted on 512-byte-sector loops; with direct I/O some kernels give a
    # loop the backing file's larger alignment, and XFS then refuses to mount the image.
    argv = (
        ["losetup", "--find", "--show", "--sector-size", "512"]
        + (["--direct-io=on"] if direct_io else [])
        + [str(image)]
    )
    return proc.run(argv).stdout.strip()


def _mount(device: str, mount_point: Path, options: list[str]) -> None:
    current = [mount for mount in mounts_under(mount_point.parent) if mount.path == mount_point]
    if current and current[0].source == device:
        return
    if current:
        raise proc.LabError(
            f"{mount_point} is mounted from {current[0].source}, not {device}",
            "run `igops lab down` and bring the lab up again",
        )
    proc.run(["mount", "-t", "xfs"] + (["-o", ",".join(options)] if options else []) + [device, str(mount_point)])


def _unmount_and_detach(mount_point: Path, image: Path) -> None:
    for mount in mounts_under(mount_point.parent):
        if mount.path == mount_point:
            thaw(mount.path)
            proc.run(["umount", str(mount.path)])
    for loop in loops_under(image.parent):
        if loop.backing_file == str(image):
            proc.run(["losetup", "--detach", loop.device])


def teardown(root: Path) -> list[str]:
    """Thaw and unmount everything under the state dir and detach its loop devices: volumes
    first, which frees the image store. Problems are returned, not raised, so that one busy
    mount does not stop the rest."""
    thaw_all(root)
    if Paths(root).store_mount.is_dir():
        remember_swapped(Paths(root))
    for attempt in range(4):
        for mount in mounts_under(root):
            proc.run(["umount", str(mount.path)], check=False)
        mounted = {mount.source for mount in mounts_under(root)}
        for loop in _inner_first(loops_under(root), root):
            if loop.device not in mounted:
                proc.run(["losetup", "--detach", loop.device], check=False)
        busy = mounts_under(root)
        if not busy and not loops_under(root):
            return []
        holders = [pid for mount in busy for pid in proc.lab_pids(mount.path)]
        if holders:
            proc.terminate(holders, grace=3)
        else:
            time.sleep(0.2 * (attempt + 1))
    return [f"{mount.path} stays mounted (busy)" for mount in mounts_under(root)] + [
        f"loop device {loop.device} ({loop.backing_file}) stays attached" for loop in loops_under(root)
    ]
