"""`igops deploy` of a bad release, judged by its canary against the /health gate alone.

    .venv/bin/python bench/deploy_bad_release.py [--repeats 3] [--bad-kinds errors,latency]
        [--canaries even,shared] [--canary-traffic 10]

The lab up, as root; a run of a kind takes about a minute and a half per canary run and as long
again for the /health-gated deploy. Two releases that pass /health, as
tests/reliability/test_canary.py makes them: a copy of app/ whose GET /api/photos/<id> answers 500
to 5% of requests (`errors`), or sleeps 150 ms before answering (`latency`). In each run each is
deployed two or three times (`--canaries`), with `--batch 1`, while app.loadgen runs
through the lab's nginx as the canary tests' ReadLoad does (110 requests/s, 20% writes, 30 users,
32 in flight, seed 11; a new load run per deploy, its timed phase 10 s old when the deploy starts):
 (a) with canary analysis (`even`): `igops deploy --source BAD --batch 1 --analysis 40 --yes
     --json`, the canary on its even share of the traffic (one server of three);
 (a') (`shared`) the same with `--analysis 60` and an inventory whose [deploy.canary] traffic_percent is
     `--canary-traffic` (10): the canary takes at most that share while watched (docs/deploy.md);
 (b) gated on /health alone: the same with `--analysis 0`, which ships it to every host; the fleet
     is then put back on the working tree's app/ (`igops deploy --analysis 0 --yes`, as the tests'
     fixtures do) before the next deploy, and at the start and end.
The figures, each from one deploy:
- window: (a) from just before igops starts to its exit: by then the canary is back on its old
  release, gated and in the load balancer. (b) from just before igops starts to the moment the
  bad release has been on every host (igops exited 0: every host switched, gated and back in
  nginx) for as long as (a)'s whole window lasted: the bad release serves from every host for
  (a)'s time, on top of its own rollout. (b) runs once, as long as the longer of (a) and (a'),
  and is counted again over each one's length.
- failed: lines of the lab's nginx access log (`[lb] access_log`) with ts= ($msec, when the
  request ended) in the window and a status the client got of 5xx, or 499 (the client gave up);
  any endpoint (`on it`: those on GET /api/photos/:id). A request nginx retried past a server's
  502 and another server answered is not failed. The load generator's ledger has acknowledged
  writes only and its report counts over its whole run, so the window's count comes from nginx;
  the report's errors_by_kind for its whole run is printed beside it as a cross-check.
- slowed: the same lines for GET /api/photos/:id with rt= ($request_time) over 100 ms, out of
  that endpoint's requests in the window. The 10 s before each deploy give the same two counts
  with no bad release anywhere, for scale.
- hosts: the app hosts whose `current` link pointed at the bad release at some moment in the
  window, read every 0.1 s (with the seconds each spent on it); the deploy's --json host states
  (deployed, or rolled back: switched to it and back) are printed beside it.
- time to detection: (a), (a') from the journal of the deploy's operation, the time of the `canary`
  fact (written as soon as the verdict is reached) minus that of the result of the step that put
  the canary back in the load balancer; (b) never detected.
- ratios: (b) over (a), and over (a'), for failed and slowed requests, per run and over the sums
  of all runs; the goal, at least 10x on the sums, on failed requests for `errors` and on slowed
  requests for `latency` (a canary's failures are a few rare events: one run's ratio scatters);
  the canary's hosts at most one batch (one).
  Beside them, (b) over (a) for host-seconds on the bad release (the seconds of each host's
  `current` on it, summed): the harm follows it. With the lab's three app servers and a canary
  of one, the canary takes a third of the traffic for about the analysis window, and (b) gives
  all three (a)'s whole window: about 3 x (a)'s window over the canary's time in rotation, near
  4x by that arithmetic. 10x takes a fleet of ten or more behind a canary of one, or (a') a
  canary held to a tenth of the traffic: 1/11 of it for a window half as long again, near 11x.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.deploy import LAB_LOCK, clean_up, igops_argv, release_source  # noqa: E402

# What tests/reliability/test_canary.py deploys: a release whose /health stays 200 while one read
# endpoint fails now and then, or is slowed down.
BAD_ENDPOINT = "GET /api/photos/:id"
PHOTO_DETAIL = '    return JsonResponse(current.service.get_photo(parse_id(photo_ref, "photo id")))\n'
BAD_KINDS = {
    "errors": (
        "5% of GET /api/photos/<id> answer 500",
        "    import random\n\n    if random.random() < 0.05:\n"
        '        return JsonResponse({"error": "injected by the deploy bench"}, status=500)\n',
    ),
    "latency": ("GET /api/photos/<id> sleeps 150 ms", "    import time\n\n    time.sleep(0.15)\n"),
}
# Long enough that the error-rate release is caught nearly every time (tests/reliability/
# test_canary.py's ERRORS_WINDOW says why): in 20 s the canary's few errors were too few one run
# in eight. With a tenth of the traffic the canary sees a third as many errors, though each
# weighs more against the larger baseline (three are enough): 60 s gives a mean of about eight.
ANALYSIS_S = 40
SHARED_ANALYSIS_S = 60
SLOW_S = 0.100
# The canary tests' ReadLoad: mostly reads, enough of them for the analysis to judge in 20 s.
LOAD_RATE, LOAD_WRITE_RATIO, LOAD_USERS, LOAD_CONCURRENCY, LOAD_SEED = 110, 0.2, 30, 32, 11
# Seconds of load between its timed phase beginning and the deploy: photos to read exist by then.
LEAD_S = 10.0
RATIO_GOAL = 10.0
DEPLOY_TIMEOUT_S = 600


def bad_source(work: Path, kind: str, run: int) -> Path:
    """A new release of app/ whose GET /api/photos/<id> goes wrong the way `kind` says."""
    source = release_source(work, f"bad-{kind}-{run}")
    views = source / "views.py"
    text = views.read_text()
    if PHOTO_DETAIL not in text:
        raise SystemExit(f"app/views.py no longer has the photo view's return line: {PHOTO_DETAIL.strip()}")
    views.write_text(text.replace(PHOTO_DETAIL, BAD_KINDS[kind][1] + PHOTO_DETAIL))
    return source


class LbLoad:
    """app.loadgen in its own process through the lab's nginx, as the canary tests run it:
    entering waits for its timed phase; stop() ends it (SIGINT) and returns its --json report."""

    def __init__(self, url: str, ledger: Path):
        self.ledger = ledger
        self.argv = [
            sys.executable,
            "-m",
            "app.loadgen",
            "run",
            "--url",
            url,
            "--rate",
            str(LOAD_RATE),
            "--duration",
            "900",
            "--write-ratio",
            str(LOAD_WRITE_RATIO),
            "--users",
            str(LOAD_USERS),
            "--concurrency",
            str(LOAD_CONCURRENCY),
            "--seed",
            str(LOAD_SEED),
            "--ledger",
            str(ledger),
            "--json",
        ]
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LbLoad:
        self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.ledger.exists() and any(f'"op":"{op}"' in self.ledger.read_text() for op in ("post", "like")):
                return self
            time.sleep(0.2)
        self.process.kill()
        raise SystemExit(f"the load's timed phase never began: {self.process.communicate()[1][-1000:]}")

    def stop(self) -> dict:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            output, _ = self.process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            return {}
        try:
            return json.loads(output) if output.strip() else {}
        except ValueError:
            return {}

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # never left loading the lab
            self.process.communicate()


@dataclass
class Logged:
    """One request as the load balancer logged it: when it ended ($msec), the status the client
    got, nginx's time for the whole request ($request_time) and the endpoint."""

    ts: float
    status: int
    rt: float
    endpoint: str


class AccessLog:
    """The lines nginx appends to the lab's access log from the moment this is made."""

    def __init__(self, path: Path):
        self.path = path
        stat = path.stat()
        self.inode, self.offset = stat.st_ino, stat.st_size

    def read(self) -> tuple[list[Logged], list[str]]:
        from igops import deploy_accesslog

        notes = []
        stat = self.path.stat()
        offset = self.offset
        if stat.st_ino != self.inode or stat.st_size < offset:
            notes.append(f"{self.path} was rotated or truncated during the run: read from its new start")
            offset = 0
        with open(self.path, "rb") as log:
            log.seek(offset)
            data = log.read()
        found, unparsed = [], 0
        for line in deploy_accesslog.complete_lines(data):
            match = deploy_accesslog.LINE.match(line.rstrip("\r"))
            endpoint = deploy_accesslog.endpoint_of(match.group("request")) if match else None
            fields = dict(deploy_accesslog.FIELD.findall(match.group("fields").strip())) if match else {}
            try:
                found.append(Logged(float(fields["ts"]), int(match.group("status")), float(fields["rt"]), endpoint))
            except (AttributeError, KeyError, TypeError, ValueError):
                unparsed += bool(line.strip())
        if unparsed:
            notes.append(f"{unparsed} access-log lines without ts= and rt= were left out")
        return found, notes


def current_release(root: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(root / "current"))
    except OSError:
        return None


def releases_now(roots: dict[str, Path]) -> dict[str, str | None]:
    return {host: current_release(root) for host, root in roots.items()}


class CurrentWatch:
    """Each app host's `current` link, read every 0.1 s while the watch runs: the release each
    pointed at, from when."""

    EVERY = 0.1

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots
        self.changes: dict[str, list[tuple[float, str | None]]] = {host: [] for host in roots}
        self.stopped: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            moment = time.time()
            for host, changes in self.changes.items():
                release = current_release(self.roots[host])
                if not changes or changes[-1][1] != release:
                    changes.append((moment, release))
            if self._stop.wait(self.EVERY):
                return

    def __enter__(self) -> CurrentWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.stopped = time.time()

    def seconds_on(self, release: str, start: float, end: float) -> dict[str, float]:
        """Per host that pointed at `release` at some moment in [start, end]: for how long in it."""
        found = {}
        for host, changes in self.changes.items():
            ends = [moment for moment, _ in changes[1:]] + [self.stopped or time.time()]
            spans = [
                (max(moment, start), min(until, end))
                for (moment, pointed), until in zip(changes, ends, strict=True)
                if pointed == release and moment <= end and until >= start
            ]
            if spans:
                found[host] = sum(max(0.0, b - a) for a, b in spans)
        return found


@dataclass
class Deployed:
    argv: list[str]
    pid: int
    started: float
    ended: float
    returncode: int
    envelope: dict
    stderr_tail: str


def igops_deploy(inventory: Path, *args: str) -> Deployed:
    argv = [*igops_argv(), "-c", str(inventory), "deploy", *args]
    started = time.time()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        output, errors = process.communicate(timeout=DEPLOY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, errors = process.communicate()
    ended = time.time()
    try:
        envelope = json.loads(output) if output.strip() else {}
    except ValueError:
        envelope = {}
    return Deployed(argv, process.pid, started, ended, process.returncode, envelope, errors.strip()[-400:])


def _iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def detection_from_journal(fleet, deployed: Deployed) -> float | None:
    """Seconds from the canary back in the load balancer to the analysis' verdict, from the
    deploy's journal: the time of the result entry of the step that put the canary back, and of
    the `canary` fact, journaled as soon as the verdict is reached. None if not found."""
    from igops import operations_view

    view = operations_view.list_operations(fleet, include_ended=True)
    mine = [
        record
        for record in view.records
        if record.get("kind") == "deploy"
        and record.get("pid") == deployed.pid
        and _iso_seconds(record.get("started") or "1970-01-01T00:00:00+00:00") >= deployed.started - 5
    ]
    if not mine:
        return None
    _, entries = operations_view.show(fleet, mine[-1]["id"])
    back = None
    for entry in entries:
        title = entry.get("title") or ""
        # "put app1 back in the load balancer", with ": the canary takes at most …" on a share
        if entry.get("event") == "result" and title.startswith("put ") and " back in the load balancer" in title:
            back = _iso_seconds(entry["time"])
        if entry.get("event") == "fact" and "canary" in entry:
            return None if back is None else _iso_seconds(entry["time"]) - back
    return None


@dataclass
class Case:
    kind: str
    gate: str
    deployed: Deployed
    window: tuple[float, float]
    failed: int = 0
    failed_on_endpoint: int = 0
    slowed: int = 0
    endpoint_requests: int = 0
    lead: str = ""
    hosts: dict[str, float] = field(default_factory=dict)  # host -> seconds on the bad release
    json_hosts: list[str] = field(default_factory=list)
    detection: str = "never detected"
    notes: list[str] = field(default_factory=list)
    load_errors: dict[str, int] = field(default_factory=dict)
    # What a shorter window of the same run (within) is counted from.
    logged: list[Logged] = field(default_factory=list, repr=False)
    lead_start: float = 0.0
    watch: CurrentWatch | None = field(default=None, repr=False)
    release: str | None = None


def within(case: Case, end: float) -> Case:
    """The same run counted over a window that ends at `end` (the /health-gated run, measured
    against a canary run of its own length)."""
    cut = dataclasses.replace(case, window=(case.window[0], end), notes=list(case.notes))
    _count(cut, cut.logged, cut.lead_start)
    if cut.watch is not None and cut.release:
        cut.hosts = cut.watch.seconds_on(cut.release, *cut.window)
    return cut


def _count(case: Case, logged: list[Logged], lead_start: float) -> None:
    """Fill in the case's figures from what the load balancer logged (see the module's rules)."""
    start, end = case.window
    inside = [item for item in logged if start <= item.ts <= end]
    failed = [item for item in inside if item.status >= 500 or item.status == 499]
    on_endpoint = [item for item in inside if item.endpoint == BAD_ENDPOINT]
    case.failed = len(failed)
    case.failed_on_endpoint = sum(item.endpoint == BAD_ENDPOINT for item in failed)
    case.endpoint_requests = len(on_endpoint)
    case.slowed = sum(item.rt > SLOW_S for item in on_endpoint)
    before = [item for item in logged if lead_start <= item.ts < start]
    before_endpoint = [item for item in before if item.endpoint == BAD_ENDPOINT]
    case.lead = (
        f"in the {start - lead_start:.0f} s before the deploy: {len(before)} requests, "
        f"{sum(item.status >= 500 or item.status == 499 for item in before)} failed, "
        f"{sum(item.rt > SLOW_S for item in before_endpoint)} of {len(before_endpoint)} to the endpoint slowed"
    )


def _json_hosts(envelope: dict) -> list[str]:
    """Hosts the deploy's --json result says were switched to its release: deployed, or rolled
    back from it (a canary returned)."""
    data = envelope.get("data") or {}
    return sorted(
        host["host"]
        for host in data.get("hosts") or []
        if isinstance(host, dict) and host.get("state") in ("deployed", "already", "rolled back")
    )


def _canary_summary(envelope: dict) -> tuple[str | None, float | None]:
    canary = (envelope.get("data") or {}).get("canary") or {}
    return canary.get("verdict"), canary.get("window_s")


def restore_working_tree(inventory: Path) -> Deployed:
    """The fleet back on a release of the working tree's app/, as the tests' fixtures leave it."""
    return igops_deploy(inventory, "--analysis", "0", "--yes")


def bad_release_case(
    work: Path,
    fleet,
    inventory: Path,
    kind: str,
    source: Path,
    roots: dict[str, Path],
    analysis_s: int,
    a_window: float,
    gate: str,
) -> Case:
    """One deploy of the bad release under load: with a canary analysis of `analysis_s` seconds,
    or (0) gated on /health alone, its window then running `a_window` seconds past its end."""
    lb = fleet.with_role("lb")[0]
    log = AccessLog(Path(fleet.path_for(fleet.model.lb.access_log, lb)))
    canary = analysis_s > 0
    label = f"canary-{inventory.stem}" if canary else "health"
    with (
        LbLoad(f"http://{lb.address}:{fleet.model.lb.port}", work / f"ledger-{kind}-{label}.jsonl") as load,
        CurrentWatch(roots) as watch,
    ):
        lead_start = time.time()
        time.sleep(LEAD_S)
        before = releases_now(roots)
        deployed = igops_deploy(
            inventory,
            "--source",
            str(source),
            "--batch",
            "1",
            "--analysis",
            str(analysis_s),
            "--yes",
            "--json",
        )
        if canary:
            end = deployed.ended
        else:
            end = deployed.ended + a_window
            time.sleep(max(0.0, end - time.time()))
        report = load.stop()
    case = Case(kind, gate, deployed, (deployed.started, end), lead_start=lead_start, watch=watch)
    case.logged, case.notes = log.read()
    _count(case, case.logged, lead_start)
    case.load_errors = dict(report.get("errors_by_kind") or {})
    if not report:
        case.notes.append("the load generator gave no report")
    release = (deployed.envelope.get("data") or {}).get("target")
    if not release:
        # No result: whatever release a host pointed at that it did not before the deploy.
        seen = {pointed for changes in watch.changes.values() for _, pointed in changes}
        others = seen - set(before.values()) - {None}
        release = others.pop() if len(others) == 1 else None
        case.notes.append(f"no --json result (exit {deployed.returncode}): {deployed.stderr_tail[-200:]}")
    case.release = release
    case.hosts = watch.seconds_on(release, *case.window) if release else {}
    case.json_hosts = _json_hosts(deployed.envelope)
    verdict, window_s = _canary_summary(deployed.envelope)
    if canary:
        if verdict != "fail":
            case.detection = f"not detected (verdict {verdict or 'none'}, exit {deployed.returncode})"
        else:
            try:
                seconds = detection_from_journal(fleet, deployed)
            except Exception as exc:  # noqa: BLE001 - the journal is a figure's source, not the bench's point
                seconds = None
                case.notes.append(f"the journal could not be read: {type(exc).__name__}: {exc}")
            if seconds is not None:
                case.detection = f"{seconds:.1f} s"
            elif window_s is not None:
                case.detection = f"~{window_s:.1f} s (the analysis window; no journal timing)"
            else:
                case.detection = "detected (no timing)"
        case.notes.append(f"exit {deployed.returncode}, canary verdict {verdict or 'none'}")
    else:
        if deployed.returncode != 0:
            case.detection = f"deploy exit {deployed.returncode}"
            case.notes.append(f"the /health-gated deploy did not finish: {deployed.stderr_tail[-200:]}")
    return case


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "MISSED"


def _ratio(numerator: float, denominator: float) -> tuple[str, bool | None]:
    if denominator == 0:
        return ("n/a (both 0)", None) if numerator == 0 else ("inf (canary 0)", True)
    ratio = numerator / denominator
    return f"{ratio:.1f}x", ratio >= RATIO_GOAL


CANARY_RUNS = ("even", "shared")


def bad_release_part(work: Path, kinds: list[str], share: int, repeats: int, canary_runs: list[str]) -> list[str]:
    from igops import inventory as inventory_module
    from igops.lab import state

    inventory = state.paths().inventory
    fleet = inventory_module.load_file(inventory)
    # The same fleet, its canary given at most `share` % of the traffic while watched.
    shared_inventory = work / "shared.toml"
    shared_inventory.write_text(inventory.read_text() + f"\n[deploy.canary]\ntraffic_percent = {share}\n")
    roots = {host.name: Path(fleet.path_for(fleet.model.app.root, host)) for host in fleet.with_role("app")}
    canaries = [
        (config, seconds, gate)
        for name, config, seconds, gate in (
            ("even", inventory, ANALYSIS_S, f"canary {ANALYSIS_S} s, even"),
            ("shared", shared_inventory, SHARED_ANALYSIS_S, f"canary {SHARED_ANALYSIS_S} s, {share}%"),
        )
        if name in canary_runs
    ]
    lines = [
        f"bad release: each run deploys the same release under app.loadgen through nginx ({LOAD_RATE} req/s, "
        f"{LOAD_WRITE_RATIO:.0%} writes), --batch 1, with each canary analysis "
        f"({', '.join(gate for _, _, gate in canaries)}; "
        f"a share is [deploy.canary] traffic_percent) and gated on /health alone (--analysis 0), whose window runs "
        f"past its deploy as long as each canary run's whole window (one deploy, counted over each length); "
        f"{repeats} runs, the goal judged on their sums",
        f"  failed: answered 5xx (or 499, the client gave up) at nginx in the window, on any endpoint (on it: on "
        f"{BAD_ENDPOINT}); slowed: requests to it over {SLOW_S * 1000:.0f} ms (of its requests); hosts: ever on "
        "the bad release in the window",
        f"{'run':>3} {'release':<8} {'gate':<22} {'window s':>8} {'failed':>7} {'on it':>8} {'slowed':>7} "
        f"{'of reqs':>9} {'hosts':>7} time to detection",
    ]
    cases: list[tuple[int, Case, Case]] = []  # (run, canary, /health only over the canary's length)
    with open(LAB_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            start = restore_working_tree(inventory)
            if start.returncode != 0:
                raise SystemExit(f"the fleet could not be put on the working tree's release: {start.stderr_tail}")
            for run in range(1, repeats + 1):
                for kind in kinds:
                    cases += [
                        (run, *pair) for pair in _bad_release_run(work, fleet, inventory, kind, run, roots, canaries)
                    ]
        finally:
            restore = restore_working_tree(inventory)
            if restore.returncode != 0:
                print(f"restoring the working tree's release failed: {restore.stderr_tail[-300:]}", file=sys.stderr)
    total = len(roots)
    for run, *pair in cases:
        for case in pair:
            begin, end = case.window
            lines.append(
                f"{run:>3} {case.kind:<8} {case.gate:<22} {end - begin:>8.1f} {case.failed:>7} "
                f"{case.failed_on_endpoint:>8} {case.slowed:>7} {case.endpoint_requests:>9} "
                f"{len(case.hosts):>3}/{total:<3} {case.detection}"
            )
    lines += _ratios(cases)
    for run, *pair in cases:
        for case in pair:
            on_bad = ", ".join(f"{host} {seconds:.1f} s" for host, seconds in sorted(case.hosts.items())) or "none"
            lines.append(f"  run {run}, {case.kind}, {case.gate}: {case.lead}")
            lines.append(
                f"    on the bad release (`current`): {on_bad}; switched to it (--json): "
                f"{', '.join(case.json_hosts) or 'none'}; the load generator's errors over its whole run: "
                f"{case.load_errors or 'none'}"
            )
            lines += [f"    note: {note}" for note in case.notes]
    return lines


def _bad_release_run(
    work: Path,
    fleet,
    inventory: Path,
    kind: str,
    run: int,
    roots: dict[str, Path],
    canaries: list[tuple[Path, int, str]],
) -> list[tuple[Case, Case]]:
    """One run of a kind: each canary deploy, then the /health-gated one, the fleet put back
    after it; each canary paired with the gated run counted over the canary's length."""
    source = bad_source(work, kind, run)
    runs = []
    for config, seconds, gate in canaries:
        print(f"bad release ({kind}): {gate} …", file=sys.stderr, flush=True)
        canary = bad_release_case(work, fleet, config, kind, source, roots, seconds, 0.0, gate)
        bad_id = (canary.deployed.envelope.get("data") or {}).get("target")
        if bad_id and bad_id in releases_now(roots).values():
            canary.notes.append("the canary did not stop the release: the fleet was restored after it")
            if restore_working_tree(inventory).returncode != 0:
                raise SystemExit("the fleet could not be put back on a good release")
        runs.append(canary)
    longest = max(case.window[1] - case.window[0] for case in runs)
    print(f"bad release ({kind}): /health-gated deploy …", file=sys.stderr, flush=True)
    gated = bad_release_case(work, fleet, inventory, kind, source, roots, 0, longest, "/health only")
    back = restore_working_tree(inventory)
    if back.returncode != 0:
        raise SystemExit(f"the fleet could not be put back on a good release: {back.stderr_tail}")
    return [(canary, within(gated, gated.deployed.ended + canary.window[1] - canary.window[0])) for canary in runs]


def _ratios(cases: list[tuple[int, Case, Case]]) -> list[str]:
    """Per run, and for each (kind, canary gate) over all runs: the /health-gated run's harm over
    the canary's. The goal is judged on the sums: a canary's failures are a count of a few rare
    events, whose ratio in a single run scatters around the expected one."""
    lines = []
    pooled: dict[tuple[str, str], list[tuple[Case, Case]]] = {}
    for run, canary, gated in cases:
        pooled.setdefault((canary.kind, canary.gate), []).append((canary, gated))
        failed, _ = _ratio(gated.failed, canary.failed)
        slowed, _ = _ratio(gated.slowed, canary.slowed)
        lines.append(
            f"run {run}, {canary.kind}, /health only over {canary.gate}: failed {failed}, slowed {slowed}; "
            f"hosts that served it: canary {len(canary.hosts)}, /health only {len(gated.hosts)}"
        )
    for (kind, gate), pairs in pooled.items():
        # The goal is on the harm the release does: failures for the errors, slow answers for the latency.
        harm = "failed" if kind == "errors" else "slowed"
        gated_sum = sum(getattr(gated, harm) for _, gated in pairs)
        canary_sum = sum(getattr(canary, harm) for canary, _ in pairs)
        ratio, met = _ratio(gated_sum, canary_sum)
        each = [getattr(gated, harm) / getattr(canary, harm) for canary, gated in pairs if getattr(canary, harm)]
        spread = (
            f"; per run {', '.join(f'{r:.1f}x' for r in each)}, median {statistics.median(each):.1f}x" if each else ""
        )
        most_hosts = max(len(canary.hosts) for canary, _ in pairs)
        exposure = _ratio(sum(sum(g.hosts.values()) for _, g in pairs), sum(sum(c.hosts.values()) for c, _ in pairs))[0]
        lines.append(
            f"{kind} ({BAD_KINDS[kind][0]}), /health only over {gate}, {len(pairs)} runs: {harm} {gated_sum} "
            f"against {canary_sum}, {ratio}{spread}; goal {harm} >= {RATIO_GOAL:g}x: {_verdict(met)}; hosts that "
            f"served it on the canary's runs at most {most_hosts} (goal <= 1, one batch: {_verdict(most_hosts <= 1)}); "
            f"host-seconds on it {exposure}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind; the goal is judged on their sums")
    parser.add_argument("--bad-kinds", default=",".join(BAD_KINDS), help=f"the bad releases: {', '.join(BAD_KINDS)}")
    parser.add_argument(
        "--canaries",
        default=",".join(CANARY_RUNS),
        help="the canary runs: even (its even share of the traffic), shared (--canary-traffic percent)",
    )
    parser.add_argument(
        "--canary-traffic",
        type=int,
        default=10,
        metavar="PERCENT",
        help="the shared canary run's [deploy.canary] traffic_percent",
    )
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.bad_kinds.split(",") if kind.strip()]
    if not kinds or any(kind not in BAD_KINDS for kind in kinds):
        parser.error(f"--bad-kinds: a comma-separated list of {', '.join(BAD_KINDS)}")
    canary_runs = [name.strip() for name in args.canaries.split(",") if name.strip()]
    if not canary_runs or any(name not in CANARY_RUNS for name in canary_runs):
        parser.error(f"--canaries: a comma-separated list of {', '.join(CANARY_RUNS)}")
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    work = Path(tempfile.mkdtemp(prefix="igops-bench-deploy-"))
    try:
        print(f"deploy benchmark, bad release, {time.strftime('%Y-%m-%d %H:%M')} (2 cores)")
        for line in bad_release_part(work, kinds, args.canary_traffic, args.repeats, canary_runs):
            print(line, flush=True)
    finally:
        clean_up(work)


if __name__ == "__main__":
    main()
