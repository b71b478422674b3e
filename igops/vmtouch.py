"""`igops warm`: exact page-cache warming between hosts (the module keeps the name of the tool
it replaces).

Instagram kept its working set in memory because EBS could not serve the seeks, and before a
failover ran `vmtouch -v` on the primary and replayed the bars on the new machine. A bar has
60 characters per file, so that replay read far more (or less) than was hot. Here the host agent
reads each file's residency exactly with mincore(2), the profile keeps it as page runs, and the
target reads exactly those pages back, in parallel and with readahead off, then says how many of
them are resident. A profile names the Postgres cluster it came from and is refused elsewhere.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from igops import agent, remote, remote_session, warm_agent
from igops.agent import pagecache_profile
from igops.errors import RemoteError, UsageError
from igops.output import Reporter, human_bytes, plural
from igops.profile import Profile, Root, from_reader, parse
from igops.warm_paths import (
    allowed_prefixes,
    check_target,
    data_directory,
    postgres_cluster_of,
    source_roots,
    target_paths,
)

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host

DEFAULT_CONCURRENCY = 8
# A warm reads at most the source's page cache, i.e. at most its memory: 244 GiB, the largest
# instance's, at the 128 MiB/s of a 1 TB gp2 volume (bench/RESULTS.md: the warm phase kept such a
# device busy) is 33 minutes. An hour is twice the worst case; a warm slower than that is one to
# look at, not to wait for (it holds the target's lock and loads its disk). A hung warmer is
# caught sooner, by warm_agent.STALL_TIMEOUT. Throttled warms (--rate) that need longer say so:
# --timeout.
DEFAULT_TIMEOUT = 3600.0
RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?(?:/s)?\s*$", re.I)
UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


MATCH_WORDS = {
    "size": "path and size",
    "mtime": "path, size and mtime",
    "path": "path (pages past a shorter file's end are skipped)",
}


@dataclass(frozen=True)
class WarmOptions:
    concurrency: int = DEFAULT_CONCURRENCY
    rate: int | None = None  # bytes a second
    match: str = "size"  # size: path and size must agree; mtime: and mtime; path: path only
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class WarmPlan:
    source: str
    target: str
    roots: list[Root]
    target_paths: list[str]
    options: WarmOptions
    cluster_id: str | None = None
    files: int | None = None  # None until a copy has captured
    pages: int | None = None
    bytes: int | None = None
    profile: str | None = None
    # A restored copy's data directory (`snapshot restore --warm-from`): the target's only
    # Postgres directory and the only place the warming may read, instead of the inventory's.
    copy_directory: str | None = None

    def steps(self) -> list[str]:
        mapping = "; ".join(
            f"{self.source}:{root.path} -> {self.target}:{path}"
            for root, path in zip(self.roots, self.target_paths, strict=False)
        )
        postgres = any(root.base == "postgres" for root in self.roots)
        steps = []
        if self.profile is None:
            steps.append(
                f"on {self.source}: read which pages of every file under "
                f"{', '.join(root.path for root in self.roots)} are in the page cache "
                "(mincore; nothing is read from disk), streaming the profile to "
                f"{self.target} as it is captured"
            )
            cluster = f"{self.source}'s" if postgres else None
        else:
            assert self.files is not None and self.pages is not None  # plan_apply counts a stored profile
            steps.append(
                f"send profile {self.profile} ({plural(self.files, 'file')}, {plural(self.pages, 'page')}, "
                f"{human_bytes(self.bytes)}) to {self.target}"
            )
            cluster = self.cluster_id
        if cluster:
            steps.append(
                f"on {self.target}: refuse, reading nothing, unless its Postgres system identifier is {cluster}"
            )
        speed = f"at most {human_bytes(self.options.rate)}/s" if self.options.rate else "unthrottled"
        how_much = (
            f"the {self.pages} profiled pages ({human_bytes(self.bytes)})"
            if self.pages is not None
            else "exactly the profiled pages"
        )
        steps.append(
            f"on {self.target}: read {how_much} with {plural(self.options.concurrency, 'read')} in flight, "
            f"{speed}, readahead off, giving up after {_duration(self.options.timeout)}; {mapping}"
        )
        steps.append(
            f"skip and count files missing on {self.target} or not matching by {MATCH_WORDS[self.options.match]}"
        )
        steps.append(f"report how many profiled pages are resident on {self.target} afterwards")
        return steps


@dataclass
class WarmResult:
    source: str
    target: str
    files: int
    pages: int
    page_size: int
    warmed_files: int
    warmed_pages: int
    warmed_bytes: int
    skipped_files: int
    skipped_pages: int
    skipped_by_reason: dict[str, int]
    skipped: list[dict[str, Any]]
    read_bytes: int  # fetched from the target's storage, readahead included
    resident_pages: int  # profiled pages resident on the target at the end
    hit_ratio: float  # resident_pages / pages
    read_amplification: float | None  # read_bytes / warmed_bytes
    seconds: float
    concurrency: int

    @classmethod
    def from_summary(cls, source: str, target: str, summary: dict[str, Any]) -> WarmResult:
        return cls(
            source=source,
            target=target,
            files=summary["files"],
            pages=summary["pages"],
            page_size=summary["page_size"],
            warmed_files=summary["warmed_files"],
            warmed_pages=summary["warmed_pages"],
            warmed_bytes=summary["warmed_bytes"],
            skipped_files=summary["skipped_files"],
            skipped_pages=summary["skipped_pages"],
            skipped_by_reason=summary["skipped_by_reason"],
            skipped=summary["skipped"],
            read_bytes=summary["read_bytes"],
            resident_pages=summary["resident_pages"],
            hit_ratio=round(summary["resident_pages"] / summary["pages"], 4) if summary["pages"] else 1.0,
            read_amplification=round(summary["read_bytes"] / summary["warmed_bytes"], 3)
            if summary["warmed_bytes"]
            else None,
            seconds=summary["seconds"],
            concurrency=summary["concurrency"],
        )


@dataclass
class CaptureResult:
    host: str
    roots: list[str]
    cluster_id: str | None
    files: int  # files with resident pages
    pages: int
    resident_bytes: int
    scanned_files: int
    scanned_dirs: int
    scanned_pages: int
    unreadable: int
    page_size: int
    seconds: float
    profile_bytes: int  # the profile's plain text
    output: str
    output_bytes: int  # as written (gzipped when its name ends in .gz)
    bytes_per_gib: float  # profile bytes written per GiB of data scanned
    vmtouch: list[str] | None = None


@dataclass
class FileShare:
    path: str
    source_pages: int
    target_pages: int  # of the source's resident pages, how many are resident on the target
    share: float
    status: str  # ok, missing, size differs, mtime differs, ...


@dataclass
class DiffResult:
    source: str
    target: str
    roots: list[str]
    source_pages: int
    target_pages: int
    share: float
    page_size: int
    files: list[FileShare] = field(default_factory=list)


# --- options ------------------------------------------------------------------------------------
def parse_rate(text: str) -> int:
    """'50M' -> 52428800 bytes a second; suffixes are powers of 1024."""
    match = RATE.match(text)
    if not match:
        raise UsageError(f"bad rate {text!r}", "use bytes a second with an optional K, M, G or T suffix, e.g. 50M")
    value = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if value < 4096:
        raise UsageError(f"rate {text!r} is below one page a second", "use at least 4K")
    return value


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 60:.3g} min" if seconds >= 60 else f"{seconds:g} s"


# --- the warming agent's invocation -------------------------------------------------------------
def _warm_invocation(fleet: Fleet, target: Host, plan: WarmPlan) -> tuple[str, bytes]:
    options = plan.options
    args = ["apply", *plan.target_paths, "--concurrency", str(options.concurrency), "--match", options.match]
    if options.rate:
        args += ["--rate", str(options.rate)]
    pgdata = plan.copy_directory or data_directory(fleet, target)
    if pgdata:
        args += ["--cluster-dir", pgdata]
    for prefix in [plan.copy_directory] if plan.copy_directory else allowed_prefixes(fleet, target):
        args += ["--within", prefix]
    return agent.invocation("pagecache", args)


# --- capture, show ------------------------------------------------------------------------------
def capture(fleet: Fleet, host_name: str, paths: list[str] | None) -> tuple[Profile, bytes, float]:
    """The host's profile, its text, and the seconds the capture took."""
    host = fleet.host(host_name)
    return _capture(fleet, host, source_roots(fleet, host, paths))


def _capture(fleet: Fleet, host: Host, roots: list[Root]) -> tuple[Profile, bytes, float]:
    started = time.monotonic()
    text = warm_agent.run_agent(fleet, host, warm_agent.capture_invocation(fleet, host, roots), "capture").encode()
    return parse(text, f"the profile captured on {host.name}"), text, round(time.monotonic() - started, 3)


def record(
    fleet: Fleet, host_name: str, paths: list[str] | None, output: str, with_vmtouch: bool = False
) -> CaptureResult:
    """Capture and save the profile; optionally the equivalent vmtouch commands too."""
    from igops import profile as profiles

    found, text, seconds = capture(fleet, host_name, paths)
    written = profiles.save(output, text)
    scanned = found.scanned_pages * found.page_size
    return CaptureResult(
        host=found.host,
        roots=[root.path for root in found.roots],
        cluster_id=found.cluster_id,
        files=len(found.files),
        pages=found.pages,
        resident_bytes=found.resident_bytes,
        scanned_files=found.scanned_files,
        scanned_dirs=found.scanned_dirs,
        scanned_pages=found.scanned_pages,
        unreadable=found.unreadable,
        page_size=found.page_size,
        seconds=seconds,
        profile_bytes=len(text),
        output=output,
        output_bytes=written,
        bytes_per_gib=round(written / (scanned / (1 << 30)), 1) if scanned else 0.0,
        vmtouch=profiles.vmtouch_script(found) if with_vmtouch else None,
    )


@dataclass
class ShowResult:
    host: str
    path: str
    files: int
    directories: int
    resident_pages: int
    pages: int
    page_size: int
    share: float
    seconds: float
    busiest: list[dict[str, Any]]  # the files with the most resident pages


def show(fleet: Fleet, host_name: str, path: str, top: int) -> ShowResult:
    """A vmtouch-like summary of one directory's residency, exact to the page."""
    profile, _, seconds = capture(fleet, host_name, [path])
    ranked = sorted(profile.files, key=lambda entry: sum(count for _, count in entry.runs), reverse=True)
    busiest = []
    for entry in ranked[:top]:
        resident = sum(count for _, count in entry.runs)
        pages = -(-entry.size // profile.page_size)
        busiest.append(
            {
                "path": entry.path,
                "resident_pages": resident,
                "pages": pages,
                "share": round(resident / pages, 4),
                "runs": len(entry.runs),
            }
        )
    return ShowResult(
        host=profile.host,
        path=profile.roots[0].path,
        files=profile.scanned_files,
        directories=profile.scanned_dirs,
        resident_pages=profile.pages,
        pages=profile.scanned_pages,
        page_size=profile.page_size,
        share=round(profile.pages / profile.scanned_pages, 4) if profile.scanned_pages else 0.0,
        seconds=seconds,
        busiest=busiest,
    )


# --- apply, copy --------------------------------------------------------------------------------
def plan_apply(fleet: Fleet, profile: Profile, target_name: str, options: WarmOptions, profile_name: str) -> WarmPlan:
    target = fleet.host(target_name)
    check_target(fleet, profile.fleet, profile.host, profile.postgres_cluster, profile.roots, target)
    return WarmPlan(
        source=profile.host,
        target=target.name,
        roots=profile.roots,
        target_paths=target_paths(fleet, profile.roots, target),
        options=options,
        cluster_id=profile.cluster_id,
        files=len(profile.files),
        pages=profile.pages,
        bytes=profile.resident_bytes,
        profile=profile_name,
    )


def plan_copy(
    fleet: Fleet, source_name: str, target_name: str, paths: list[str] | None, options: WarmOptions
) -> WarmPlan:
    source, target = fleet.host(source_name), fleet.host(target_name)
    if source.name == target.name:
        raise UsageError(
            f"{source.name} is both source and target",
            "to re-warm one host (after a restart), `capture` before and `apply` after",
        )
    roots = source_roots(fleet, source, paths)
    check_target(fleet, fleet.model.fleet.name, source.name, postgres_cluster_of(fleet, source.name), roots, target)
    return WarmPlan(
        source=source.name,
        target=target.name,
        roots=roots,
        target_paths=target_paths(fleet, roots, target),
        options=options,
    )


def plan_copy_onto_restored(
    fleet: Fleet, source_name: str, target_name: str, cluster: str, copy_directory: str, options: WarmOptions
) -> WarmPlan:
    """Warm a restored copy of `cluster` (its data directory on `target_name`) from a member's page
    cache: the copy starts out with the member's files, so the same pages are the hot ones."""
    from igops.pg.cluster import cluster_members

    source, target = fleet.host(source_name), fleet.host(target_name)
    if postgres_cluster_of(fleet, source.name) != cluster:
        raise UsageError(
            f"{source.name} is not a member of {cluster}, the cluster restored",
            f"warm from a member of {cluster}: {', '.join(cluster_members(fleet, cluster))}",
        )
    return WarmPlan(
        source=source.name,
        target=target.name,
        roots=source_roots(fleet, source, None),
        target_paths=[copy_directory],
        options=options,
        copy_directory=copy_directory,
    )


def _warm_session(fleet: Fleet, plan: WarmPlan) -> remote_session.Session:
    target = fleet.host(plan.target)
    command, prefix = _warm_invocation(fleet, target, plan)
    # The remote deadline is a backstop only: a stalled agent is caught by
    # warm_agent.STALL_TIMEOUT, and one whose igops went away dies on its next progress line.
    settings = dataclasses.replace(remote.settings_for(fleet), command_timeout=plan.options.timeout)
    [where] = remote.targets_for(fleet, [target])
    return remote_session.Session(where, command, settings, stdin_prefix=prefix)


def apply(fleet: Fleet, plan: WarmPlan, text: bytes, reporter: Reporter = Reporter()) -> WarmResult:
    assert plan.files is not None and plan.pages is not None  # plan_apply counts the stored profile
    title = (
        f"warm {plan.target}: {plural(plan.pages, 'page')} ({human_bytes(plan.bytes)}) of {plural(plan.files, 'file')}"
    )
    with reporter.step(title) as step:
        with _warm_session(fleet, plan) as session:
            warm_agent.send(session, text)
            result = _follow(session, plan, reporter, plan.bytes)
        step.detail = _detail(result)
    return result


def copy(fleet: Fleet, plan: WarmPlan, reporter: Reporter = Reporter()) -> WarmResult:
    source = fleet.host(plan.source)
    [source_target] = remote.targets_for(fleet, [source])
    capture_command, capture_prefix = warm_agent.capture_invocation(fleet, source, plan.roots)
    with ExitStack() as stack:
        with reporter.step(f"capture on {plan.source}, streaming to {plan.target}") as step:
            target_session = _warm_session(fleet, plan)
            source_session = remote_session.Session(
                source_target, capture_command, remote.settings_for(fleet), stdin_prefix=capture_prefix
            )
            warm_agent.open_together(stack, [target_session, source_session])
            try:
                reader = pagecache_profile.Reader(warm_agent.Relay(source_session, target_session, plan.source))
                entries = list(reader.entries())
            except pagecache_profile.FormatError as exc:
                stderr = source_session.stderr().strip()
                raise RemoteError(
                    f"{plan.source}: the capture stream broke off: {exc}" + (f" ({stderr[-300:]})" if stderr else ""),
                    f"{plan.target} stopped warming; run the copy again",
                ) from None
            profile = from_reader(reader, entries)
            plan.cluster_id, plan.files, plan.pages, plan.bytes = (
                profile.cluster_id,
                len(profile.files),
                profile.pages,
                profile.resident_bytes,
            )
            step.detail = f"{plural(plan.files, 'file')}, {plural(plan.pages, 'page')} ({human_bytes(plan.bytes)})"
        with reporter.step(f"warm {plan.target}") as step:
            result = _follow(target_session, plan, reporter, plan.bytes)
            step.detail = _detail(result)
    return result


def _follow(session: remote_session.Session, plan: WarmPlan, reporter: Reporter, total: int | None) -> WarmResult:
    """Feed the agent's progress to a bar in bytes until its summary arrives."""
    done = 0
    with reporter.progress(f"warm {plan.target}", total=total, unit="bytes") as advance:
        while True:
            line = session.read_line(warm_agent.STALL_TIMEOUT)
            if line is None:
                stderr = session.stderr().strip()
                raise RemoteError(
                    f"{plan.target}: the warming agent stopped without a summary"
                    + (f": {stderr[-300:]}" if stderr else ""),
                    f"it was silent for up to {warm_agent.STALL_TIMEOUT:g} s or its connection closed",
                )
            event = warm_agent.event(line, plan.target, "warming")
            kind = event.get("event")
            if kind == "progress":
                advance(event["bytes"] - done)
                done = event["bytes"]
            elif kind == "summary":
                return WarmResult.from_summary(plan.source, plan.target, event)
            elif kind == "error":
                raise warm_agent.agent_failure(plan.target, event, "warming")


def _detail(result: WarmResult) -> str:
    return (
        f"{result.warmed_pages} of {plural(result.pages, 'page')} read, {result.hit_ratio:.1%} resident, "
        f"{plural(result.skipped_files, 'file')} skipped"
    )


# --- diff ---------------------------------------------------------------------------------------
def diff(
    fleet: Fleet, source_name: str, target_name: str, paths: list[str] | None, reporter: Reporter = Reporter()
) -> DiffResult:
    """What share of the source's resident pages are resident on the target, per file and in
    total. Files are matched by path alone: a page past the end of the target's file is cold."""
    source, target = fleet.host(source_name), fleet.host(target_name)
    roots = source_roots(fleet, source, paths)
    check_target(fleet, fleet.model.fleet.name, source.name, postgres_cluster_of(fleet, source.name), roots, target)
    where = target_paths(fleet, roots, target)
    with reporter.step(f"capture the page cache of {source.name}") as step:
        profile, text, _ = _capture(fleet, source, roots)
        step.detail = (
            f"{plural(profile.pages, 'page')} ({human_bytes(profile.resident_bytes)}) in "
            f"{plural(len(profile.files), 'file')}"
        )
    with reporter.step(f"look up those pages on {target.name}"):
        args = ["residency", *where]
        for prefix in allowed_prefixes(fleet, target):
            args += ["--within", prefix]
        output = warm_agent.run_agent(fleet, target, agent.invocation("pagecache", args), "residency", text)
    event = warm_agent.event(output.strip().rsplit("\n", 1)[-1], target.name, "residency")
    if event.get("event") != "residency":
        raise RemoteError(f"{target.name}: the residency agent answered {output[:200]!r}")
    many_roots = len(profile.roots) > 1
    files = []
    for root, relative, source_pages, target_pages, status in event["files"]:
        path = posixpath.join(profile.roots[root].path, relative) if many_roots else relative
        files.append(
            FileShare(
                path, source_pages, target_pages, round(target_pages / source_pages, 4) if source_pages else 1.0, status
            )
        )
    files.sort(key=lambda item: (item.target_pages - item.source_pages, item.path))
    source_pages = sum(item.source_pages for item in files)
    target_pages = sum(item.target_pages for item in files)
    return DiffResult(
        source=profile.host,
        target=target.name,
        roots=where,
        source_pages=source_pages,
        target_pages=target_pages,
        share=round(target_pages / source_pages, 4) if source_pages else 1.0,
        page_size=profile.page_size,
        files=files,
    )
