"""The ledger: one JSON line per acknowledged write, flushed as it is written
so that a killed load run still leaves every acknowledgement it received."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

WRITE_OPS = ("signup", "follow", "post", "like")


class Ledger:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._handle = open(self.path, "a", encoding="utf-8")

    def record(self, op: str, sent: float, acked: float, **ids: Any) -> None:
        line = json.dumps({"op": op, **ids, "sent": round(sent, 6), "acked": round(acked, 6)}, separators=(",", ":"))
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def read_ledger(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """The ledger's write records and the number of lines that could not be
    used, such as a last line cut short by a kill."""
    records: list[dict[str, Any]] = []
    unparsable = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                unparsable += 1
                continue
            if isinstance(record, dict) and record.get("op") in WRITE_OPS:
                records.append(record)
            else:
                unparsable += 1
    return records, unparsable
