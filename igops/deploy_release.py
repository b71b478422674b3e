"""A release of the app: its files read from the working tree or from git, and the tarball
(RELEASE.json and app/) built once per deploy and sent to every app server.

The release agent (`igops/agent/release.py`) unpacks that tarball on each host; the lab
(`igops.lab.services`) keys virtualenvs and release contents by the same hashes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from igops import __version__
from igops.deploy_record import deployer
from igops.errors import UsageError

# Linked from shared/ into every release when shared/ has them (Capistrano's linked files).
SHARED_LINKS = ("app.toml", "log")
MANIFEST = "RELEASE.json"
EXCLUDED_DIRS = {"__pycache__", ".git"}
EXCLUDED_SUFFIXES = (".pyc", ".pyo")


@dataclass
class SourceTree:
    files: dict[str, tuple[bool, bytes]]  # path under app/ -> (executable, content)
    revision: str | None  # the full git commit, when built from git
    description: str


@dataclass
class Release:
    id: str
    content: str
    revision: str | None
    requirements: str
    source: str
    files: int
    built_at: str
    sha256: str
    size: int


def requirements_hash(data: bytes) -> str:
    """The virtualenv key; the lab and the release agent use the same."""
    return hashlib.sha256(data).hexdigest()[:16]


def content_hash(files: dict[str, tuple[bool, bytes]]) -> str:
    """What the release contains, independent of when and how it was built."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path][1])
    return digest.hexdigest()[:12]


def release_id(now: datetime, tag: str) -> str:
    return f"{now.astimezone(UTC):%Y%m%d%H%M%S}-{tag}"


def read_source(source: Path, revision: str | None) -> SourceTree:
    """The app's files from the working tree, or from git at `revision`."""
    source = source.expanduser().resolve()
    if not source.is_dir():
        raise UsageError(f"app source {source} is not a directory", "pass --source DIR (the app package)")
    if revision:
        return _read_git(source, revision)
    files: dict[str, tuple[bool, bytes]] = {}
    for directory, subdirectories, names in os.walk(source):
        subdirectories[:] = sorted(name for name in subdirectories if name not in EXCLUDED_DIRS)
        for name in names:
            path = Path(directory) / name
            relative = path.relative_to(source).as_posix()
            if name.endswith(EXCLUDED_SUFFIXES):
                continue
            if path.is_symlink() or not path.is_file():
                raise UsageError(f"{path} is not a regular file", "a release holds regular files only")
            files[relative] = (os.access(path, os.X_OK), path.read_bytes())
    if not files:
        raise UsageError(f"app source {source} is empty")
    return SourceTree(files, None, f"working tree {source}")


def git(directory: Path, *args: str, purpose: str, hint: str | None = None) -> bytes:
    """git's output; a failure says first what igops could not do, then what git said."""
    done = _run_git(directory, *args)
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(f"could not {purpose} (git {args[0]}: {(said[-1] if said else 'no output')[:200]})", hint)
    return done.stdout


def _run_git(directory: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, timeout=60)
    except FileNotFoundError:
        raise UsageError("git is not installed", "deploy the working tree (no REV) or install git") from None


def resolve_revision(toplevel: Path, revision: str) -> str:
    """The commit `revision` names; an unknown one says so, naming close tags and branches."""
    import difflib

    found = _run_git(toplevel, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}")
    if found.returncode == 0:
        return found.stdout.decode().strip()
    names = _run_git(toplevel, "for-each-ref", "--format=%(refname:short)", "refs/tags", "refs/heads")
    known = names.stdout.decode(errors="replace").split() if names.returncode == 0 else []
    close = difflib.get_close_matches(revision, known, n=3, cutoff=0.6)
    raise UsageError(
        f"unknown git revision {revision!r} in {toplevel}",
        (f"did you mean {' or '.join(map(repr, close))}? " if close else "")
        + "give a commit, tag or branch of that repository, or no REV to deploy the working tree",
    )


def git_toplevel(source: Path, hint: str = "with REV, --source must be a directory in a git work tree") -> Path:
    return Path(
        git(source, "rev-parse", "--show-toplevel", purpose=f"find the git work tree of {source}", hint=hint)
        .decode()
        .strip()
    )


def _read_git(source: Path, revision: str) -> SourceTree:
    toplevel = git_toplevel(source)
    commit = resolve_revision(toplevel, revision)
    prefix = source.relative_to(toplevel).as_posix()
    archive = git(
        toplevel,
        "archive",
        "--format=tar",
        commit,
        prefix,
        purpose=f"read {prefix}/ at {revision}",
        hint=f"check that {prefix}/ exists at {revision}",
    )
    files: dict[str, tuple[bool, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isdir() or member.name == "pax_global_header":
                continue
            relative = member.name[len(prefix) + 1 :] if prefix != "." else member.name
            parts = relative.split("/")
            if any(part in EXCLUDED_DIRS for part in parts) or relative.endswith(EXCLUDED_SUFFIXES):
                continue
            if not member.isfile():
                raise UsageError(
                    f"{member.name} at {revision} is not a regular file", "a release holds regular files only"
                )
            content = tar.extractfile(member)
            assert content is not None  # a regular file's member always has content
            files[relative] = (bool(member.mode & 0o111), content.read())
    if not files:
        raise UsageError(f"{prefix} is empty at {revision}")
    return SourceTree(files, commit, f"git {revision} ({commit[:12]}) {prefix}/")


def package(tree: SourceTree, identifier: str, built_at: datetime | None = None) -> tuple[Release, bytes]:
    """The release and its tarball (RELEASE.json and app/), made once and sent to every host."""
    moment = (built_at or datetime.now(UTC)).isoformat(timespec="seconds")
    requirements = requirements_hash(tree.files.get("requirements.txt", (False, b""))[1])
    content = content_hash(tree.files)
    manifest = {
        "id": identifier,
        "content": content,
        "revision": tree.revision,
        "requirements": requirements,
        "source": tree.description,
        "built_at": moment,
        "built_by": deployer(),
        "igops": __version__,
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        _add(tar, MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n", False)
        for path in sorted(tree.files):
            executable, data = tree.files[path]
            _add(tar, f"app/{path}", data, executable)
    data = buffer.getvalue()
    return Release(
        identifier,
        content,
        tree.revision,
        requirements,
        tree.description,
        len(tree.files),
        moment,
        hashlib.sha256(data).hexdigest(),
        len(data),
    ), data


def _add(tar: tarfile.TarFile, name: str, data: bytes, executable: bool) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o755 if executable else 0o644
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))
