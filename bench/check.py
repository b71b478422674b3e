"""`igops check` in one run: (1) every check over the lab, against the 2 s goal, with the time
split into the SSH-based checks and all the others; (2) the SSH-based checks (reachability, free
space, frozen filesystems) over 100 SSH targets on loopback, igops against parallel-ssh (Debian's
pssh) sending the very same host program to every target and collecting every answer.

Every target's sshd shares this machine's two cores with the client, so wall time is bounded by
the targets' session set-up (the login shell's start-up files run for every session); the
client's CPU per host, which bounds a real fleet, is reported too.
Goals: the lab under 1 s; at 100 targets faster than parallel-ssh. For the lab the bench also
gives the whole machine's CPU during the run, since the twelve hosts' daemons (sshd and the host
program, munin-node and its plugins, Postgres) share the two cores with the client: that CPU over
the cores is a floor no client can beat.

    .venv/bin/python bench/check.py [--repeats 5] [--targets 100] [--part lab|fleet|both]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sshfleet  # noqa: E402
from bench.measure import Run, median_of, run  # noqa: E402

BASE = "127.0.33"
SSH_PORT = 2204
LAB_LOCK = Path(os.environ.get("IGOPS_LAB_TEST_LOCK", "/tmp/igops-lab-tests.lock"))
LAB_INVENTORY = Path("/var/lib/igops-lab/igops.toml")
LAB_GOAL_S = 1.0
# A tmpfs every target has: the write test needs a real mount point, and one on tmpfs leaves
# nothing behind on a disk.
PROBED_MOUNT = "/dev/shm"
SSH_CHECKS = ["--only", "ssh", "--only", "disk", "--only", "frozen"]
OTHER_CHECKS = [
    "--only",
    "http",
    "--only",
    "postgres",
    "--only",
    "pgbouncer",
    "--only",
    "redis",
    "--only",
    "memcached",
    "--only",
    "munin",
    "--only",
    "snapshot",
    "--only",
    "pingdom",
]


def igops_argv() -> list[str]:
    return [str(Path(sys.executable).with_name("igops"))]


@contextmanager
def lab_lock():
    with open(LAB_LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def lab_part(repeats: int) -> list[str]:
    config = ["-c", str(LAB_INVENTORY)]
    variants = {
        "igops check (everything)": [],
        "  SSH checks only": SSH_CHECKS,
        "  all but the SSH checks": OTHER_CHECKS,
    }
    lines = [
        f"the lab (12 hosts): `igops check`, median of {repeats}",
        f"{'run':<28} {'wall s':>7} {'client CPU s':>13} {'machine CPU s':>14} {'floor s':>8}",
    ]
    with lab_lock():
        run([*igops_argv(), *config, "check", "--quiet"], cwd=ROOT)  # the first run after a while pays cold caches
        medians = {
            name: median_of(
                [run([*igops_argv(), *config, "check", "--quiet", *extra], cwd=ROOT) for _ in range(repeats)]
            )
            for name, extra in variants.items()
        }
    cores = os.cpu_count() or 1
    for name, result in medians.items():
        lines.append(
            f"{name:<28} {result.wall:>7.2f} {result.cpu:>13.2f} {result.machine_cpu:>14.2f} "
            f"{result.machine_cpu / cores:>8.2f}  (exit {result.returncode})"
        )
    whole = medians["igops check (everything)"].wall
    lines.append(
        f"goal: under {LAB_GOAL_S:g} s for the lab: {'met' if whole < LAB_GOAL_S else 'MISSED'} ({whole:.2f} s)"
    )
    lines.append(
        f"machine CPU: every process's, from /proc/stat, during the run; floor: machine CPU / {cores} cores "
        "(os.cpu_count())"
    )
    return lines


def fleet_inventory(work: Path, keys, addresses: list[str], port: int = SSH_PORT) -> Path:
    inventory = sshfleet.inventory(work, keys, addresses, port=port)
    text = inventory.read_text().replace(
        'roles = ["app"]\n', f'roles = []\n[[hosts.mounts]]\npath = "{PROBED_MOUNT}"\n'
    )
    inventory.write_text(text + "[check]\ntimeout = 120\n")
    return inventory


def probe_command() -> tuple[str, bytes]:
    """The command line and stdin igops sends to every host for its SSH checks."""
    from igops import agent
    from igops.checks import fleet

    return agent.invocation("hostprobe", [f"{fleet.WRITE_STALL_SECONDS:g}", PROBED_MOUNT])


def fleet_part(work: Path, count: int, repeats: int) -> list[str]:
    keys, addresses = sshfleet.start(work / "ssh", count, base=BASE, port=SSH_PORT)
    try:
        inventory = fleet_inventory(work, keys, addresses)
        hosts_file = work / "pssh-hosts"
        hosts_file.write_text("".join(f"root@{address}:{SSH_PORT}\n" for address in addresses))
        options = " ".join(sshfleet.ssh_options(keys, SSH_PORT)[:-2])
        command, program = probe_command()
        stdin_file = work / "probe.stdin"
        stdin_file.write_bytes(program)
        results: dict[str, list[Run]] = {"igops check (SSH checks)": [], "parallel-ssh, same probe": []}
        for index in range(repeats):
            results["igops check (SSH checks)"].append(
                run([*igops_argv(), "-c", str(inventory), "check", "--quiet", *SSH_CHECKS], cwd=ROOT)
            )
            with open(stdin_file, "rb") as stdin:
                results["parallel-ssh, same probe"].append(
                    run(
                        [
                            "parallel-ssh",
                            "-h",
                            str(hosts_file),
                            "-p",
                            str(count),
                            "-t",
                            "120",
                            "-x",
                            options,
                            "-I",
                            "-o",
                            str(work / f"pssh-out-{index}"),
                            command,
                        ],
                        stdin=stdin,
                    )
                )
        answered = sum(
            1 for path in (work / f"pssh-out-{repeats - 1}").iterdir() if b'"writable": true' in path.read_bytes()
        )
    finally:
        sshfleet.stop(work / "ssh", count)
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: median_of(runs) for name, runs in results.items()}
    base = medians["igops check (SSH checks)"]
    lines = [
        f"{count} SSH targets on loopback: SSH reachability, free space and a write test of {PROBED_MOUNT}; "
        f"median of {repeats}",
        f"{'client':<26} {'wall s':>7} {'client CPU s':>13} {'CPU ms/host':>12} {'vs igops':>9}",
    ]
    for name, result in medians.items():
        flag = "" if result.returncode == 0 else f"  (exit {result.returncode})"
        lines.append(
            f"{name:<26} {result.wall:>7.2f} {result.cpu:>13.2f} {result.cpu / count * 1000:>12.1f} "
            f"{result.wall / base.wall:>8.2f}x{flag}"
        )
    lines.append(f"parallel-ssh answers with a completed write test: {answered} of {count}")
    pssh = medians["parallel-ssh, same probe"]
    lines.append(
        f"goal: faster than parallel-ssh at {count}: {'met' if base.wall < pssh.wall else 'MISSED'} "
        f"({pssh.wall / base.wall:.2f}x)"
    )
    return lines


def main() -> None:
    # A timeout's SIGTERM must still stop the 100 sshd daemons (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--part", choices=("lab", "fleet", "both"), default="both")
    args = parser.parse_args()
    if args.part in ("lab", "both"):
        print("\n".join(lab_part(args.repeats)) + "\n", flush=True)
    if args.part in ("fleet", "both"):
        print(
            "\n".join(fleet_part(Path(tempfile.mkdtemp(prefix="igops-bench-check-")), args.targets, args.repeats)),
            flush=True,
        )


if __name__ == "__main__":
    main()
