"""The operation engine's own cost: per operation (lease, record, begin and end entries, two audit
records) and per step (lease check, intent and result entries, the record's current step), on the
local backend against the lab's three-member etcd, in one run. The baseline is the same empty
steps run with no engine at all. Goal: under 20 ms a step with etcd on loopback.

Needs the lab's etcd (`make lab`); writes under its own prefix and deletes it afterwards."""

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

    spec = engine.OperationSpec("pagerduty-test", "bench", ["bench"], [conflicts.PAGERDUTY],
                                [f"step {n}" for n in range(steps)])
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

    from igops import coordination
    from igops.lab import state

    body = {"key": coordination._b64(prefix), "range_end": coordination._b64(coordination._prefix_end(prefix))}
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
    print(f"  etcd/local per step {etcd_step / rows[0][2]:.1f}x; goal < 20 ms a step with etcd: "
          f"{'met' if etcd_step < 0.020 else 'NOT met'}")


if __name__ == "__main__":
    main()
