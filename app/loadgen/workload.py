"""The load run: a setup phase, then a mixed workload on an open-loop schedule.

Request i of the timed phase is due at start + i / rate whether or not earlier
ones have finished, and its latency is measured from that due time, so a
server that stalls shows long latencies rather than a politely slower client.
Every acknowledged write goes to the ledger at once for `verify`.
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from app.loadgen.client import ApiClient, ApiResponse, LoadgenError, split_base_url
from app.loadgen.ledger import Ledger
from app.loadgen.report import LatencySummary, Report, longest_covered_interval, longest_gap

WRITE_MIX = {"post": 0.40, "like": 0.45, "follow": 0.15}
READ_MIX = {"feed": 0.50, "photo": 0.30, "image": 0.10, "user": 0.10}
FOLLOWS_PER_USER = 5
# likes and reads go to recent photos, as real traffic does
RECENT_PHOTOS = 2000
FEED_READ_LIMIT = 20
IMAGE_BYTES = (200, 2000)
JPEG_MAGIC = b"\xff\xd8\xff\xe0"


@dataclass
class User:
    id: int
    token: str


@dataclass
class Sample:
    op: str
    write: bool
    due: float
    sent: float
    done: float
    error_kind: str | None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.due) * 1000


class _Run:
    """State shared by the worker threads of one load run."""

    def __init__(self, url: str, ledger: Ledger, timeout: float, seed: int | None):
        self.url = url
        self.ledger = ledger
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.users: list[User] = []
        self.photos: list[int] = []
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.write_errors = 0
        self.writes_acked = 0
        self.ops: dict[str, Counter[str]] = {}
        self.local = threading.local()
        self.stop = threading.Event()
        self.interrupted = False

    def client(self) -> ApiClient:
        client = getattr(self.local, "client", None)
        if client is None:
            client = self.local.client = ApiClient(self.url, self.timeout)
        return client

    def call(
        self,
        op: str,
        write: bool,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        expect_json: bool = True,
        required: tuple[str, ...] = (),
    ) -> tuple[ApiResponse, float, float]:
        sent_wall = time.time()
        response = self.client().request(method, path, body=body, token=token, expect_json=expect_json)
        acked_wall = time.time()
        # a 2xx without the ids to record is no acknowledgement
        if (
            response.ok
            and required
            and not (isinstance(response.payload, dict) and response.payload.keys() >= set(required))
        ):
            response = ApiResponse(status=response.status, error="bad_response")
        with self.lock:
            self.requests += 1
            counts = self.ops.setdefault(op, Counter(ok=0, errors=0))
            if response.ok:
                counts["ok"] += 1
                if write:
                    self.writes_acked += 1
            else:
                counts["errors"] += 1
                self.errors[response.error_kind] += 1
                if write:
                    self.write_errors += 1
        return response, sent_wall, acked_wall

    def random_image(self, rng: random.Random) -> str:
        return base64.b64encode(JPEG_MAGIC + rng.randbytes(rng.randint(*IMAGE_BYTES))).decode()

    # -- operations; each returns the error kind, or None on success

    def sign_up(self, username: str) -> str | None:
        response, sent, acked = self.call(
            "signup", True, "POST", "/api/users", {"username": username}, required=("id", "token")
        )
        if not response.ok:
            return response.error_kind
        user = User(id=response.payload["id"], token=response.payload["token"])
        self.ledger.record("signup", sent, acked, user_id=user.id, username=username)
        with self.lock:
            self.users.append(user)
        return None

    def follow(self, follower: User, followee: User) -> str | None:
        response, sent, acked = self.call(
            "follow", True, "POST", "/api/follow", {"user_id": followee.id}, follower.token
        )
        if response.ok:
            self.ledger.record("follow", sent, acked, user_id=follower.id, followee_id=followee.id)
        return response.error_kind

    def post(self, rng: random.Random) -> str | None:
        user = rng.choice(self.users)
        body = {"caption": f"load {rng.getrandbits(32):08x}", "image_base64": self.random_image(rng)}
        response, sent, acked = self.call(
            "post", True, "POST", "/api/photos", body, user.token, required=("id", "s3_key")
        )
        if response.ok:
            photo_id = response.payload["id"]
            self.ledger.record(
                "post", sent, acked, photo_id=photo_id, user_id=user.id, s3_key=response.payload["s3_key"]
            )
            with self.lock:
                self.photos.append(photo_id)
        return response.error_kind

    def like(self, rng: random.Random, photo_id: int) -> str | None:
        user = rng.choice(self.users)
        response, sent, acked = self.call("like", True, "POST", f"/api/photos/{photo_id}/like", token=user.token)
        if response.ok:
            self.ledger.record("like", sent, acked, photo_id=photo_id, user_id=user.id)
        return response.error_kind

    def read(self, op: str, path: str, token: str | None = None, expect_json: bool = True) -> str | None:
        return self.call(op, False, "GET", path, token=token, expect_json=expect_json)[0].error_kind

    def recent_photo(self, rng: random.Random) -> int | None:
        with self.lock:
            if not self.photos:
                return None
            return rng.choice(self.photos[-RECENT_PHOTOS:])

    def mixed_op(self, rng: random.Random, write_ratio: float) -> tuple[str, bool, Callable[[], str | None]]:
        if rng.random() < write_ratio:
            op = rng.choices(list(WRITE_MIX), weights=list(WRITE_MIX.values()))[0]
        else:
            op = rng.choices(list(READ_MIX), weights=list(READ_MIX.values()))[0]
        photo_id = self.recent_photo(rng)
        if photo_id is None and op in ("like", "photo", "image"):
            # nothing to like or read yet: the first photos have to be posted
            op = "post"
        if op == "post":
            return op, True, lambda: self.post(rng)
        if op == "like":
            return op, True, lambda: self.like(rng, photo_id)
        if op == "follow":
            follower, followee = rng.sample(self.users, 2)
            return op, True, lambda: self.follow(follower, followee)
        if op == "feed":
            token = rng.choice(self.users).token
            return op, False, lambda: self.read(op, f"/api/feed?limit={FEED_READ_LIMIT}", token)
        if op == "photo":
            return op, False, lambda: self.read(op, f"/api/photos/{photo_id}")
        if op == "image":
            return op, False, lambda: self.read(op, f"/api/photos/{photo_id}/image", expect_json=False)
        user_id = rng.choice(self.users).id
        return op, False, lambda: self.read(op, f"/api/users/{user_id}")


def _setup(run: _Run, users: int, concurrency: int) -> int:
    """Creates the users and a follow graph; returns how many follows were made."""
    prefix = f"lg{os.urandom(4).hex()}"
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(run.sign_up, [f"{prefix}_{i}" for i in range(users)]))
    if len(run.users) < 2:
        raise LoadgenError(f"setup created {len(run.users)} of {users} users; errors: {dict(run.errors) or 'none'}")
    pairs = []
    for follower in run.users:
        others = [user for user in run.users if user is not follower]
        pairs += [(follower, followee) for followee in run.rng.sample(others, min(FOLLOWS_PER_USER, len(others)))]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda pair: run.follow(*pair), pairs))
    return sum(1 for outcome in outcomes if outcome is None)


def _timed_phase(
    run: _Run, rate: float, duration: float, write_ratio: float, concurrency: int, seed: int | None
) -> tuple[list[Sample], float, float]:
    total = int(rate * duration)
    samples: list[Sample] = []
    next_index = [0]
    start = time.monotonic() + 0.05

    def worker(worker_seed: int) -> None:
        rng = random.Random(worker_seed)
        while not run.stop.is_set():
            with run.lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= total:
                return
            due = start + index / rate
            delay = due - time.monotonic()
            if delay > 0 and run.stop.wait(delay):
                return
            op, write, action = run.mixed_op(rng, write_ratio)
            sent = time.monotonic()
            error_kind = action()
            sample = Sample(op=op, write=write, due=due, sent=sent, done=time.monotonic(), error_kind=error_kind)
            with run.lock:
                samples.append(sample)

    seeds = random.Random(seed).sample(range(1 << 30), concurrency)
    threads = [threading.Thread(target=worker, args=(worker_seed,), daemon=True) for worker_seed in seeds]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        run.interrupted = True
        run.stop.set()
        for thread in threads:
            thread.join(run.timeout + 1)
    return samples, start, time.monotonic()


def run_load(
    url: str,
    rate: float,
    duration: float,
    ledger: str | os.PathLike[str],
    users: int = 50,
    write_ratio: float = 0.7,
    concurrency: int = 16,
    timeout: float = 10.0,
    seed: int | None = None,
    stop: threading.Event | None = None,
) -> Report:
    """Run the workload against `url` (e.g. http://127.0.10.10) and return
    its report. `stop`, once set, ends the timed phase before `duration` (a
    caller that has done what it ran the load for). Raises LoadgenError on bad
    arguments or when setup cannot create at least two users."""
    split_base_url(url)
    if rate <= 0 or duration <= 0:
        raise LoadgenError("rate and duration must be positive")
    if users < 2:
        raise LoadgenError("at least two users are needed")
    if not 0.0 <= write_ratio <= 1.0:
        raise LoadgenError("write ratio must be within 0..1")
    if concurrency < 1:
        raise LoadgenError("concurrency must be at least 1")

    ledger_writer = Ledger(ledger)
    run = _Run(url, ledger_writer, timeout, seed)
    if stop is not None:
        run.stop = stop
    try:
        setup_follows = _setup(run, users, concurrency)
        samples, phase_start, phase_end = _timed_phase(run, rate, duration, write_ratio, concurrency, seed)
    finally:
        ledger_writer.close()

    elapsed = max(phase_end - phase_start, 1e-9)
    writes = [s for s in samples if s.write]
    return Report(
        url=url,
        ledger=ledger_writer.path,
        target_rate=rate,
        duration_s=round(elapsed, 3),
        setup_users=len(run.users),
        setup_follows=setup_follows,
        requests=run.requests,
        errors=sum(run.errors.values()),
        errors_by_kind=dict(run.errors),
        writes_acked=run.writes_acked,
        write_errors=run.write_errors,
        achieved_rate=round(len(samples) / elapsed, 2),
        writes_per_s=round(sum(1 for s in writes if s.error_kind is None) / elapsed, 2),
        latency=LatencySummary.of(s.latency_ms for s in samples),
        write_latency=LatencySummary.of(s.latency_ms for s in writes),
        read_latency=LatencySummary.of(s.latency_ms for s in samples if not s.write),
        longest_write_gap_s=round(
            longest_gap((s.done for s in writes if s.error_kind is None), phase_start, phase_end), 3
        ),
        longest_write_failure_s=round(
            longest_covered_interval((s.sent, s.done) for s in writes if s.error_kind is not None), 3
        ),
        ops={op: dict(counts) for op, counts in sorted(run.ops.items())},
        interrupted=run.interrupted,
    )
