"""Warming a cold host's page cache from a warm one: `igops warm copy` against the ways it was
done with vmtouch, on a 2 GiB data set of which about a quarter is resident on the source in
scattered ranges.

Methods, each starting from a cold target (every file evicted with POSIX_FADV_DONTNEED):
  igops       `igops warm copy SRC --to DST DIR`, end to end (CLI start, SSH, capture, warm)
  vmtouch -t  `vmtouch -t` of every file with any resident page on the source
  bar replay  the old runbook: parse `vmtouch -v` on the source (60 cells a file) and run
              `vmtouch -t -p RANGE FILE` on the target for every non-empty cell
  cat         read every file
  sequential  the yardstick: read as many bytes as the source has resident, sequentially
Per method: wall time, bytes read from the target's device (/sys/block/loopN/stat), and the hit
ratio afterwards (the share of the source's resident pages resident on the target).

Storage profiles: "ebs" throttles the target's loop device for the methods' processes with the
blkio cgroup (3000 read IOPS, 128 MiB/s: a gp2 volume of 1 TB), "raw" is the lab disk as it is.

Self-contained: two XFS filesystems on ~3 GB sparse loop images (direct I/O, so the images' own
page cache stays out of it), an sshd on 127.0.40.11-12, all removed at the end.
Run as root: .venv/bin/python bench/warm.py [--repeats N] [--profiles ebs,raw]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igops.agent import pagecache  # noqa: E402
from igops.lab import sshd  # noqa: E402

WORK = Path("/var/tmp/igops-bench-warm")
ADDRESSES = {"src": "127.0.40.11", "dst": "127.0.40.12"}
SSH_PORT = 2224
IMAGE_BYTES = 3 << 30
FILES = 32
FILE_BYTES = 64 << 20  # 32 x 64 MiB = 2 GiB, Postgres-like 1 GiB segments scaled down
RESIDENT_SHARE = 0.25
PAGE = mmap.PAGESIZE
CGROUP = Path("/sys/fs/cgroup/blkio/igops-bench-warm")
PROFILES = {"ebs": (3000, 128 << 20), "raw": None}  # read IOPS, read bytes a second
BAR_CELLS = 60


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


# --- the two hosts ------------------------------------------------------------------------------
def make_filesystem(name: str) -> tuple[str, Path]:
    image, mount = WORK / f"{name}.img", WORK / name
    with open(image, "wb") as handle:
        handle.truncate(IMAGE_BYTES)
    device = run(["losetup", "--find", "--show", "--direct-io=on", str(image)]).stdout.strip()
    run(["mkfs.xfs", "-q", "-f", device])
    mount.mkdir(exist_ok=True)
    run(["mount", device, str(mount)])
    return device, mount


def remove_filesystem(device: str, mount: Path) -> None:
    subprocess.run(["umount", str(mount)], check=False)
    subprocess.run(["losetup", "-d", device], check=False)
    (WORK / f"{mount.name}.img").unlink(missing_ok=True)


def write_data(mounts: list[Path]) -> list[str]:
    """The same 2 GiB on both filesystems; names are relative to each mount's data/ directory."""
    rng = random.Random(1)
    block = rng.randbytes(1 << 20)
    names = []
    for index in range(FILES):
        name = f"base/{16384 + index // 8}/{20000 + index}"
        names.append(name)
        for mount in mounts:
            path = mount / "data" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                for offset in range(0, FILE_BYTES, len(block)):
                    # Each MiB differs, so no layer can deduplicate the data set.
                    handle.write(offset.to_bytes(8, "little") + index.to_bytes(8, "little") + block[16:])
                os.fsync(handle.fileno())
    return names


def evict(root: Path, names: list[str]) -> None:
    for name in names:
        fd = os.open(root / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def scattered_pattern(names: list[str]) -> dict[str, tuple]:
    """Runs of 16 KiB to 4 MiB, skewed to the small end, about RESIDENT_SHARE of every file."""
    rng = random.Random(2)
    pages = FILE_BYTES // PAGE
    pattern = {}
    for name in names:
        runs, position = [], 0
        while True:
            length = max(1, int(rng.paretovariate(1.2) * 4))
            length = min(length, 1024)
            position += max(1, int(length * (1 / RESIDENT_SHARE - 1) * rng.uniform(0.5, 1.5)))
            if position + length > pages:
                break
            runs.append((position, length))
            position += length
        pattern[name] = tuple(runs)
    return pattern


def make_resident(root: Path, pattern: dict[str, tuple]) -> None:
    """Exactly the pattern resident: the runs read with readahead off."""
    for name, runs in pattern.items():
        fd = os.open(root / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for first, count in runs:
            os.preadv(fd, [bytearray(count * PAGE)], first * PAGE)
        os.close(fd)


def residency(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.resident_map(fd, os.fstat(fd).st_size, PAGE)
    finally:
        os.close(fd)


def hit_ratio(root: Path, pattern: dict[str, tuple]) -> tuple[float, int]:
    """The share of the pattern's pages resident under `root`, and all pages resident there."""
    hits = wanted = cached = 0
    for name, runs in pattern.items():
        present = residency(root / name)
        cached += present.count(1)
        for first, count in runs:
            hits += present[first : first + count].count(1)
            wanted += count
    return hits / wanted, cached


def sectors_read(device: str) -> int:
    return int(Path(f"/sys/block/{Path(device).name}/stat").read_text().split()[2])


def throttle(device: str, profile: tuple[int, int] | None) -> None:
    numbers = Path(f"/sys/block/{Path(device).name}/dev").read_text().strip()
    iops, bps = profile or (0, 0)  # 0 removes the rule
    (CGROUP / "blkio.throttle.read_iops_device").write_text(f"{numbers} {iops}")
    (CGROUP / "blkio.throttle.read_bps_device").write_text(f"{numbers} {bps}")


# --- the methods --------------------------------------------------------------------------------
class Hosts:
    def __init__(self, keys, inventory: Path, mounts: dict[str, Path], pattern: dict[str, tuple]):
        self.keys, self.inventory, self.mounts, self.pattern = keys, inventory, mounts, pattern

    def ssh(self, host: str, command: str, stdin: str | None = None) -> str:
        return run(
            [
                "ssh",
                "-q",
                "-p",
                str(SSH_PORT),
                "-i",
                str(self.keys.client_key),
                "-o",
                f"UserKnownHostsFile={self.keys.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                f"root@{ADDRESSES[host]}",
                command,
            ],
            input=stdin,
        ).stdout


def method_igops(hosts: Hosts, names, resident_bytes) -> dict:
    done = run(
        [
            sys.executable,
            "-m",
            "igops",
            "-c",
            str(hosts.inventory),
            "warm",
            "copy",
            "src",
            "--to",
            "dst",
            str(hosts.mounts["src"] / "data"),
            "--yes",
            "--json",
        ]
    )
    data = json.loads(done.stdout)["data"]
    return {"warm_seconds": data["seconds"], "agent_read_bytes": data["read_bytes"]}


def method_vmtouch(hosts: Hosts, names, resident_bytes) -> dict:
    partly = [name for name, runs in hosts.pattern.items() if runs]
    hosts.ssh("dst", "vmtouch -t -q " + " ".join(shlex.quote(str(hosts.mounts["dst"] / "data" / n)) for n in partly))
    return {}


BAR = re.compile(r"\[([ oO]{1,60})\] (\d+)/(\d+)")


def method_bar_replay(hosts: Hosts, names, resident_bytes) -> dict:
    files = [str(hosts.mounts["src"] / "data" / name) for name in names]
    report = hosts.ssh("src", "vmtouch -v " + " ".join(shlex.quote(f) for f in files))
    commands = []
    current = None
    for line in report.splitlines():
        if line.startswith("/"):
            current = line.strip()
            continue
        bars = BAR.findall(line)
        if current and bars:
            cells, _, total = bars[-1]
            total = int(total)
            per_cell = 1 if total <= BAR_CELLS else total // BAR_CELLS + 1
            target = current.replace(str(hosts.mounts["src"]), str(hosts.mounts["dst"]), 1)
            for match in re.finditer(r"[oO]+", cells):
                start, end = match.start() * per_cell, min(match.end() * per_cell, total)
                commands.append(f"vmtouch -t -q -p {start * PAGE}-{end * PAGE} {shlex.quote(target)}")
            current = None
    hosts.ssh("dst", "sh", stdin="\n".join(commands) + "\n")
    return {"vmtouch_commands": len(commands)}


def method_cat(hosts: Hosts, names, resident_bytes) -> dict:
    hosts.ssh(
        "dst", "cat " + " ".join(shlex.quote(str(hosts.mounts["dst"] / "data" / n)) for n in names) + " > /dev/null"
    )
    return {}


SEQUENTIAL = """import sys
left = int(sys.argv[1])
for path in sys.argv[2:]:
    with open(path, "rb", buffering=0) as handle:
        while left > 0:
            chunk = handle.read(min(1 << 20, left))
            if not chunk:
                break
            left -= len(chunk)
    if left <= 0:
        break
"""


def method_sequential(hosts: Hosts, names, resident_bytes) -> dict:
    hosts.ssh(
        "dst",
        shlex.join(
            ["python3", "-c", SEQUENTIAL, str(resident_bytes), *[str(hosts.mounts["dst"] / "data" / n) for n in names]]
        ),
    )
    return {}


METHODS = {
    "igops warm copy": method_igops,
    "vmtouch -t (partly resident files)": method_vmtouch,
    "vmtouch bar replay": method_bar_replay,
    "cat (every file)": method_cat,
    "sequential read of the resident bytes": method_sequential,
}


def measure(hosts: Hosts, device: str, names, method, resident_bytes) -> dict:
    make_resident(hosts.mounts["src"] / "data", hosts.pattern)
    evict(hosts.mounts["dst"] / "data", names)
    before = sectors_read(device)
    started = time.perf_counter()
    extra = method(hosts, names, resident_bytes)
    seconds = time.perf_counter() - started
    read = (sectors_read(device) - before) * 512
    ratio, cached = hit_ratio(hosts.mounts["dst"] / "data", hosts.pattern)
    return {"seconds": seconds, "read_bytes": read, "hit_ratio": ratio, "cached_bytes": cached * PAGE, **extra}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiles", default="ebs,raw")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: loop devices, mounts and the blkio cgroup")
    WORK.mkdir(parents=True, exist_ok=True)
    filesystems = {name: make_filesystem(name) for name in ("src", "dst")}
    mounts = {name: mount for name, (_, mount) in filesystems.items()}
    keys = sshd.ensure_keys(WORK / "ssh")
    sshd.write_known_hosts(keys, [(address, SSH_PORT) for address in ADDRESSES.values()])
    CGROUP.mkdir(exist_ok=True)
    daemon = None
    try:
        daemon = sshd.start(WORK / "ssh", "warmbench", keys, list(ADDRESSES.values()), SSH_PORT)
        (CGROUP / "cgroup.procs").write_text(str(daemon))  # every session, and all it runs, inherits it
        inventory = WORK / "igops.toml"
        inventory.write_text(
            f"""[fleet]
name = "warmbench"
state_dir = "{WORK / "state"}"
[ssh]
port = {SSH_PORT}
known_hosts = "{keys.known_hosts}"
identity_file = "{keys.client_key}"
command_timeout = 600
"""
            + "".join(
                f"""[[hosts]]
name = "{name}"
address = "{address}"
roles = ["app"]
[[hosts.mounts]]
path = "{mounts[name]}"
"""
                for name, address in ADDRESSES.items()
            )
        )
        started = time.monotonic()
        names = write_data(list(mounts.values()))
        print(
            f"data set: {FILES} files x {FILE_BYTES >> 20} MiB written to both hosts in "
            f"{time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        hosts = Hosts(keys, inventory, mounts, scattered_pattern(names))
        pattern_pages = sum(count for runs in hosts.pattern.values() for _, count in runs)
        resident_bytes = pattern_pages * PAGE
        runs = sum(len(runs) for runs in hosts.pattern.values())
        make_resident(mounts["src"] / "data", hosts.pattern)
        profile_path = WORK / "src.pagecache.gz"
        captured = json.loads(
            run(
                [
                    sys.executable,
                    "-m",
                    "igops",
                    "-c",
                    str(inventory),
                    "warm",
                    "capture",
                    "src",
                    str(mounts["src"] / "data"),
                    "-o",
                    str(profile_path),
                    "--json",
                ]
            ).stdout
        )["data"]
        results = {
            "data_bytes": FILES * FILE_BYTES,
            "resident_bytes": resident_bytes,
            "runs": runs,
            "profile_bytes": captured["profile_bytes"],
            "profile_gzip_bytes": captured["output_bytes"],
            "profiles": {},
        }
        device = filesystems["dst"][0]
        for profile_name in args.profiles.split(","):
            throttle(device, PROFILES[profile_name])
            table = {}
            for label, method in METHODS.items():
                samples = [measure(hosts, device, names, method, resident_bytes) for _ in range(args.repeats)]
                table[label] = {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}
                print(f"{profile_name}: {label}: {json.dumps(table[label])}", file=sys.stderr)
            results["profiles"][profile_name] = table
            throttle(device, None)
        print(json.dumps(results, indent=2))
        print(markdown(results, args.repeats))
    finally:
        sshd.stop(WORK / "ssh", "warmbench")
        for device, mount in filesystems.values():
            remove_filesystem(device, mount)
        for _ in range(50):
            try:
                CGROUP.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def markdown(results: dict, repeats: int) -> str:
    gib = results["data_bytes"] / (1 << 30)
    resident = results["resident_bytes"]
    lines = [
        f"Data set {gib:.0f} GiB in {FILES} files; resident on the source {resident / (1 << 20):.0f} MiB "
        f"({resident / results['data_bytes']:.1%}) in {results['runs']} runs. Profile "
        f"{results['profile_bytes'] / 1024:.0f} KiB plain, {results['profile_gzip_bytes'] / 1024:.0f} KiB gzipped "
        f"= {results['profile_gzip_bytes'] / 1024 / gib:.0f} KiB per GiB of data. Median of {repeats}."
    ]
    for profile_name, table in results["profiles"].items():
        baseline = table["sequential read of the resident bytes"]["seconds"]
        lines += [
            "",
            f"**{profile_name}**"
            + (" (3000 read IOPS, 128 MiB/s)" if profile_name == "ebs" else " (lab disk, unthrottled)"),
            "",
            "| method | time s | x sequential | read MiB | x resident | hit ratio | cached after MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for label, row in table.items():
            extra = f" (warm phase {row['warm_seconds']:.2f} s)" if "warm_seconds" in row else ""
            lines.append(
                f"| {label}{extra} | {row['seconds']:.2f} | {row['seconds'] / baseline:.2f} | "
                f"{row['read_bytes'] / (1 << 20):.0f} | {row['read_bytes'] / resident:.2f} | "
                f"{row['hit_ratio']:.4f} | {row['cached_bytes'] / (1 << 20):.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
