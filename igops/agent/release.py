"""Releases on an app host, in the Capistrano layout: ROOT/releases/<id>, ROOT/current (a
symlink switched atomically), ROOT/shared, and ROOT/revisions.log (one JSON line per switch).

Usage:
  release.py serve ROOT        requests on stdin, one JSON line each; one JSON line answers each:
      {"op": "survey"}
      {"op": "stage", "id", "sha256", "size", "shared": [NAME, ...]} followed by `size` bytes of tarball
      {"op": "switch", "id", "keep", "reload", "action", "deploy", "protect": [ID, ...] (optional)}
  release.py survey ROOT
  release.py stage ROOT ID SHA256 [SHARED_NAME ...]     (the release tarball follows on stdin)
  release.py switch ROOT ID KEEP RELOAD_COMMAND ACTION DEPLOY_ID

`serve` lets one SSH session carry a whole deploy: one login and one interpreter per host.

`stage` verifies the tarball's sha256, unpacks it into a temporary directory, makes sure the
virtualenv for its requirements exists (ROOT/shared/venvs/<requirements hash>, built only when
missing), links it and the named shared files into the release, and only then renames the
directory to releases/<id>: a release directory that exists is complete. `switch` points
`current` at a release with a new symlink renamed over the old one (`ln -s` + `mv -T`), so
`current` is always either the old or the new release, records the switch, prunes to KEEP
releases (never the current one, the one it replaced, or one named in `protect`: the release a
host returns to when its batch fails), and runs the reload command.
Answers are JSON objects; a failure is {"error": ...} (and exit 2 outside `serve`). Stage and
switch hold a lock on the host for their duration.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, TypeVar

    T = TypeVar("T")

MANIFEST = "RELEASE.json"
LEGACY_REVISION = "REVISION"
HISTORY = "revisions.log"
READY_MARKER = ".igops-ready"
LOCK_FILE = ".igops-deploy.lock"
HISTORY_SHOWN = 20


class Refused(Exception):
    pass


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def requirements_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def host_lock(root: str) -> int:
    """One deploy agent per host at a time; the kernel drops the lock if this process dies."""
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + 30
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Refused("another deploy agent has held this host's lock for 30 s") from None
            time.sleep(0.1)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_release(root: str) -> str | None:
    try:
        target = os.readlink(os.path.join(root, "current"))
    except OSError:
        return None
    return os.path.basename(target.rstrip("/"))


def read_history(root: str) -> list[Any]:
    entries = []
    try:
        with open(os.path.join(root, HISTORY)) as handle:
            for line in handle:
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return entries


def release_ids(root: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(root, "releases"))
    except OSError:
        return []
    return sorted(
        name for name in names if not name.startswith(".") and os.path.isdir(os.path.join(root, "releases", name))
    )


def previous_release(root: str, current: str | None, ids: list[str], history: list[Any]) -> str | None:
    """What a rollback returns to: the release `current` replaced, else the newest older one."""
    for entry in reversed(history):
        if entry.get("release") == current:
            previous = entry.get("previous")
            return previous if previous in ids and previous != current else None
    older = [name for name in ids if name < (current or "")]
    return older[-1] if older else None


def describe_release(root: str, release_id: str) -> dict[str, Any]:
    directory = os.path.join(root, "releases", release_id)
    info: dict[str, Any] = {
        "id": release_id,
        "content": None,
        "revision": None,
        "requirements": None,
        "built_at": None,
        "source": None,
    }
    try:
        with open(os.path.join(directory, MANIFEST)) as handle:
            manifest = json.load(handle)
        for key in info:
            if key != "id" and key in manifest:
                info[key] = manifest[key]
    except (OSError, ValueError):
        try:
            with open(os.path.join(directory, LEGACY_REVISION)) as handle:
                info["content"] = handle.read().strip() or None
        except OSError:
            pass
        try:
            with open(os.path.join(directory, "app", "requirements.txt"), "rb") as handle:
                info["requirements"] = requirements_hash(handle.read())
        except OSError:
            pass
    info["venv_ready"] = os.path.exists(os.path.join(directory, "venv", READY_MARKER))
    return info


def survey(root: str) -> dict[str, Any]:
    ids = release_ids(root)
    current = current_release(root)
    history = read_history(root)
    venvs_dir = os.path.join(root, "shared", "venvs")
    try:
        venvs = sorted(
            name for name in os.listdir(venvs_dir) if os.path.exists(os.path.join(venvs_dir, name, READY_MARKER))
        )
    except OSError:
        venvs = []
    return {
        "root": root,
        "exists": os.path.isdir(root),
        "current": current,
        "current_complete": bool(current) and current in ids,
        "previous": previous_release(root, current, ids, history),
        "releases": [describe_release(root, name) for name in ids],
        "venvs": venvs,
        "history": history[-HISTORY_SHOWN:],
    }


# --- stage -----------------------------------------------------------------------------------


def safe_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Regular files and directories under the release, nothing else: no links, devices,
    absolute paths or `..`."""
    members = []
    for member in archive.getmembers():
        name = member.name
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise Refused(f"unsafe entry in the release tarball: {name!r}")
        members.append(member)
    return members


def unpack(data: bytes, directory: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in safe_members(archive):
            target = os.path.join(directory, member.name)
            if member.isdir():
                os.makedirs(target, mode=0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None  # safe_members lets through only regular files and directories
            with open(target, "wb") as handle:
                shutil.copyfileobj(source, handle)
            os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)


def ensure_venv(root: str, digest: str, requirements: str) -> str:
    """ROOT/shared/venvs/<digest>, ready. Returns "reused" or "built". A virtualenv cannot be
    moved after it is made, so it is built in place and counts only once its marker exists."""
    venvs = os.path.join(root, "shared", "venvs")
    venv = os.path.join(venvs, digest)
    if os.path.exists(os.path.join(venv, READY_MARKER)):
        return "reused"
    os.makedirs(venvs, mode=0o755, exist_ok=True)
    if os.path.islink(venv):
        os.unlink(venv)
    elif os.path.exists(venv):
        shutil.rmtree(venv)
    for argv in (
        [sys.executable, "-m", "venv", venv],
        [os.path.join(venv, "bin", "pip"), "install", "--quiet", "--disable-pip-version-check", "-r", requirements],
    ):
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise Refused(
                f"building the virtualenv failed ({os.path.basename(argv[0])} exit {done.returncode}): "
                + " | ".join(tail)
            )
    with open(os.path.join(venv, READY_MARKER), "w") as handle:
        handle.write(digest + "\n")
    return "built"


def stage(root: str, release_id: str, expected_sha: str, shared_names: list[str], data: bytes) -> dict[str, Any]:
    if "/" in release_id or release_id.startswith("."):
        raise Refused(f"bad release id {release_id!r}")
    releases = os.path.join(root, "releases")
    final = os.path.join(releases, release_id)
    os.makedirs(releases, mode=0o755, exist_ok=True)
    os.makedirs(os.path.join(root, "shared"), mode=0o755, exist_ok=True)
    if os.path.isdir(final):
        return {"id": release_id, "staged": "already", "venv": "reused"}
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha:
        raise Refused(f"tarball sha256 mismatch: got {actual[:12]}… ({len(data)} bytes), expected {expected_sha[:12]}…")
    # Only this agent writes here, under the host lock: any staging directory is a leftover.
    for name in os.listdir(releases):
        if name.startswith(".") and name.endswith(".staging"):
            shutil.rmtree(os.path.join(releases, name), ignore_errors=True)
    staging = os.path.join(releases, f".{release_id}.staging")
    os.mkdir(staging, 0o755)
    try:
        return prepare(root, release_id, data, staging, final, shared_names)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare(
    root: str, release_id: str, data: bytes, staging: str, final: str, shared_names: list[str]
) -> dict[str, Any]:
    releases = os.path.dirname(final)
    unpack(data, staging)
    with open(os.path.join(staging, MANIFEST)) as handle:
        manifest = json.load(handle)
    if manifest.get("id") != release_id:
        raise Refused(f"the tarball holds release {manifest.get('id')!r}, not {release_id!r}")
    requirements = os.path.join(staging, "app", "requirements.txt")
    if not os.path.exists(requirements):
        with open(requirements, "wb"):
            pass
    with open(requirements, "rb") as handle:
        digest = requirements_hash(handle.read())
    if manifest.get("requirements") not in (None, digest):
        raise Refused("the manifest's requirements hash does not match app/requirements.txt")
    venv_state = ensure_venv(root, digest, requirements)
    os.symlink(os.path.join("..", "..", "shared", "venvs", digest), os.path.join(staging, "venv"))
    linked = []
    for name in shared_names:
        if os.path.lexists(os.path.join(root, "shared", name)) and not os.path.lexists(os.path.join(staging, name)):
            os.symlink(os.path.join("..", "..", "shared", name), os.path.join(staging, name))
            linked.append(name)
    os.rename(staging, final)
    fsync_dir(releases)
    return {
        "id": release_id,
        "staged": "unpacked",
        "venv": venv_state,
        "requirements": digest,
        "linked": linked,
        "bytes": len(data),
    }


# --- switch ----------------------------------------------------------------------------------


def prune(root: str, keep: int, protected: set[str | None]) -> list[str]:
    ids = release_ids(root)
    removable = [name for name in ids if name not in protected]
    surplus = max(0, len(ids) - keep)
    doomed = removable[:surplus]
    for name in doomed:
        shutil.rmtree(os.path.join(root, "releases", name), ignore_errors=True)
    remaining = set(release_ids(root))
    used = set()
    for name in remaining:
        link = os.path.join(root, "releases", name, "venv")
        if os.path.islink(link):
            used.add(os.path.basename(os.readlink(link)))
    venvs = os.path.join(root, "shared", "venvs")
    for digest in os.listdir(venvs) if os.path.isdir(venvs) else []:
        path = os.path.join(venvs, digest)
        if digest in used or digest.startswith("."):
            continue
        if os.path.islink(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return doomed


def switch(
    root: str,
    release_id: str,
    keep: int,
    reload_command: str,
    action: str,
    deploy_id: str,
    protect: Iterable[str] = (),
) -> dict[str, Any]:
    target = os.path.join(root, "releases", release_id)
    if not os.path.isdir(target):
        raise Refused(f"release {release_id} is not on this host")
    current = os.path.join(root, "current")
    previous = current_release(root)
    if previous != release_id:
        temporary = os.path.join(root, f".current.igops-{os.getpid()}")
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        os.symlink(target, temporary)
        os.rename(temporary, current)
        fsync_dir(root)
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "action": action,
            "release": release_id,
            "previous": previous,
            "deploy": deploy_id,
            "by": os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid()),
        }
        with open(os.path.join(root, HISTORY), "a") as handle:
            handle.write(json.dumps(record) + "\n")
    pruned = prune(root, keep, {release_id, previous, *protect})
    started = time.monotonic()
    reload_code: int | None
    try:
        done = subprocess.run(
            ["sh", "-c", reload_command], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
        reload_code, reload_output = done.returncode, (done.stderr or done.stdout).strip()[-500:]
    except subprocess.TimeoutExpired:
        reload_code, reload_output = None, "the reload command did not finish within 60 s"
    return {
        "id": release_id,
        "previous": previous,
        "switched": previous != release_id,
        "pruned": pruned,
        "reload_exit": reload_code,
        "reload_output": reload_output,
        "reload_ms": round((time.monotonic() - started) * 1000, 1),
    }


def locked(root: str, operation: Callable[..., T], *args: Any) -> T:
    lock = host_lock(root)
    try:
        return operation(root, *args)
    finally:
        os.close(lock)


def failure(exc: Exception) -> dict[str, str]:
    if isinstance(exc, Refused):
        return {"error": str(exc)}
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    return {"error": f"{type(exc).__name__}: {detail}{where}"}


FAILURES = (Refused, OSError, ValueError, KeyError, IndexError, TypeError, tarfile.TarError)


def serve(root: str) -> None:
    """Answer requests until igops closes the session (EOF)."""
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            return
        try:
            request = json.loads(line)
            op = request["op"]
            if op == "survey":
                answer = survey(root)
            elif op == "stage":
                data = stdin.read(int(request["size"]))
                if len(data) != int(request["size"]):
                    return
                answer = locked(root, stage, request["id"], request["sha256"], request["shared"], data)
            elif op == "switch":
                answer = locked(
                    root,
                    switch,
                    request["id"],
                    int(request["keep"]),
                    request["reload"],
                    request["action"],
                    request["deploy"],
                    request.get("protect") or (),
                )
            else:
                raise Refused(f"unknown request {op!r}")
        except FAILURES as exc:
            answer = failure(exc)
        emit(answer)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("serve", "survey", "stage", "switch"):
        emit({"error": "usage: release.py serve|survey|stage|switch ROOT ..."})
        sys.exit(2)
    command, root = sys.argv[1], sys.argv[2]
    if not os.path.isabs(root):
        emit({"error": f"ROOT must be an absolute path, got {root!r}"})
        sys.exit(2)
    os.umask(0o022)
    if command == "serve":
        serve(root)
        return
    try:
        if command == "survey":
            answer = survey(root)
        elif command == "stage":
            answer = locked(root, stage, sys.argv[3], sys.argv[4], sys.argv[5:], sys.stdin.buffer.read())
        else:
            answer = locked(root, switch, sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7])
    except FAILURES as exc:
        emit(failure(exc))
        sys.exit(2)
    emit(answer)


if __name__ == "__main__":
    main()
