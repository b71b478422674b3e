"""Take app servers out of an nginx upstream and put them back: mark `server` lines `down`.

Usage: upstream.py FILE TEST_COMMAND RELOAD_COMMAND DRAIN_SECONDS; then on stdin (after the
program) one request per line, {"down": ["addr:port", ...], "up": [...], "note": "..."}, each
answered by one line, until EOF. Both lists empty (and no share or reset_weights, below) = only
report.

A server taken out by igops carries the comment `# igops-drained: NOTE` on its line, so igops
(even a later run, after this one was killed) knows which servers it drained, and never puts
back a server that someone else marked down.

A request may also give a canary a share of the traffic: {"share": {"servers": [...],
"percent": P}} raises the other servers' `weight` (each by one whole factor, so their split among
themselves stays as it was) until those servers get at most P% of the requests. A weight igops
changed carries `# igops-weight: ORIGINAL` ("-" for none), and every change request first puts
all such weights back (so does {"reset_weights": true} alone): a run killed during its analysis
leaves weights that the next change undoes. The new file replaces the old one by rename; if
the configuration test or the reload fails, the old file is put back. Every change request
reloads, even one the file already reflects. After the reload this waits until every worker
that ran the old configuration has stopped accepting requests (nginx renames it "worker
process is shutting down"), then up to DRAIN_SECONDS for those workers to finish their
requests and exit.
Answers are JSON objects; a failed request is answered {"error": ...}.

A request {"log": {"path": ..., "inode": ..., "offset": ..., "max_bytes": ...}} reads nginx's
access log instead (a deploy's canary analysis): without an offset, only where the file ends
now (its inode and size); with one, the bytes appended since, zlib-compressed and base64'd. If
logrotate renamed the file meanwhile, the renamed file's tail (PATH.1, found by its inode) and
the new file from its start; if it was truncated (copytruncate), the file from its start.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import subprocess
import sys
import time
import zlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing on the host
if TYPE_CHECKING:
    from typing import Any

SERVER_LINE = re.compile(r"^(?P<indent>\s*)server\s+(?P<address>\S+)(?P<params>[^;#]*);(?P<rest>.*)$")
MARKER = "# igops-drained:"
WEIGHT_MARKER = "# igops-weight:"
# The most a share may raise a weight by: nginx takes any positive integer, and past this the
# canary's few requests would say little.
MAX_WEIGHT_FACTOR = 100
WORKER_TITLE = b"nginx: worker process"
SHUTTING_DOWN = b"is shutting down"
RELOAD_APPLIED_SECONDS = 10


class Refused(Exception):
    pass


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def weight_of(params: list[str]) -> str | None:
    """The line's `weight=N` parameter, if any."""
    return next((param for param in params if param.startswith("weight=")), None)


def parse_line(line: str) -> dict[str, Any] | None:
    match = SERVER_LINE.match(line)
    if not match:
        return None
    params = match.group("params").split()
    rest = match.group("rest")
    note = rest.split(MARKER, 1)[1].strip() if MARKER in rest else None
    original = None
    if WEIGHT_MARKER in rest:
        original = rest.split(WEIGHT_MARKER, 1)[1].split("#", 1)[0].strip() or "-"
    return {
        "address": match.group("address"),
        "indent": match.group("indent"),
        "params": params,
        "down": "down" in params,
        "igops": note is not None,
        "note": note,
        "weight_before": original,  # the weight igops replaced ("-": none), or None
    }


def render_line(server: dict[str, Any]) -> str:
    params = [param for param in server["params"] if param != "down"]
    if server["down"]:
        params.append("down")
    line = f"{server['indent']}server {server['address']}{''.join(' ' + param for param in params)};"
    if server["weight_before"] is not None:
        line += f"  {WEIGHT_MARKER} {server['weight_before']}"
    if server["down"] and server["igops"]:
        line += f"  {MARKER} {server['note']}"
    return line


def set_weight(server: dict[str, Any], weight: int | None) -> None:
    """Give the line `weight=N` (None: its weight before igops changed it)."""
    current = weight_of(server["params"])
    params = [param for param in server["params"] if param != current]
    if weight is None:
        before = server["weight_before"]
        if before not in (None, "-"):
            params.append(before)
        server["weight_before"] = None
    else:
        if server["weight_before"] is None:
            server["weight_before"] = current or "-"
        params.append(f"weight={weight}")
    server["params"] = params


def base_weight(server: dict[str, Any]) -> int:
    """The weight the operator gave the server (nginx's default 1)."""
    text = weight_of(server["params"]) if server["weight_before"] is None else server["weight_before"]
    return int(text.split("=", 1)[1]) if text and text != "-" else 1


def share_factor(canary: int, others: int, percent: float) -> int:
    """The whole factor the other servers' weights are raised by so that servers of total weight
    `canary` get at most `percent` % of the requests (1: they already do)."""
    if canary <= 0 or others <= 0:
        return 1
    factor = 1
    while canary * 100 > percent * (canary + factor * others) and factor < MAX_WEIGHT_FACTOR:
        factor += 1
    return factor


def apply(
    text: str, down: set[str], up: set[str], note: str, share: dict[str, Any] | None = None, weights: bool = False
) -> tuple[str, list[dict[str, Any]]]:
    """The new file text and the servers as they are in it. `weights`: put back every weight
    igops changed, then give `share` (if any) its share of the traffic."""
    lines = text.splitlines()
    parsed = []
    for index, line in enumerate(lines):
        server = parse_line(line)
        if server is not None:
            parsed.append((index, server))
    seen = {server["address"] for _, server in parsed}
    shared = set(share["servers"]) if share else set()
    missing = sorted((set(down) | set(up) | shared) - seen)
    if missing:
        raise Refused(f"not in the upstream file: {', '.join(missing)}")
    servers = []
    for index, server in parsed:
        address = server["address"]
        before = dict(server)
        if address in down and not server["down"]:
            server.update(down=True, igops=True, note=note)
        elif address in up and server["down"] and server["igops"]:
            server.update(down=False, igops=False, note=None)
        if weights and server["weight_before"] is not None:
            set_weight(server, None)
        if server != before:
            lines[index] = render_line(server)
    if share:
        serving = [server for _, server in parsed if not server["down"]]
        factor = share_factor(
            sum(base_weight(s) for s in serving if s["address"] in shared),
            sum(base_weight(s) for s in serving if s["address"] not in shared),
            float(share["percent"]),
        )
        if factor > 1:
            for index, server in parsed:
                if not server["down"] and server["address"] not in shared:
                    set_weight(server, base_weight(server) * factor)
                    lines[index] = render_line(server)
    for _, server in parsed:
        servers.append({key: server[key] for key in ("address", "down", "igops", "note")})
        servers[-1]["weight"] = int((weight_of(server["params"]) or "weight=1").split("=", 1)[1])
    return "\n".join(lines) + ("\n" if text.endswith("\n") else ""), servers


def replace_file(path: str, text: str) -> None:
    info = os.stat(path)
    temporary = f"{path}.igops-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temporary, info.st_mode & 0o7777)
    os.chown(temporary, info.st_uid, info.st_gid)
    os.rename(temporary, path)


def run_shell(command: str) -> tuple[int, str]:
    done = subprocess.run(["sh", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stderr + done.stdout).strip()[-600:]


def workers() -> dict[int, tuple[int, bool]]:
    """pid -> (master pid, whether that nginx worker still accepts requests)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                title = handle.read()
            if not title.startswith(WORKER_TITLE):
                continue
            with open(f"/proc/{name}/stat") as handle:
                master = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found[int(name)] = (master, SHUTTING_DOWN not in title)
    return found


def reload_and_wait(reload_command: str, drain_seconds: float) -> tuple[float, list[int]]:
    """Reload, then wait until the reloaded master's old workers stop accepting. Other nginx
    instances on the host keep their workers, so the reloaded one is whichever master's old
    workers all changed."""
    by_master: dict[int, set[int]] = {}
    for pid, (master, accepting) in workers().items():
        if accepting:
            by_master.setdefault(master, set()).add(pid)
    code, output = run_shell(reload_command)
    if code != 0:
        raise Refused(f"reload failed (exit {code}): {output}")
    started = time.monotonic()
    while True:
        now = workers()
        reloaded = [old for old in by_master.values() if not any(now.get(pid, (None, False))[1] for pid in old)]
        if reloaded or not by_master:
            break
        if time.monotonic() - started > RELOAD_APPLIED_SECONDS:
            raise Refused(
                f"nginx did not apply the new configuration within {RELOAD_APPLIED_SECONDS} s "
                "(its old workers still accept requests); see its error log"
            )
        time.sleep(0.02)
    applied_ms = (time.monotonic() - started) * 1000
    old = set().union(*reloaded) if reloaded else set()
    while any(pid in workers() for pid in old) and time.monotonic() - started < drain_seconds:
        time.sleep(0.05)
    lingering = sorted(pid for pid in workers() if pid in old)
    return round(applied_ms, 1), lingering


def read_from(path: str, offset: int, limit: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(max(0, limit))


def read_log(request: dict[str, Any]) -> dict[str, Any]:
    """Where an access log ends now, or what was appended to it since `offset` of the file
    that had `inode` (at most `max_bytes` of it)."""
    path = request.get("path")
    if not path:
        raise Refused("a log request names no path")
    info = os.stat(path)
    answer: dict[str, Any] = {"inode": info.st_ino, "size": info.st_size, "rotated": False, "truncated": False}
    offset = request.get("offset")
    if offset is None:
        return answer
    budget = int(request.get("max_bytes") or 64 << 20)
    chunks = []
    start = int(offset)
    if info.st_ino != request.get("inode"):
        answer["rotated"] = True
        # logrotate renamed the file the window began in: its tail is in PATH.1 while that is it.
        try:
            if os.stat(path + ".1").st_ino == request.get("inode"):
                chunks.append(read_from(path + ".1", start, budget))
        except OSError:
            pass
        start = 0
    elif info.st_size < start:
        answer["rotated"] = True  # truncated in place (copytruncate): what is there is new
        start = 0
    # Only whole lines of the older file: its last line may be cut where logrotate renamed it.
    data = b"".join(chunks)
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
    data += read_from(path, start, budget - len(data))
    answer["truncated"] = len(data) >= budget
    answer["data"] = base64.b64encode(zlib.compress(data, 6)).decode("ascii")
    return answer


def changes(request: dict[str, Any]) -> bool:
    """Whether a request changes the file (else it only reports)."""
    return bool(request.get("down") or request.get("up") or request.get("share") or request.get("reset_weights"))


def handle(
    path: str, test_command: str, reload_command: str, drain_seconds: float, request: dict[str, Any]
) -> dict[str, Any]:
    if request.get("log"):
        return {"log": read_log(request["log"])}
    down, up = set(request.get("down", [])), set(request.get("up", []))
    if down & up:
        raise Refused(f"asked to take out and put back the same servers: {', '.join(sorted(down & up))}")
    if not changes(request):
        return change(path, test_command, reload_command, drain_seconds, down, up, request)
    # Two deploys to different app servers may change the file at once: each reads, rewrites
    # and reloads it alone, so neither puts back the other's version.
    lock = os.open(
        os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".igops-lock"),
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
        0o600,
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return change(path, test_command, reload_command, drain_seconds, down, up, request)
    finally:
        os.close(lock)


def change(
    path: str,
    test_command: str,
    reload_command: str,
    drain_seconds: float,
    down: set[str],
    up: set[str],
    request: dict[str, Any],
) -> dict[str, Any]:
    with open(path) as handle:
        old_text = handle.read()
    changing = changes(request)
    new_text, servers = apply(
        old_text, down, up, request.get("note") or "igops", request.get("share"), weights=changing
    )
    result: dict[str, Any] = {"servers": servers, "changed": new_text != old_text, "applied_ms": None, "lingering": []}
    if changing:
        # Reloaded even when the file already says so: a run killed between writing the
        # file and reloading left nginx on the old configuration.
        if result["changed"]:
            replace_file(path, new_text)
        code, output = run_shell(test_command)
        if code != 0:
            replace_file(path, old_text)
            raise Refused(f"configuration test failed, upstream file restored (exit {code}): {output}")
        try:
            result["applied_ms"], result["lingering"] = reload_and_wait(reload_command, drain_seconds)
        except Refused:
            replace_file(path, old_text)
            raise
    return result


def main() -> None:
    if len(sys.argv) != 5:
        emit({"error": "usage: upstream.py FILE TEST_COMMAND RELOAD_COMMAND DRAIN_SECONDS"})
        sys.exit(2)
    path, test_command, reload_command, drain_seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    for line in sys.stdin.buffer:
        try:
            emit(handle(path, test_command, reload_command, drain_seconds, json.loads(line)))
        except Refused as exc:
            emit({"error": str(exc)})
        except (OSError, ValueError, AttributeError, subprocess.TimeoutExpired) as exc:
            emit({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
