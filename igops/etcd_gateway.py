"""The few calls of etcd's v3 JSON gateway that igops' coordination (leases, the journal, the
audit) needs, over igops.http_json: members tried in turn, elections waited out, tokens renewed."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError

if TYPE_CHECKING:
    from igops.http_json import Answer

# How long one etcd request may take, over all the members it asks. A member without quorum
# answers a lease grant only after its own request timeout (about 7 s), and a hung or
# partitioned one never: a refusal should not wait that long.
REQUEST_TIMEOUT = 3.0
CONNECT_TIMEOUT = 1.0
# How long a request keeps asking while the members that answer have no leader yet. A leader
# that dies leaves the others leaderless for an election timeout (etcd's default is 1 s,
# randomised up to 2x) and a vote: requests wait in etcd meanwhile. Without quorum no leader
# comes, and a refusal then takes this long.
ELECTION_PATIENCE = 5.0
# How long a read for a person or a check waits for a leader: one election (the default
# election timeout of 1 s, randomised up to 2x), so that a leader change, as in a rolling restart
# of the members, does not turn a check UNKNOWN; past it, quorum is taken as lost.
READ_PATIENCE = 2.0


class EtcdError(IgopsError):
    """etcd answered with an error, or no member answered."""

    # Some member is up but could not serve (no leader, or no answer in time): asking again
    # after an election may succeed. False when every member refused the connection.
    transient = False


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    prefix: str
    lease_ttl: int = 10
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password: str | None = None


class EtcdGateway:
    """The few calls of etcd's v3 JSON gateway igops needs. Members are tried in turn; the
    last that answered is asked first next time."""

    def __init__(self, settings: EtcdSettings, patience: float = ELECTION_PATIENCE, member_copy: bool = False):
        from igops.http_json import JsonClient

        self.settings = settings
        self.patience = patience
        self.member_copy = member_copy
        self._client = JsonClient(settings.ca_file, settings.cert_file, settings.key_file)
        self._first = 0
        self._token: str | None = None
        self._lock = threading.Lock()

    def for_reading(self, member_copy: bool = False) -> EtcdGateway:
        """A gateway for what a reading command shows, which waits for a leader no longer than one
        election. With `member_copy`, ranges are etcd's serializable reads, which any member
        answers at once from its own copy, without a leader: what the cluster held, less any last
        writes that member had not received when quorum was lost."""
        reader = EtcdGateway(self.settings, patience=0 if member_copy else READ_PATIENCE, member_copy=member_copy)
        reader._token = self._token  # issuing a token needs a leader too
        return reader

    def call(
        self, path: str, body: dict[str, Any], timeout: float | None = None, patience: float | None = None
    ) -> dict[str, Any]:
        """POST to the first member that answers; `timeout` is per member (default: an equal
        share of REQUEST_TIMEOUT, at least 1 s). While members are up but leaderless, ask
        again until `patience` seconds (the gateway's own by default) have passed since the
        first try."""
        timeout = timeout or max(1.0, REQUEST_TIMEOUT / len(self.settings.endpoints))
        give_up = time.monotonic() + (self.patience if patience is None else patience)
        while True:
            try:
                return self._call_once(path, body, timeout)
            except EtcdError as exc:
                if not exc.transient or time.monotonic() >= give_up:
                    raise
            time.sleep(0.2)

    def _call_once(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self.settings.user and self._token is None:
            self._authenticate()
        try:
            return self._post(path, body, timeout)
        except EtcdError as exc:
            if self.settings.user and "auth" in str(exc) and "token" in str(exc):
                self._authenticate()  # tokens expire; one fresh try
                return self._post(path, body, timeout)
            raise

    def _authenticate(self) -> None:
        self._token = None
        answer = self._post(
            "/v3/auth/authenticate",
            {"name": self.settings.user, "password": self.settings.password or ""},
            max(1.0, REQUEST_TIMEOUT / len(self.settings.endpoints)),
        )
        self._token = answer.get("token")

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        from igops.http_json import HttpFailure

        failures = []
        transient = False
        count = len(self.settings.endpoints)
        for step in range(count):
            index = (self._first + step) % count
            url = self.settings.endpoints[index] + path
            headers = {"Authorization": self._token} if self._token else {}
            try:
                response = self._client.post(
                    url, body, headers=headers, connect_timeout=CONNECT_TIMEOUT, timeout=timeout
                )
            except HttpFailure as exc:
                failures.append(f"{self.settings.endpoints[index]}: {exc}")
                transient = transient or exc.timed_out
                continue
            data = _json(response)
            error = data.get("error") or data.get("message")
            if response.status >= 500 or (error and _member_cannot_serve(error)):
                failures.append(f"{self.settings.endpoints[index]}: {error or f'HTTP {response.status}'}")
                transient = True
                continue
            if response.status != 200 or error:
                raise EtcdError(f"etcd {path}: {error or f'HTTP {response.status}'}")
            with self._lock:
                self._first = index
            return data
        error = EtcdError("; ".join(failures))
        error.transient = transient
        raise error

    def put(self, key: str, value: str) -> None:
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def get_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """Every (key, value) under the prefix, in key order."""
        body: dict[str, Any] = {"key": b64(prefix), "range_end": b64(prefix_end(prefix))}
        if self.member_copy:
            body["serializable"] = True
        answer = self.call("/v3/kv/range", body)
        return [(unb64(kv["key"]), unb64(kv.get("value", ""))) for kv in answer.get("kvs", [])]

    def close(self) -> None:
        self._client.close()


def _member_cannot_serve(error: str) -> bool:
    """Errors another member may not have: this one has no leader or timed out waiting."""
    return any(
        words in error
        for words in ("no leader", "timed out", "leader changed", "not capable", "too many requests", "unhealthy")
    )


def _json(response: Answer) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {"error": response.text[:200] or f"HTTP {response.status}"}
    return data if isinstance(data, dict) else {}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with `prefix` (etcd's range_end)."""
    data = bytearray(prefix.encode())
    data[-1] += 1
    return data.decode()
