"""The operation engine's own cost: per operation (lease, record, begin and end entries, two audit
records) and per step (lease check, and one write: its intent entry, the record's current step and
the result of the step before it), on the local backend against the lab's three-member etcd, in
one run. The baseline is the same empty steps run with no engine at all. Goal: under 20 ms a step with etcd on loopback.

Then (unless --no-stall) `pg switchover`'s write stall under the app's load, with the lab's
inventory (etcd) against the same inventory without its [coordination] section (local), in
bench/failover.py's way, six switchovers each. Goal: etcd no worse than 1.1x local, on the
median switchover.

Then (unless --no-quorum) what a reading command costs with etcd's quorum lost (two of the three
members SIGKILLed, then started again): `igops ops list --all` from a machine that never read the
list (a fresh state directory, so no cache), against `etcdctl get --prefix` on the same prefix,
linearizable (its default) and serializable. Goal: the fleet's operations shown within 3 s
(a read first waits one election, 2 s, for a leader).

`--only engine|quorum|stall` runs one part. Needs the lab (`make lab`); writes under its own
prefix in etcd and deletes it afterwards."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OPERATIONS = 15
STEPS = 10
# Six switchovers per backend: enough for a median that the machine's noise does not decide.
STALL_ROUND_TRIPS = 3


def _fleet(directory: Path, etcd: bool, prefix: str):
    from igops import inventory
    from igops.lab import state

    text = f'[fleet]\nname = "bench"\nstate_dir = "{directory / "state"}"\n'
    if etcd:
        endpoints = ", ".join(f'"{url}"' for url in state.etcd_endpoints())
        text += f'[coordination]\netcd = [{endpoints}]\nprefix = "{prefix}"\n'
    text += '[[hosts]]\nname = "app1"\naddress = "127.0.99.1"\nroles = ["app"]\n'
    path = directory / ("etcd.toml" if etcd else "local.toml")
    path.write_text(text)
    return inventory.load_file(path)


def _time_operations(fleet, steps: int) -> list[float]:
    from igops.operations import conflicts, engine
    from igops.output import Reporter

    def action(operation):
        for number in range(steps):
            with operation.reporter.step(f"step {number}"):
                pass

    spec = engine.OperationSpec(
        "pagerduty-test", "bench", ["bench"], [conflicts.PAGERDUTY], [f"step {n}" for n in range(steps)]
    )
    timings = []
    for _ in range(OPERATIONS):
        started = time.perf_counter()
        engine.perform(fleet, spec, action, Reporter())
        timings.append(time.perf_counter() - started)
    return timings


def _bare(steps: int) -> list[float]:
    from igops.output import Reporter

    reporter, timings = Reporter(), []
    for _ in range(OPERATIONS):
        started = time.perf_counter()
        for number in range(steps):
            with reporter.step(f"step {number}"):
                pass
        timings.append(time.perf_counter() - started)
    return timings


def _cleanup(prefix: str) -> None:
    import requests

    from igops import etcd_gateway
    from igops.lab import state

    body = {"key": etcd_gateway.b64(prefix), "range_end": etcd_gateway.b64(etcd_gateway.prefix_end(prefix))}
    requests.post(state.etcd_endpoints()[0] + "/v3/kv/deleterange", json=body, timeout=5).raise_for_status()


def main() -> None:
    prefix = f"/igops-bench/{uuid.uuid4().hex[:8]}/"
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        try:
            for name, etcd in (("local", False), ("etcd", True)):
                fleet = _fleet(Path(directory), etcd, prefix)
                empty = statistics.median(_time_operations(fleet, 0))
                full = statistics.median(_time_operations(fleet, STEPS))
                rows.append((name, empty, (full - empty) / STEPS))
        finally:
            _cleanup(prefix)
    bare = statistics.median(_bare(STEPS)) / STEPS
    print(f"operations: median of {OPERATIONS} operations, {STEPS} empty steps each")
    print(f"  no engine          per step {bare * 1000:7.2f} ms")
    for name, per_op, per_step in rows:
        print(f"  engine, {name:<6}     per step {per_step * 1000:7.2f} ms   per operation {per_op * 1000:7.1f} ms")
    etcd_step = rows[1][2]
    print(
        f"  etcd/local per step {etcd_step / rows[0][2]:.1f}x; goal < 20 ms a step with etcd: "
        f"{'met' if etcd_step < 0.020 else 'NOT met'}"
    )


def stall() -> None:
    """`pg switchover` round trips under load on each backend: each switchover's stall of the
    writes that need cluster main (bench/failover.py measures it the same way). The goal is
    judged on the median switchover, since the longest of a few is mostly the machine's noise;
    both are printed."""
    import fcntl
    import os

    from bench.failover import LOCK, igops_pg, main_shards, restore, touches_main, under_load
    from igops import inventory
    from igops.lab import aws, state
    from tests.labtools import without_coordination

    os.environ.update(aws.AWS_ENV)
    lab = inventory.load_file(state.paths().inventory)
    # Beside the lab's own, so that its relative paths (secrets, keys) mean the same files.
    local_path = lab.source.with_name("igops-bench-local.toml")
    local_path.write_text(without_coordination(lab.source.read_text()))
    trips = ["db2", "db1"] * STALL_ROUND_TRIPS
    work = Path(tempfile.mkdtemp(prefix="igops-bench-operations-"))
    try:
        local = inventory.load_file(local_path)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            restore(lab)
            shards = main_shards(lab)
            outcomes = []
            for name, fleet in (("etcd", lab), ("local", local)):
                outcomes.append(under_load(fleet, work, name, igops_pg(fleet), trips, touches_main(shards)))
                restore(lab)
    finally:
        local_path.unlink()
    print(f"pg switchover under load: {len(trips)} switchovers per backend")
    for outcome in outcomes:
        stalls = " ".join(f"{stall:.2f}" for stall in outcome.stalls_s)
        print(
            f"  {outcome.method:<6} write stall per switchover: median {statistics.median(outcome.stalls_s):.2f} s, "
            f"longest {max(outcome.stalls_s):.2f} s ({stalls}); failed {outcome.failed_switchovers}, "
            f"client errors {outcome.errors}, lost writes {outcome.lost}, {outcome.writes_per_s:.0f} writes/s"
        )
    etcd, local = outcomes
    median = statistics.median(etcd.stalls_s) / max(statistics.median(local.stalls_s), 0.001)
    longest = max(etcd.stalls_s) / max(max(local.stalls_s), 0.001)
    print(
        f"  etcd/local stall: median {median:.2f}x, longest {longest:.2f}x; goal <= 1.1x (median): "
        f"{'met' if median <= 1.1 else 'NOT met'}"
    )


def quorum_lost() -> None:
    """Reads with two of the three etcd members down: igops' list against etcdctl's two reads."""
    import json
    import os
    import signal
    import subprocess

    from igops import coordination, inventory
    from igops.lab import etcd as lab_etcd, proc, state

    paths = state.paths()
    lab = inventory.load_file(paths.inventory)
    prefix = coordination.for_fleet(lab).settings.prefix
    done = subprocess.run(["igops", "-c", str(lab.source), "pagerduty", "test", "--yes"], capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]  # at least one operation to list
    endpoints = ",".join(state.etcd_endpoints())
    etcdctl = ["etcdctl", f"--endpoints={endpoints}", "get", "--prefix", f"{prefix}ops/", "--keys-only"]
    runs = {
        "igops ops list --all": ["igops", "-c", str(lab.source), "ops", "list", "--all", "--json"],
        "etcdctl get (linearizable)": etcdctl,
        "etcdctl get --consistency=s": [*etcdctl, "--consistency=s"],
    }
    stopped = [name for name, _ in state.ETCD_MEMBERS[1:]]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "ETCDCTL_API": "3", "IGOPS_STATE_DIR": directory, "NO_COLOR": "1"}
        proc.terminate(
            [proc.running_pid(paths.etcd_dir(name) / "etcd.pid", paths.root) for name in stopped], signal.SIGKILL
        )
        try:
            time.sleep(3)  # the member left has noticed it is alone
            for name, argv in runs.items():
                walls, answer = [], None
                for _ in range(5):
                    started = time.perf_counter()
                    answer = subprocess.run(argv, capture_output=True, text=True, env=env)
                    walls.append(time.perf_counter() - started)
                if name.startswith("igops"):
                    view = json.loads(answer.stdout)["data"]
                    shown = f"{len(view['records'])} operations, read from {view['read_from']}"
                else:
                    keys = [line for line in answer.stdout.splitlines() if line.strip()]
                    failed = (answer.stderr.strip().splitlines() or ["no output"])[-1]
                    shown = f"{len(keys)} operations" if answer.returncode == 0 else failed
                rows.append((name, statistics.median(walls), answer.returncode, shown))
        finally:
            for name in stopped:
                proc.start(lab_etcd.daemon(paths, name), paths.root)
            lab_etcd.wait_healthy()
    print("reads with etcd's quorum lost (2 of 3 members killed), from a machine with no cache; median of 5")
    for name, wall, code, shown in rows:
        print(f"  {name:<28} {wall:6.2f} s  exit {code}  {shown}")
    igops_wall = rows[0][1]
    print(
        f"  etcdctl linearizable / igops: {rows[1][1] / igops_wall:.1f}x; goal: the operations shown within 3 s: "
        f"{'met' if igops_wall <= 3 and rows[0][2] == 0 else 'NOT met'}"
    )


if __name__ == "__main__":
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    if only in (None, "engine"):
        main()
    if only in (None, "quorum") and "--no-quorum" not in sys.argv:
        quorum_lost()
    if only in (None, "stall") and "--no-stall" not in sys.argv:
        stall()
