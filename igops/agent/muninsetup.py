"""Install igops' Munin plugins on this host; run by `igops munin install` over SSH.

Input (stdin, JSON): library, plugin_dir, conf_path, files {name: content}, links
{plugin: file}, conf, restart (a shell command), restart_timeout, always_restart. Writes only
what differs (atomically), removes links to the library that are no longer wanted, and restarts
munin-node only if something changed (or always_restart). Output: one JSON line {changed, restarted, error}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def write_if_different(path: str, content: bytes, mode: int) -> bool:
    try:
        with open(path, "rb") as handle:
            if handle.read() == content and (os.stat(path).st_mode & 0o7777) == mode:
                return False
    except FileNotFoundError:
        pass
    temporary = f"{path}.igops-tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, content)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return True


def link(path: str, target: str) -> bool:
    if os.path.islink(path) and os.readlink(path) == target:
        return False
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)
    return True


def main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    library, plugin_dir = request["library"], request["plugin_dir"]
    changed = []
    os.makedirs(library, mode=0o755, exist_ok=True)
    os.makedirs(plugin_dir, mode=0o755, exist_ok=True)
    os.makedirs(os.path.dirname(request["conf_path"]), mode=0o755, exist_ok=True)
    for name, content in request["files"].items():
        if write_if_different(os.path.join(library, name), content.encode(), 0o755):
            changed.append(os.path.join(library, name))
    targets = {os.path.join(library, name) for name in request["files"]}
    for plugin, name in request["links"].items():
        if link(os.path.join(plugin_dir, plugin), os.path.join(library, name)):
            changed.append(os.path.join(plugin_dir, plugin))
    for entry in sorted(os.listdir(plugin_dir)):
        path = os.path.join(plugin_dir, entry)
        if entry not in request["links"] and os.path.islink(path) and os.readlink(path) in targets:
            os.unlink(path)
            changed.append(f"removed {path}")
    if write_if_different(request["conf_path"], request["conf"].encode(), 0o600):
        changed.append(request["conf_path"])
    restarted = False
    error: str | None = None
    if changed or request.get("always_restart"):
        try:
            done = subprocess.run(
                ["sh", "-c", request["restart"]],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=request["restart_timeout"],
            )
            restarted = done.returncode == 0
            if not restarted:
                output = (done.stderr.strip() or done.stdout.strip()).splitlines()
                error = f"restart failed (exit {done.returncode})" + (f": {output[-1]}" if output else "")
        except subprocess.TimeoutExpired:
            error = f"restart did not finish within {request['restart_timeout']:g} s"
    sys.stdout.write(json.dumps({"changed": changed, "restarted": restarted, "error": error}) + "\n")


if __name__ == "__main__":
    main()
