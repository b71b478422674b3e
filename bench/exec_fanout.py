"""`igops exec -- true` on 1, 10, 50, 100, 300 and 1,000 SSH targets on loopback, against
parallel-ssh (Debian's pssh) and, up to 100 targets, a serial ssh loop; then, at the largest size,
`igops check`'s SSH checks and `igops deploy`'s release switch, each against parallel-ssh doing
the same. In one run, side by side, with parallel-ssh's figures as ratios to igops'.

    .venv/bin/python bench/exec_fanout.py [--sizes 1,10,50,100,300,1000] [--repeats 3] [--large-repeats 1]
                                          [--parts exec,check,deploy] [--parallel 100]

`--sizes 300,1000` runs only those sizes; check and deploy run at the largest size given
(`--parts exec` leaves them out). Below 300 targets each figure is the median of --repeats runs,
from 300 on of --large-repeats (one by default: parallel-ssh takes a minute at 1,000). Needs
root, OpenSSH's sshd and pssh; nothing of the lab.

Every target is a real sshd on a loopback address (16 addresses a daemon: 63 daemons for 1,000
targets), and they all share this machine's cores with the client: the targets' own work (key
exchange, login, the command) is a floor under wall time that a real fleet, where each host has
its own cores, does not have. The bench measures that work and sets each run's wall time
against it; the client's CPU per host, which is what bounds a real fleet, is reported beside it.
Every client checks host keys strictly against the fleet's known_hosts (igops as its inventory
says; ssh with StrictHostKeyChecking=yes and BatchMode=yes).

The figures of each run (a shorter legend is printed at the end):
  wall s         start to exit of the client.
  client CPU s   user+system time of the client process and of every child it waited for
                 (parallel-ssh's and the serial loop's ssh processes), from os.wait4 on its pid;
                 ms/host divides it by the targets.
  peak RSS MiB   ru_maxrss from the same os.wait4: the client's largest resident set, or a child's
                 if larger (each process on its own: parallel-ssh's 100 ssh at once are not summed).
  1st result s   start to the first host's result line on the client's stdout, read as it comes
                 (igops: "t7: ok, exit 0 in 85 ms"; parallel-ssh: "[1] … [SUCCESS] …", run with
                 PYTHONUNBUFFERED=1 so that it writes each line when its host ends, as it does
                 on a terminal; the serial loop: its first ssh's end). Shows whether results
                 stream; "-" where no such line is printed (check --json, deploy).
  sshd CPU s     the targets' side: user+system time of the fleet's listening sshd and of every
                 login they forked (the re-executed sshd, its privilege-separated child, the
                 session, the command), as the listeners' utime+stime+cutime+cstime in
                 /proc/PID/stat before the run and after it, once every login has been reaped
                 (a listener's cutime/cstime gathers each reaped login with all it waited for);
                 ms/host divides it by the targets.
  wall/floor     wall time over the sshd floor, sshd CPU / os.cpu_count(): the shortest the run
                 could be were the targets' sshd work alone spread over every core. 1.0x is a run
                 bound by the targets; the client's own CPU is on the same cores too.
  ok             targets the run shows succeeded: igops exec, distinct hosts with an "ok, exit 0"
                 line; parallel-ssh, distinct hosts with a [SUCCESS] line; the serial loop, ssh
                 exits 0. At the largest size, `igops exec --json` is run once more and its
                 envelope checked: a result for every target, each once, every one ok.
  check: ok      targets with all three checks OK (ssh, disk and frozen of /dev/shm) in
                 `igops check --json`; for parallel-ssh, answers with a completed write test.
  deploy: ok     targets whose `current` is the release that run deployed (read on disk).

Check runs the same host program (agent/hostprobe.py on stdin) through parallel-ssh as igops
sends, with the inventory's [ssh] parallel for igops and -p for parallel-ssh. Deploy: igops does
the whole deploy (survey, upload with sha256 check, unpack, atomic switch, revisions.log,
pruning, the reload command `true`, and a health gate of 3 passes per host); parallel-scp plus
parallel-ssh only upload, unpack and switch (`ln -s` + `mv -T`). The bench stands in for the
app: one thread answers /health on every target address with the release its `current` points
at, and each target's virtualenv for the app's requirements is a directory holding only the
ready marker (nothing on a target runs the app; a switch only links it).
Goals: faster than parallel-ssh at 100 targets, and less client CPU per host than parallel-ssh.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sshfleet  # noqa: E402
from bench.measure import Spawned, machine_busy_seconds, spawn  # noqa: E402

SIZES = [1, 10, 50, 100, 300, 1000]
REPEATS = 3
# From this many targets on, one run of each: the whole bench stays within minutes.
LARGE = 300
# The serial loop takes about 0.2 s a target: 200 s at 1,000 would say nothing new.
SERIAL_UP_TO = 100
PARALLEL = 100
PARTS = ("exec", "check", "deploy")
HEALTH_PORT = 8200
# `igops check`'s one deadline for the whole run (its maximum), and parallel-ssh's per host.
CHECK_TIMEOUT_S = 300
PSSH_TIMEOUT_S = 300

IGOPS_RESULT = re.compile(r"^\S+: (ok, exit 0 in |FAILED, )")
IGOPS_OK = re.compile(r"^(\S+): ok, exit 0 in ")
PSSH_RESULT = re.compile(r"^\[\d+\] \S+ \[(?:SUCCESS|FAILURE)\] ")
PSSH_OK = re.compile(r"^\[\d+\] \S+ \[SUCCESS\] (\S+)")


@dataclass
class Sample:
    wall: float
    cpu: float
    rss_kib: float
    returncode: int
    first: float | None
    ok: int
    sshd_cpu: float = 0.0
    settled: bool = True
    machine_cpu: float = 0.0

    @classmethod
    def of(cls, spawned: Spawned, ok: int, first: bool = True) -> Sample:
        return cls(
            spawned.wall,
            spawned.cpu,
            spawned.max_rss_kib,
            spawned.returncode,
            spawned.first_match if first else None,
            ok,
        )


def median_of(samples: list[Sample]) -> Sample:
    firsts = [sample.first for sample in samples if sample.first is not None]
    return Sample(
        statistics.median(sample.wall for sample in samples),
        statistics.median(sample.cpu for sample in samples),
        statistics.median(sample.rss_kib for sample in samples),
        max(sample.returncode for sample in samples),
        statistics.median(firsts) if firsts else None,
        min(sample.ok for sample in samples),
        statistics.median(sample.sshd_cpu for sample in samples),
        all(sample.settled for sample in samples),
        statistics.median(sample.machine_cpu for sample in samples),
    )


@dataclass
class Fleet:
    work: Path
    keys: sshfleet.sshd.SshKeys
    addresses: list[str]
    sshd: sshfleet.SshdCpu
    cores: int

    @property
    def igops(self) -> str:
        return str(Path(sys.executable).with_name("igops"))

    @property
    def igops_env(self) -> dict[str, str]:
        """This environment without igops' secrets: the bench's fleet pages no one."""
        from igops.secrets import KNOWN

        return {name: value for name, value in os.environ.items() if name not in KNOWN.values()}

    @property
    def ssh_options(self) -> str:
        """For parallel-ssh's -x: the port is in its hosts file."""
        return " ".join(sshfleet.ssh_options(self.keys)[:-2])

    def hosts_file(self, directory: Path, addresses: list[str]) -> Path:
        path = directory / f"pssh-hosts-{len(addresses)}"
        path.write_text("".join(f"root@{address}:{sshfleet.PORT}\n" for address in addresses))
        return path

    def measured(self, action: Callable[[], Sample]) -> Sample:
        """The action's figures, with the sshd CPU it caused once every login it made has ended."""
        self.sshd.settle()  # what ran before is counted before
        before = self.sshd.seconds()
        busy = machine_busy_seconds()
        sample = action()
        sample.machine_cpu = machine_busy_seconds() - busy
        sample.settled = self.sshd.settle()
        sample.sshd_cpu = self.sshd.seconds() - before
        return sample


# --- the table --------------------------------------------------------------------------------

HEADER = (
    f"{'N':>5} {'client':<16} {'wall s':>7} {'client CPU s':>12} {'CPU ms/host':>11} {'peak RSS MiB':>12} "
    f"{'1st result s':>12} {'sshd CPU s':>10} {'sshd ms/host':>12} {'machine CPU s':>13} {'wall/floor':>10} "
    f"{'ok':>11}"
)


def row(size: int, name: str, sample: Sample, cores: int) -> str:
    floor = sample.sshd_cpu / cores
    first = "-" if sample.first is None else f"{sample.first:.2f}"
    versus_floor = f"{sample.wall / floor:.2f}x" if floor > 0 else "-"
    flags = "" if sample.returncode == 0 else f"  (exit {sample.returncode})"
    if not sample.settled:
        flags += "  (logins not all reaped 30 s after the run: sshd CPU may be short)"
    return (
        f"{size:>5} {name:<16} {sample.wall:>7.2f} {sample.cpu:>12.2f} {sample.cpu / size * 1000:>11.1f} "
        f"{sample.rss_kib / 1024:>12.1f} {first:>12} {sample.sshd_cpu:>10.2f} "
        f"{sample.sshd_cpu / size * 1000:>12.1f} {sample.machine_cpu:>13.2f} {versus_floor:>10} "
        f"{f'{sample.ok}/{size}':>11}{flags}"
    )


def ratios(name: str, sample: Sample, base: Sample) -> str:
    def ratio(mine: float | None, theirs: float | None) -> str:
        return f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"

    return (
        f"{'':>5} {name} / igops: wall {ratio(sample.wall, base.wall)}, "
        f"client CPU {ratio(sample.cpu, base.cpu)}, sshd CPU {ratio(sample.sshd_cpu, base.sshd_cpu)}, "
        f"1st result {ratio(sample.first, base.first)}"
    )


def print_size(size: int, medians: dict[str, Sample], cores: int) -> None:
    base = medians["igops"] if "igops" in medians else next(iter(medians.values()))
    lines = [row(size, name, sample, cores) for name, sample in medians.items()]
    lines += [ratios(name, sample, base) for name, sample in medians.items() if sample is not base]
    print("\n".join(lines), flush=True)


# --- (1) igops exec -----------------------------------------------------------------------------


def exec_part(fleet: Fleet, sizes: list[int], repeats: int, large_repeats: int, parallel: int) -> None:
    print(
        f"\nexec: `true` on N targets; igops exec --parallel {parallel}, parallel-ssh -p {parallel}, "
        f"a serial ssh loop up to {SERIAL_UP_TO}; median of {repeats} runs below {LARGE} targets, of "
        f"{large_repeats} from {LARGE} on",
        flush=True,
    )
    print(HEADER, flush=True)
    for size in sizes:
        addresses = fleet.addresses[:size]
        inventory = sshfleet.inventory(fleet.work, fleet.keys, addresses)
        hosts_file = fleet.hosts_file(fleet.work, addresses)
        contenders: dict[str, Callable[[], Sample]] = {
            "igops": functools.partial(_igops_exec, fleet, inventory, parallel),
            "parallel-ssh": functools.partial(_pssh_exec, fleet, hosts_file, parallel),
        }
        if size <= SERIAL_UP_TO:
            contenders["serial ssh"] = functools.partial(_serial, fleet, addresses)
        samples: dict[str, list[Sample]] = {name: [] for name in contenders}
        # Interleaved, so that a change of the machine's load falls on every contender alike.
        for _ in range(repeats if size < LARGE else large_repeats):
            for name, action in contenders.items():
                samples[name].append(fleet.measured(action))
        print_size(size, {name: median_of(runs) for name, runs in samples.items()}, fleet.cores)
    print(_exec_json_check(fleet, max(sizes), parallel), flush=True)


def _igops_exec(fleet: Fleet, inventory: Path, parallel: int) -> Sample:
    done = spawn(
        [fleet.igops, "-c", str(inventory), "exec", "--yes", "--no-output", "--parallel", str(parallel), "--", "true"],
        first=IGOPS_RESULT,
        env=fleet.igops_env,
    )
    ok = {match.group(1) for line in done.stdout if (match := IGOPS_OK.match(line))}
    return Sample.of(_complain(done, "igops exec"), len(ok))


def _pssh_exec(fleet: Fleet, hosts_file: Path, parallel: int) -> Sample:
    done = spawn(
        [
            "parallel-ssh",
            "-h",
            str(hosts_file),
            "-p",
            str(parallel),
            "-t",
            str(PSSH_TIMEOUT_S),
            "-x",
            fleet.ssh_options,
            "true",
        ],
        first=PSSH_RESULT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return Sample.of(_complain(done, "parallel-ssh"), _pssh_successes(done))


def _serial(fleet: Fleet, addresses: list[str]) -> Sample:
    options = sshfleet.ssh_options(fleet.keys)
    total = Sample(0.0, 0.0, 0, 0, None, 0)
    for address in addresses:
        one = _complain(spawn(["ssh", *options, f"root@{address}", "true"]), "ssh")
        total = Sample(
            total.wall + one.wall,
            total.cpu + one.cpu,
            max(total.rss_kib, one.max_rss_kib),
            max(total.returncode, one.returncode),
            one.wall if total.first is None else total.first,
            total.ok + (one.returncode == 0),
        )
    return total


def _exec_json_check(fleet: Fleet, size: int, parallel: int) -> str:
    """`igops exec --json` once more at `size`: its envelope must hold every target once, all ok."""
    inventory = sshfleet.inventory(fleet.work, fleet.keys, fleet.addresses[:size])
    done = _complain(
        spawn(
            [fleet.igops, "-c", str(inventory), "exec", "--yes", "--json", "--parallel", str(parallel), "--", "true"],
            env=fleet.igops_env,
        ),
        "igops exec --json",
    )
    try:
        data = json.loads("\n".join(done.stdout))["data"]
        hosts = data["hosts"]
    except (ValueError, KeyError, TypeError) as exc:
        return (
            f"igops exec --json at {size}: no envelope to check ({type(exc).__name__}: {exc}), exit {done.returncode}"
        )
    names = [host["host"] for host in hosts]
    every_once = sorted(names) == sorted(f"t{index}" for index in range(size))
    all_ok = all(host["ok"] and host["exit_code"] == 0 for host in hosts)
    verdict = "yes" if every_once and all_ok and data["ok"] == size else "NO"
    return (
        f"igops exec --json at {size}: exit {done.returncode}, {len(hosts)} host results, {data['ok']} ok, "
        f"{data['failed']} failed; every target once and ok: {verdict} ({done.wall:.2f} s)"
    )


def _pssh_successes(done: Spawned) -> int:
    return len({match.group(1) for line in done.stdout if (match := PSSH_OK.match(line))})


def _complain(done: Spawned, what: str) -> Spawned:
    if done.returncode != 0 and done.stderr_tail:
        print(f"  {what} exited {done.returncode}: {done.stderr_tail.splitlines()[-1]}", file=sys.stderr)
    return done


# --- (2) igops check's SSH checks ---------------------------------------------------------------


def check_part(fleet: Fleet, size: int, parallel: int) -> None:
    from bench import check

    directory = fleet.work / "check"
    directory.mkdir()
    addresses = fleet.addresses[:size]
    inventory = check.fleet_inventory(directory, fleet.keys, addresses, port=sshfleet.PORT)
    inventory.write_text(inventory.read_text().replace("\nparallel = 100\n", f"\nparallel = {parallel}\n"))
    hosts_file = fleet.hosts_file(directory, addresses)
    command, program = check.probe_command()
    stdin_file = directory / "probe.stdin"
    stdin_file.write_bytes(program)
    output = directory / "pssh-out"
    groups = len(check.SSH_CHECKS) // 2  # ssh, disk and frozen: one mount each
    found: dict[str, list[str]] = {}
    problems: list[str] = []

    def igops() -> Sample:
        argv = [fleet.igops, "-c", str(inventory), "check", "--json", "--timeout", str(CHECK_TIMEOUT_S)]
        done = _complain(spawn([*argv, *check.SSH_CHECKS], env=fleet.igops_env, cwd=ROOT), "igops check")
        found.update(_check_statuses(done, problems))
        return Sample.of(done, sum(statuses == ["OK"] * groups for statuses in found.values()), first=False)

    def pssh() -> Sample:
        done = spawn(
            [
                "parallel-ssh",
                "-h",
                str(hosts_file),
                "-p",
                str(parallel),
                "-t",
                str(PSSH_TIMEOUT_S),
                "-x",
                fleet.ssh_options,
                "-I",
                "-o",
                str(output),
                command,
            ],
            first=PSSH_RESULT,
            stdin=stdin_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        answered = sum(b'"writable": true' in path.read_bytes() for path in output.iterdir())
        return Sample.of(_complain(done, "parallel-ssh"), answered)

    print(
        f"\ncheck: the SSH checks (reachability, free space, a write test of {check.PROBED_MOUNT}) on {size} "
        f"targets; igops check --json with [ssh] parallel = {parallel}, parallel-ssh -p {parallel} sending the "
        "same host program; one run",
        flush=True,
    )
    print(HEADER, flush=True)
    print_size(size, {"igops check": fleet.measured(igops), "parallel-ssh": fleet.measured(pssh)}, fleet.cores)
    counts = Counter(status for statuses in found.values() for status in statuses)
    print(
        f"igops check: {sum(counts.values())} results for {len(found)} of {size} targets "
        f"({', '.join(f'{count} {status}' for status, count in sorted(counts.items())) or 'none'})",
        flush=True,
    )
    for problem in problems:
        print(f"  {problem}", flush=True)


def _check_statuses(done: Spawned, problems: list[str]) -> dict[str, list[str]]:
    """Each target's statuses in `igops check --json` (ssh of "t7"; disk and frozen of "t7:/dev/shm");
    what is not OK is added to `problems`, as check, target, status and summary."""
    try:
        results = json.loads("\n".join(done.stdout))["data"]["results"]
    except (ValueError, KeyError, TypeError):
        return {}
    statuses: dict[str, list[str]] = {}
    for result in results:
        statuses.setdefault(result["target"].split(":", 1)[0], []).append(result["status"])
        if result["status"] != "OK":
            problems.append(f"{result['check']} {result['target']}: {result['status']}, {result['summary']}")
    return statuses


# --- (3) igops deploy's release switch ----------------------------------------------------------


class HealthResponder:
    """/health on every target address, all in one thread (an event loop), answered with the
    release the address's `current` points at, as the app reports it: the health gates of igops'
    deploy have something to check, at little CPU beside the clients."""

    def __init__(self, roots: dict[str, Path], port: int):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="health", daemon=True)
        self.thread.start()
        self.servers = asyncio.run_coroutine_threadsafe(self._listen(roots, port), self.loop).result()

    async def _listen(self, roots: dict[str, Path], port: int) -> list[asyncio.Server]:
        return [
            await asyncio.start_server(functools.partial(self._answer, root), address, port)
            for address, root in roots.items()
        ]

    @staticmethod
    async def _answer(root: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            try:
                release = os.path.basename(os.readlink(root / "current"))
            except OSError:
                release = None
            body = json.dumps({"status": "ok", "release": release}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            for server in self.servers:
                server.close()
            for server in self.servers:
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def deploy_part(fleet: Fleet, size: int, parallel: int) -> None:
    from bench import deploy as deploy_bench
    from igops import deploy
    from igops.agent.release import READY_MARKER

    directory = fleet.work / "deploy"
    addresses = fleet.addresses[:size]
    requirements = deploy.requirements_hash((ROOT / "app" / "requirements.txt").read_bytes())
    # The virtualenv a switch links: nothing runs the app here, so only its ready marker.
    virtualenv = directory / "virtualenv" / requirements
    virtualenv.mkdir(parents=True)
    (virtualenv / READY_MARKER).write_text("")
    roots: dict[str, Path] = {}
    for index, address in enumerate(addresses):
        root = directory / "targets" / f"t{index}" / "app"
        (root / "shared" / "venvs").mkdir(parents=True)
        (root / "shared" / "venvs" / requirements).symlink_to(virtualenv)
        (directory / "by-address").mkdir(exist_ok=True)
        (directory / "by-address" / address).symlink_to(root.parent)
        roots[address] = root
    inventory = sshfleet.inventory(directory, fleet.keys, addresses)
    inventory.write_text(
        inventory.read_text()
        + f"""
[app]
root = "{directory / "targets" / "{host}" / "app"}"
port = {HEALTH_PORT}
health_path = "/health"
reload_command = "true"
keep_releases = 3
"""
    )
    hosts_file = fleet.hosts_file(directory, addresses)

    def switched(source: Path) -> int:
        """Targets whose `current` is the release made from `source` (its marker file)."""
        marker = (source / "BENCH_RELEASE").read_text()
        count = 0
        for root in roots.values():
            try:
                count += (root / "current" / "app" / "BENCH_RELEASE").read_text() == marker
            except OSError:
                pass
        return count

    def igops() -> Sample:
        source = deploy_bench.release_source(directory, "igops")
        argv = [fleet.igops, "-c", str(inventory), "deploy", "--source", str(source), "--batch", "100%"]
        done = spawn([*argv, "--parallel", str(parallel), "--yes"], env=fleet.igops_env, cwd=ROOT)
        return Sample.of(_complain(done, "igops deploy"), switched(source), first=False)

    # parallel-ssh's release, made here as igops makes its own, outside the clients' figures.
    pssh_source = deploy_bench.release_source(directory, "pssh")
    release, data = deploy.package(deploy.read_source(pssh_source, None), f"{time.strftime('%Y%m%d%H%M%S')}-pssh000")
    tarball = directory / f"{release.id}.tgz"
    tarball.write_bytes(data)

    def pssh() -> Sample:
        remote_tarball = f"/tmp/igops-bench-exec-{release.id}.tgz"
        common = ["-h", str(hosts_file), "-p", str(parallel), "-t", str(PSSH_TIMEOUT_S), "-x", fleet.ssh_options]
        try:
            upload = _complain(spawn(["parallel-scp", *common, str(tarball), remote_tarball]), "parallel-scp")
            # One command for every host: each finds its own root from the address it was reached at.
            root = shlex.quote(str(directory / "by-address")) + '/"$(echo "$SSH_CONNECTION" | cut -d" " -f3)"/app'
            script = deploy_bench._switch_script(root, release.id, requirements, remote_tarball)
            switch = _complain(spawn(["parallel-ssh", *common, script]), "parallel-ssh")
        finally:
            Path(remote_tarball).unlink(missing_ok=True)
        return Sample(
            upload.wall + switch.wall,
            upload.cpu + switch.cpu,
            max(upload.max_rss_kib, switch.max_rss_kib),
            max(upload.returncode, switch.returncode),
            None,
            switched(pssh_source),
        )

    print(
        f"\ndeploy: one release of app/ ({len(data) / 1024:.0f} KiB) to {size} targets; igops deploy --batch 100% "
        f"--parallel {parallel} (survey, upload, unpack, switch, reload, health gate of 3 passes), parallel-scp + "
        f"parallel-ssh -p {parallel} (upload, unpack, switch); one run",
        flush=True,
    )
    print(HEADER, flush=True)
    responder = HealthResponder(roots, HEALTH_PORT)
    try:
        medians = {"igops deploy": fleet.measured(igops), "parallel-scp+ssh": fleet.measured(pssh)}
    finally:
        responder.close()
    print_size(size, medians, fleet.cores)


# --- the run ------------------------------------------------------------------------------------


def raise_open_files() -> int:
    """The soft limit on open files up to the hard one, for the bench and every process it starts
    (sshd, the clients): 1,000 targets want thousands of descriptors at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        wanted = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


def _numbers(text: str) -> list[int]:
    try:
        numbers = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not numbers or numbers[0] < 1:
        raise argparse.ArgumentTypeError("sizes are numbers of targets, at least 1")
    return numbers


def _parts(text: str) -> list[str]:
    parts = [item.strip() for item in text.split(",") if item.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"parts are among {', '.join(PARTS)}")
    return parts


LEGEND = """\
wall s: start to exit of the client. client CPU s: user+system of the client and of every child
it waited for (os.wait4 on its pid). CPU ms/host, sshd ms/host: per target. peak RSS MiB:
ru_maxrss from the same wait4, its largest single process (parallel-ssh's ssh processes are not
summed). 1st result s: start to the first host's result line on stdout. sshd CPU s: the fleet's
listening sshd's utime+stime+cutime+cstime (/proc/PID/stat) once every login is reaped, less
before: every login and what it ran. machine CPU s: every process's CPU on the machine from the
client's start to its exit (/proc/stat: the client, the targets, the kernel's own work).
wall/floor: wall / (sshd CPU / {cores} cores, os.cpu_count()); 1.0x is a run bound by the
targets' sshd alone. ok: targets the run shows succeeded."""


def main() -> None:
    # A timeout's SIGTERM must still stop the sshd daemons (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_numbers, default=SIZES, help="numbers of targets, e.g. 300,1000")
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"runs of each below {LARGE} targets")
    parser.add_argument(
        "--large-repeats", type=int, default=1, help=f"runs of each from {LARGE} targets on (exec only)"
    )
    parser.add_argument("--parts", type=_parts, default=list(PARTS), help="among exec,check,deploy")
    parser.add_argument("--parallel", type=int, default=PARALLEL, help="hosts at once, for every client")
    args = parser.parse_args()
    count = max(args.sizes)
    open_files = raise_open_files()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="igops-bench-exec-"))
    try:
        keys, addresses = sshfleet.start(work, count)
        fleet = Fleet(work, keys, addresses, sshfleet.SshdCpu(sshfleet.listeners(work, count)), cores)
        print(
            f"exec_fanout, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {count} loopback SSH targets on "
            f"{len(fleet.sshd.pids)} sshd, {cores} cores (os.cpu_count()), open files limit {open_files}",
            flush=True,
        )
        if "exec" in args.parts:
            exec_part(fleet, args.sizes, args.repeats, args.large_repeats, args.parallel)
        if "check" in args.parts:
            check_part(fleet, count, args.parallel)
        if "deploy" in args.parts:
            deploy_part(fleet, count, args.parallel)
        print("\n" + LEGEND.format(cores=cores), flush=True)
    finally:
        sshfleet.stop(work, count)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
