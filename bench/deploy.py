"""`igops deploy` in one run: (1) a new release of app/ to the lab's three app servers with every
health gate, under the 15 s goal, with unchanged dependencies (no virtualenv is built); (2) the
upload-unpack-switch of one release to 100 SSH targets on loopback, igops against a serial
Fabric loop and against parallel-scp plus parallel-ssh (Debian's pssh). A bad release, judged by
the canary against the /health gate alone, is bench/deploy_bad_release.py's.

Every target's sshd shares this machine's two cores with the client, so wall time is bounded by
the targets' handshakes; the client's CPU per host, which bounds a real fleet, is reported too.
For the 100 targets igops does the whole deploy: a survey, the upload with sha256 check, the
unpack into a temporary directory renamed into place, the atomic switch, revisions.log, pruning,
the reload command (`true` there) and a health gate per host, answered by a small HTTP responder
on each target address that reports the release its `current` points at. The two baselines do
only the upload, the unpack and the `ln -s` + `mv -T` switch.
Goals: lab deploy under 15 s; at 100 targets faster than pssh and at least 2x faster than serial.

    .venv/bin/python bench/deploy.py [--repeats 3] [--targets 100] [--part lab|fleet|both]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import sshfleet  # noqa: E402
from bench.measure import Run, median_of, run  # noqa: E402

BASE = "127.0.32"
SSH_PORT = 2203
HEALTH_PORT = 8203
LAB_LOCK = Path(os.environ.get("IGOPS_LAB_TEST_LOCK", "/tmp/igops-lab-tests.lock"))
LAB_GOAL_S = 15.0
# Hosts at once, for igops and pssh alike: every target's login runs on the same two cores.
PARALLEL = int(os.environ.get("BENCH_DEPLOY_PARALLEL", "20"))


def release_source(work: Path, name: str) -> Path:
    """The app with a marker: a release whose content is new, with the same requirements."""
    source = work / "sources" / name / "app"
    shutil.copytree(ROOT / "app", source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / "BENCH_RELEASE").write_text(f"{name} {time.time()}\n")
    return source


def igops_argv() -> list[str]:
    return [str(Path(sys.executable).with_name("igops"))]


# --- (1) the lab --------------------------------------------------------------------------------


def lab_part(work: Path, repeats: int) -> list[str]:
    from igops.lab import state

    inventory = state.paths().inventory
    lines = [
        f"lab: a new release of app/ to app1..app3 through nginx, batches 1,25%, 3 health passes each; "
        f"median of {repeats}"
    ]
    walls, cpus, phases, built = [], [], [], []
    with open(LAB_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for index in range(repeats):
                source = release_source(work, f"lab{index}")
                envelope_file = work / f"lab{index}.json"
                with open(envelope_file, "w") as out:
                    before = os.times()
                    started = time.perf_counter()
                    done = subprocess.run(
                        [
                            *igops_argv(),
                            "-c",
                            str(inventory),
                            "deploy",
                            "--source",
                            str(source),
                            "--analysis",
                            "0",
                            "--yes",
                            "--json",
                        ],
                        stdout=out,
                        stderr=subprocess.DEVNULL,
                        cwd=ROOT,
                    )
                    walls.append(time.perf_counter() - started)
                    after = os.times()
                cpus.append(
                    (after.children_user - before.children_user) + (after.children_system - before.children_system)
                )
                envelope = json.loads(envelope_file.read_text())
                if done.returncode != 0:
                    raise SystemExit(f"lab deploy failed: {envelope.get('error')}")
                phases.append({_phase(step["title"]): step["duration_ms"] / 1000 for step in envelope["steps"]})
                built.append(any("virtualenv built" in (step["detail"] or "") for step in envelope["steps"]))
        finally:
            restore = subprocess.run(
                [*igops_argv(), "-c", str(inventory), "deploy", "--analysis", "0", "--yes"],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if restore.returncode != 0:
                print(f"restoring the working tree's release failed: {restore.stderr.strip()[-300:]}", file=sys.stderr)
    wall = statistics.median(walls)
    lines.append(
        f"  igops deploy   wall {wall:6.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)})   "
        f"client CPU {statistics.median(cpus):.2f} s   goal < {LAB_GOAL_S:g} s: "
        f"{'met' if wall < LAB_GOAL_S else 'MISSED'}"
    )
    lines.append(f"  virtualenv rebuilt: {'yes' if any(built) else 'no'} (requirements unchanged)")
    names = list(phases[0])
    lines.append(
        "  phases (median s): "
        + ", ".join(f"{name} {statistics.median(p.get(name, 0.0) for p in phases):.2f}" for name in names)
    )
    return lines


def _phase(title: str) -> str:
    for prefix, name in (
        ("read", "build"),
        ("survey", "survey"),
        ("upload", "stage"),
        ("put", "put back"),
        ("PagerDuty", "change event"),
    ):
        if title.startswith(prefix):
            return name
    return title.split(":")[0]


# --- (2) 100 SSH targets ----------------------------------------------------------------------


class HealthResponder:
    """Answers /health on every target address with the release its `current` points at, the way
    the app reports it: the health gates of igops' 100-target deploy have something to check."""

    def __init__(self, roots: dict[str, Path]):
        self.servers = []
        for address, root in roots.items():
            server = ThreadingHTTPServer((address, HEALTH_PORT), self._handler(root))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)

    @staticmethod
    def _handler(root: Path):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                try:
                    release = os.path.basename(os.readlink(root / "current"))
                except OSError:
                    release = None
                body = json.dumps({"status": "ok", "release": release}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def close(self) -> None:
        # shutdown() waits out a poll interval: stop them all at once.
        stoppers = [threading.Thread(target=server.shutdown) for server in self.servers]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in self.servers:
            server.server_close()


@contextmanager
def targets(work: Path, count: int):
    from igops import deploy
    from igops.lab import state

    keys, addresses = sshfleet.start(work / "ssh", count, base=BASE, port=SSH_PORT)
    requirements = deploy.requirements_hash((ROOT / "app" / "requirements.txt").read_bytes())
    prebuilt = state.paths().venvs / requirements
    if not (prebuilt / ".igops-ready").exists():
        raise SystemExit(f"no prebuilt virtualenv at {prebuilt}: run `igops lab up` first")
    roots: dict[str, Path] = {}
    for index, address in enumerate(addresses):
        root = work / "targets" / f"t{index}" / "app"
        (root / "shared" / "venvs").mkdir(parents=True)
        (root / "shared" / "venvs" / requirements).symlink_to(prebuilt)
        (work / "by-address").mkdir(exist_ok=True)
        (work / "by-address" / address).symlink_to(root.parent)
        roots[address] = root
    inventory = sshfleet.inventory(work, keys, addresses, port=SSH_PORT)
    inventory.write_text(
        inventory.read_text()
        + f"""
[app]
root = "{work / "targets" / "{host}" / "app"}"
port = {HEALTH_PORT}
health_path = "/health"
reload_command = "true"
keep_releases = 3
"""
    )
    responder = HealthResponder(roots)
    try:
        yield keys, addresses, inventory, requirements
    finally:
        responder.close()
        sshfleet.stop(work / "ssh", count)


def fleet_part(work: Path, count: int, repeats: int) -> list[str]:
    from igops import deploy

    lines = [
        f"{count} SSH targets on loopback: upload, unpack and switch one release (35 KiB); {PARALLEL} hosts at "
        f"once (igops, pssh); median of {repeats}",
        f"{'client':<26} {'wall s':>7} {'client CPU s':>13} {'CPU ms/host':>12} {'vs igops':>9}",
    ]
    with targets(work, count) as (keys, addresses, inventory, requirements):
        hosts_file = work / "pssh-hosts"
        hosts_file.write_text("".join(f"root@{address}:{SSH_PORT}\n" for address in addresses))
        options = sshfleet.ssh_options(keys, SSH_PORT)[:-2]
        results: dict[str, list[Run]] = {
            "igops deploy --batch 100%": [],
            "parallel-scp + parallel-ssh": [],
            "serial Fabric loop": [],
        }
        for index in range(repeats):
            source = release_source(work, f"fleet{index}")
            results["igops deploy --batch 100%"].append(
                run(
                    [
                        *igops_argv(),
                        "-c",
                        str(inventory),
                        "deploy",
                        "--source",
                        str(source),
                        "--batch",
                        "100%",
                        "--analysis",
                        "0",
                        "--parallel",
                        str(PARALLEL),
                        "--yes",
                    ],
                    cwd=ROOT,
                )
            )
            release, data = deploy.package(
                deploy.read_source(source, None), f"{time.strftime('%Y%m%d%H%M%S')}-pssh{index:03d}"
            )
            tarball = work / f"{release.id}.tgz"
            tarball.write_bytes(data)
            results["parallel-scp + parallel-ssh"].append(
                _pssh(work, hosts_file, options, tarball, release.id, requirements)
            )
            fabric_id = f"{time.strftime('%Y%m%d%H%M%S')}-fab{index:04d}"
            spec = work / f"fabric-{index}.json"
            spec.write_text(
                json.dumps(
                    {
                        "hosts": addresses,
                        "port": SSH_PORT,
                        "key": str(keys.client_key),
                        "known_hosts": str(keys.known_hosts),
                        "tarball": str(tarball),
                        "release": fabric_id,
                        "requirements": requirements,
                        "roots": {address: str(work / "by-address" / address / "app") for address in addresses},
                    }
                )
            )
            results["serial Fabric loop"].append(
                run([sys.executable, __file__, "--fabric-serial", str(spec)], cwd=ROOT)
            )
        medians = {name: median_of(runs) for name, runs in results.items()}
        base = medians["igops deploy --batch 100%"]
        for name, result in medians.items():
            flag = "" if result.returncode == 0 else f"  (exit {result.returncode})"
            lines.append(
                f"{name:<26} {result.wall:>7.2f} {result.cpu:>13.2f} {result.cpu / count * 1000:>12.1f} "
                f"{result.wall / base.wall:>8.2f}x{flag}"
            )
        current = {os.path.basename(os.readlink(work / "by-address" / a / "app" / "current")) for a in addresses}
        switched = len(current) == 1 and all((work / "by-address" / a / "app" / "current").exists() for a in addresses)
        lines.append(f"every target switched: {switched}")
        pssh, serial = medians["parallel-scp + parallel-ssh"], medians["serial Fabric loop"]
        lines.append(
            f"goals: faster than pssh: {'met' if base.wall < pssh.wall else 'MISSED'} "
            f"({pssh.wall / base.wall:.2f}x); at least 2x faster than serial: "
            f"{'met' if serial.wall >= 2 * base.wall else 'MISSED'} ({serial.wall / base.wall:.2f}x)"
        )
    return lines


def _switch_script(root_expression: str, release: str, requirements: str, tarball: str) -> str:
    """Unpack into a temporary directory, rename it into releases/, then `ln -s` + `mv -T`."""
    return " && ".join(
        [
            f"root={root_expression}",
            f'rel="$root/releases/{release}"',
            'mkdir -p "$rel.tmp"',
            f'tar -xzf {shlex.quote(tarball)} -C "$rel.tmp"',
            f'ln -s ../../shared/venvs/{requirements} "$rel.tmp/venv"',
            'mv "$rel.tmp" "$rel"',
            'ln -s "$rel" "$root/.current.tmp"',
            'mv -T "$root/.current.tmp" "$root/current"',
        ]
    )


def _pssh(work: Path, hosts_file: Path, options: list[str], tarball: Path, release: str, requirements: str) -> Run:
    remote_tarball = f"/tmp/igops-bench-{release}.tgz"
    upload = run(
        [
            "parallel-scp",
            "-h",
            str(hosts_file),
            "-p",
            str(PARALLEL),
            "-t",
            "120",
            "-x",
            " ".join(options),
            str(tarball),
            remote_tarball,
        ]
    )
    # One command for every host: each finds its own root from the address it was reached at.
    root = shlex.quote(str(work / "by-address")) + '/"$(echo "$SSH_CONNECTION" | cut -d" " -f3)"/app'
    script = _switch_script(root, release, requirements, remote_tarball)
    switch = run(
        ["parallel-ssh", "-h", str(hosts_file), "-p", str(PARALLEL), "-t", "120", "-x", " ".join(options), script]
    )
    return Run(upload.wall + switch.wall, upload.cpu + switch.cpu, max(upload.returncode, switch.returncode))


def fabric_serial(spec_file: str) -> int:
    """The classic deploy loop: one host after the other, put the tarball, run the switch."""
    from fabric import Connection
    from paramiko import RejectPolicy

    spec = json.loads(Path(spec_file).read_text())
    for address in spec["hosts"]:
        connection = Connection(
            address,
            user="root",
            port=spec["port"],
            connect_kwargs={"key_filename": [spec["key"]], "look_for_keys": False, "allow_agent": False},
        )
        connection.client.set_missing_host_key_policy(RejectPolicy())
        connection.client.load_host_keys(spec["known_hosts"])
        with connection:
            remote_tarball = f"/tmp/igops-bench-{spec['release']}-{address}.tgz"
            connection.put(spec["tarball"], remote=remote_tarball)
            script = _switch_script(
                shlex.quote(spec["roots"][address]), spec["release"], spec["requirements"], remote_tarball
            )
            connection.run(f"{script} && rm -f {shlex.quote(remote_tarball)}", hide=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--part", choices=["lab", "fleet", "both"], default="both")
    parser.add_argument("--fabric-serial", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fabric_serial:
        sys.exit(fabric_serial(args.fabric_serial))
    work = Path(tempfile.mkdtemp(prefix="igops-bench-deploy-"))
    try:
        print(f"deploy benchmark, {time.strftime('%Y-%m-%d %H:%M')} (2 cores shared with the targets)")
        if args.part in ("lab", "both"):
            for line in lab_part(work, args.repeats):
                print(line, flush=True)
        if args.part in ("fleet", "both"):
            for line in fleet_part(work, args.targets, args.repeats):
                print(line, flush=True)
    finally:
        clean_up(work)


def clean_up(work: Path) -> None:
    """The bench's working directory and the release tarballs igops left in /tmp."""
    shutil.rmtree(work, ignore_errors=True)
    for leftover in Path("/tmp").glob("igops-bench-*.tgz"):
        leftover.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
