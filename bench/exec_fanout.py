"""`igops exec -- true` over 1, 10, 50 and 100 SSH targets on loopback, against a serial ssh loop
and parallel-ssh (Debian's pssh), in one run.

Every target's sshd shares this machine's cores, so wall time is bounded by sshd's own work;
the client's CPU per host is what bounds a real fleet, and is reported beside it.
Goals: faster than parallel-ssh at 100 targets, and less client CPU per host than parallel-ssh.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import sshfleet  # noqa: E402
from bench.measure import median_of, run  # noqa: E402

SIZES = [1, 10, 50, 100]
REPEATS = 3


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="igops-bench-exec-"))
    keys, targets = sshfleet.start(work, max(SIZES))
    igops = str(Path(sys.executable).with_name("igops"))
    try:
        print(f"exec_fanout: `true` on N loopback SSH targets, median of {REPEATS} runs")
        print(f"{'N':>4} {'client':<14} {'wall s':>8} {'client CPU s':>13} {'CPU ms/host':>12} {'vs igops':>9}")
        for size in SIZES:
            hosts = targets[:size]
            inventory = sshfleet.inventory(work, keys, hosts)
            host_file = work / f"hosts-{size}"
            host_file.write_text("".join(f"root@{address}:{sshfleet.PORT}\n" for address in hosts))
            options = sshfleet.ssh_options(keys)
            contenders = {
                "igops": functools.partial(
                    run,
                    [igops, "-c", str(inventory), "exec", "--yes", "--no-output", "--parallel", "100", "--", "true"],
                ),
                "parallel-ssh": functools.partial(
                    run,
                    [
                        "parallel-ssh",
                        "-h",
                        str(host_file),
                        "-p",
                        "100",
                        "-t",
                        "60",
                        "-x",
                        " ".join(options[:-2]),
                        "true",
                    ],
                ),
                "serial ssh": functools.partial(_serial, hosts, options),
            }
            results = {name: median_of([measure() for _ in range(REPEATS)]) for name, measure in contenders.items()}
            for name, result in results.items():
                ratio = result.wall / results["igops"].wall
                flag = "" if result.returncode == 0 else f"  (exit {result.returncode})"
                print(
                    f"{size:>4} {name:<14} {result.wall:>8.2f} {result.cpu:>13.2f} "
                    f"{result.cpu / size * 1000:>12.1f} {ratio:>8.2f}x{flag}"
                )
    finally:
        sshfleet.stop(work, max(SIZES))


def _serial(hosts: list[str], options: list[str]):
    from bench.measure import Run

    total = Run(0.0, 0.0, 0)
    for address in hosts:
        one = run(["ssh", *options, f"root@{address}", "true"])
        total = Run(total.wall + one.wall, total.cpu + one.cpu, max(total.returncode, one.returncode))
    return total


if __name__ == "__main__":
    main()
