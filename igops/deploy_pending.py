"""What a deploy would bring: the commits of the app between the release the fleet runs and a
git revision (`igops deploy pending [REV]`, and the summary each deploy journals and sends with
its PagerDuty change event), the files they change, and whether requirements.txt changed, which
means a new virtualenv on each host that lacks it.

The release the fleet runs is the one most reachable app servers have as `current`; its git
commit is in its RELEASE.json when it was built from git. A release built from a working tree
records none: its commit is then looked for among the app's recent commits by the release's
content hash (the same files, the same release), and is unknown when none matches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from igops.deploy_agents import AppFleet
from igops.deploy_release import (
    SourceTree,
    content_hash,
    git,
    git_toplevel,
    read_source,
    requirements_hash,
    resolve_revision,
)
from igops.deploy_survey import HostReleases, survey_hosts
from igops.errors import IgopsError, UsageError
from igops.output import plural

# How far back the commit of a release built from a working tree is looked for: by `deploy
# pending`, and (each commit costs a `git archive`) by every deploy, for its journal.
CONTENT_SEARCH_COMMITS = 100
DEPLOY_CONTENT_SEARCH_COMMITS = 10
# What a deploy's journal entry and change event carry of the list (the counts are whole).
BRIEF_COMMITS = 20
BRIEF_FILES = 50
FIELD = "\x1f"


@dataclass
class Commit:
    sha: str
    date: str
    author: str
    subject: str


@dataclass
class Pending:
    fleet: str
    deployed: str | None  # the release most app servers run
    deployed_on: list[str]
    others: dict[str, list[str]]  # other releases in use -> their hosts
    base: str | None  # the deployed release's git commit
    base_how: str  # how it was found, or why it is unknown
    rev: str  # as asked (REV, HEAD, the working tree)
    target: str | None  # REV's commit
    source: str  # the app's directory in the git work tree
    commits: list[Commit] = field(default_factory=list)
    behind: list[Commit] = field(default_factory=list)  # in the deployed release, not in REV
    files: list[tuple[str, str]] = field(default_factory=list)  # (git status letter, path under the app)
    uncommitted: list[str] = field(default_factory=list)  # a working-tree deploy's changes not in REV
    requirements_changed: bool | None = None
    venv: str | None = None  # REV's virtualenv hash
    venv_builds: list[str] = field(default_factory=list)  # hosts that lack it: pip runs there

    @property
    def known(self) -> bool:
        return self.base is not None and self.target is not None

    def headline(self) -> str:
        if not self.known:
            return f"pending for {self.rev}: unknown ({self.base_how})"
        text = (
            f"{plural(len(self.commits), 'commit')} of {self.source}/ between {self.deployed} "
            f"({(self.base or '')[:12]}) and {self.rev} ({(self.target or '')[:12]}), "
            f"{plural(len(self.files), 'file')} changed"
        )
        if self.behind:
            text += f"; {self.rev} lacks {plural(len(self.behind), 'commit')} the fleet runs (this goes back)"
        if self.uncommitted:
            text += f"; and {plural(len(self.uncommitted), 'uncommitted change')}"
        if self.requirements_changed:
            text += "; requirements.txt changed: a new virtualenv" + (
                f" is built on {', '.join(self.venv_builds)}" if self.venv_builds else ", already on every host"
            )
        return text

    def brief(self) -> dict[str, Any]:
        """What a deploy's journal and change event keep: the counts whole, the lists cut."""
        return {
            "deployed": self.deployed,
            "base": self.base,
            "base_how": self.base_how,
            "rev": self.rev,
            "target": self.target,
            "commit_count": len(self.commits),
            "commits": [f"{c.sha[:12]} {c.subject}" for c in self.commits[:BRIEF_COMMITS]],
            "behind_count": len(self.behind),
            "files_count": len(self.files),
            "files": [f"{status} {path}" for status, path in self.files[:BRIEF_FILES]],
            "uncommitted": self.uncommitted[:BRIEF_FILES],
            "requirements_changed": self.requirements_changed,
            "venv_builds": self.venv_builds,
        }


def parse_log(text: str) -> list[Commit]:
    """`git log --format=%H%x1f%aI%x1f%an%x1f%s` output."""
    commits = []
    for line in text.splitlines():
        parts = line.split(FIELD)
        if len(parts) == 4:
            commits.append(Commit(*parts))
    return commits


def parse_name_status(text: str, prefix: str) -> list[tuple[str, str]]:
    """`git diff --name-status` output, paths under `prefix`/ made relative to it; a rename is
    listed under its new name."""
    files = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        path = parts[-1]
        if prefix not in ("", "."):
            path = path.removeprefix(prefix.rstrip("/") + "/")
        files.append((parts[0][:1], path))
    return files


def deployed_release(surveys: dict[str, HostReleases]) -> tuple[str | None, list[str], dict[str, list[str]]]:
    """The release most reachable hosts run, those hosts, and the other releases in use."""
    in_use: dict[str, list[str]] = {}
    for found in surveys.values():
        if found.reachable and found.current:
            in_use.setdefault(found.current, []).append(found.host)
    if not in_use:
        return None, [], {}
    counts = Counter({release: len(hosts) for release, hosts in in_use.items()})
    # Most hosts; on a tie, the older release: what is pending is counted from the farthest back.
    deployed = min(counts, key=lambda release: (-counts[release], release))
    return deployed, in_use.pop(deployed), in_use


def _commits(toplevel: Path, range_spec: str, prefix: str) -> list[Commit]:
    output = git(
        toplevel,
        "log",
        f"--format=%H{FIELD}%aI{FIELD}%an{FIELD}%s",
        range_spec,
        "--",
        prefix,
        purpose=f"list the commits of {prefix}/",
    )
    return parse_log(output.decode(errors="replace"))


def commit_by_content(
    source: Path, toplevel: Path, prefix: str, content: str, start: str, limit: int = CONTENT_SEARCH_COMMITS
) -> str | None:
    """The newest of the app's last `limit` commits whose app/ has exactly this content hash (a
    release built from a working tree that matched a commit)."""
    listed = git(
        toplevel,
        "rev-list",
        f"--max-count={limit}",
        start,
        "--",
        prefix,
        purpose=f"list the commits of {prefix}/",
    )
    for commit in listed.decode().split():
        try:
            if content_hash(read_source(source, commit).files) == content:
                return commit
        except UsageError:
            continue  # the app was not there yet at that commit
    return None


def pending(
    app: AppFleet,
    source: Path,
    rev: str | None,
    surveys: dict[str, HostReleases] | None = None,
    tree: SourceTree | None = None,
    search: int = CONTENT_SEARCH_COMMITS,
) -> Pending:
    """What deploying `rev` (None: the working tree, counted from HEAD) would bring to the fleet."""
    surveys = surveys if surveys is not None else survey_hosts(app)
    deployed, on, others = deployed_release(surveys)
    source = source.expanduser().resolve()
    toplevel = git_toplevel(source, "the app must be in a git work tree for its commits to be listed")
    prefix = source.relative_to(toplevel).as_posix()
    target = resolve_revision(toplevel, rev or "HEAD")
    found = Pending(app.name, deployed, sorted(on), others, None, "", rev or "the working tree", target, prefix)
    info = next((s.release_info(deployed) for s in surveys.values() if s.release_info(deployed)), None) or {}
    if deployed is None:
        found.base_how = "no reachable app server has a current release"
    elif info.get("revision"):
        found.base, found.base_how = str(info["revision"]), "recorded in the release"
        try:
            resolve_revision(toplevel, found.base)
        except UsageError:
            found.base, found.base_how = None, f"its commit {str(info['revision'])[:12]} is not in {toplevel}"
    elif info.get("content"):
        found.base = commit_by_content(source, toplevel, prefix, str(info["content"]), target, search)
        found.base_how = (
            "built from a working tree: found by its content"
            if found.base
            else f"built from a working tree whose content matches none of the last {search} commits"
        )
    else:
        found.base_how = f"release {deployed} records neither a commit nor a content hash"
    if found.base is not None:
        found.commits = _commits(toplevel, f"{found.base}..{target}", prefix)
        found.behind = _commits(toplevel, f"{target}..{found.base}", prefix)
        names = git(toplevel, "diff", "--name-status", found.base, target, "--", prefix, purpose="list changed files")
        found.files = parse_name_status(names.decode(errors="replace"), prefix)
        found.requirements_changed = any(path == "requirements.txt" for _, path in found.files)
    if rev is None:
        status = git(toplevel, "status", "--porcelain", "--", prefix, purpose="list uncommitted changes")
        found.uncommitted = [line[3:] for line in status.decode(errors="replace").splitlines() if line.strip()]
    requirements = (tree or read_source(source, rev)).files.get("requirements.txt", (False, b""))[1]
    found.venv = requirements_hash(requirements)
    if info.get("requirements") and found.requirements_changed is None:
        found.requirements_changed = info["requirements"] != found.venv
    found.venv_builds = sorted(s.host for s in surveys.values() if s.reachable and found.venv not in s.venvs)
    return found


def for_deploy(app: AppFleet, source: Path, rev: str | None, tree: SourceTree) -> dict[str, Any] | None:
    """The summary a deploy journals and sends with its change event; None when it cannot be
    had (no git, a source outside a work tree): it never stops a deploy."""
    try:
        return pending(app, source, rev, tree=tree, search=DEPLOY_CONTENT_SEARCH_COMMITS).brief()
    except IgopsError:
        return None
