"""A move's cut-over never leaves a shard blocked with igops waiting on a server for ever, against
real PostgreSQL 15 servers: two clusters on loopback addresses of the test's own (main, the source,
with the directory; pg2, the target), the service's own DDL, real moves of a small shard.

- Another session holds the directory's row of the shard (an operator's open transaction): the map
  change waits no longer than lock_timeout, the writes are released each time, and after three
  attempts the move stops with the shard served on the source and the map unchanged; once the
  session is gone, --resume finishes the move.
- The directory hangs after the fence (the backend of the cut-over's directory session stopped, as
  one stuck on a dead disk would be: alive to its kernel, answering nothing): igops cuts it off,
  tries the switch again on new connections for a bounded time and stops, saying the shard is
  unavailable; whatever the directory then does, map and journal agree and the source stays
  fenced, and --resume finishes the move.
- The directory stops answering after the fence for a while, then takes the COMMIT igops sent:
  igops, having cut it off, finds the switch journaled on a new connection and finishes.
- The target's clock steps back after the check before the cut-over: the cut-over refuses after
  the fence, un-fences the source (the map's COMMIT was never sent) and says so.
- The pieces: a Watchdog ends a call on a stopped backend; a session deadline holds for its
  block only. And, without servers, the clock wait's logic and how the deadlines fit together.

The skew is the one stand-in: a function shadowing clock_timestamp() in the target's database,
read through its search_path, as a server whose clock is behind would answer. Events are set off
at the move's own pause points (MoveSession.pause), which is where --pause-after stops a move."""

import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from igops import inventory, shard_cutover, shard_move, shard_switch, shard_verify, shards
from igops.errors import IgopsError, RefusedError
from igops.output import Reporter
from igops.postgres_deadline import Watchdog, session_deadline
from igops.shard_locks import CUTOVER_DEADLINE
from igops.shard_move_session import MoveSession
from tests.unit import postgres_servers as servers
from tests.unit.inventories import unit_inventory

needs_postgres = servers.needs_postgres
ADDRESSES = {"db1": "127.79.0.1", "db3": "127.79.0.3"}
HOSTS = [(name, address, "postgres") for name, address in ADDRESSES.items()]
SQL = Path(__file__).resolve().parents[2] / "app" / "sql"
SECTIONS = f"""[postgres]
port = {{port}}
[postgres.clusters.main]
primary = "db1"
[postgres.clusters.pg2]
primary = "db3"
[shards]
count = 2
shard_ddl = "{SQL / "shard.sql"}"
directory_ddl = "{SQL / "directory.sql"}"
"""
SHARD, SCHEMA = 0, "insta0"  # on main, as `shard init` places it
MOVE_LIMIT_S = 120  # a whole move of the small shard here takes a few seconds


@pytest.fixture(scope="module")
def template():
    """A cluster that moves shards: logical WAL, slots and senders to spare, a bound on the WAL a
    slot holds, and TCP on the test's loopback addresses (test_shard_slot_wait's too)."""
    data = servers.template()
    with open(data / "pg_hba.conf", "a") as hba:
        hba.write("host all all 127.0.0.0/8 trust\n")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\nmax_slot_wal_keep_size = '64MB'\n"
            # test_shard_slot_wait prepares a transaction to hold a slot's creation.
            "max_prepared_transactions = 5\n"
        )
    yield data
    servers.remove(data.parent, [])


class Clusters:
    """main (db1: the source, and the directory) and pg2 (db3: the target), both started and
    initialised by `igops shard init`; `connect` opens a session of the test's own."""

    def __init__(self, tmp_path: Path, template: Path):
        self.base = servers.private_directory("igops-cutover-")
        self.port = servers.free_port(ADDRESSES.values())
        self.started: list[Path] = []
        for name, address in ADDRESSES.items():
            data = servers.copy_cluster(
                template,
                self.base / name,
                {"listen_addresses": address, "port": str(self.port), "unix_socket_directories": ""},
            )
            self.started.append(data)
            servers.start(data)
        self.fleet = inventory.load_file(unit_inventory(tmp_path, HOSTS, sections=SECTIONS.format(port=self.port)))
        shards.init_shards(self.fleet)
        with self.session("db1", "instagram") as cursor:
            cursor.execute(f"INSERT INTO {SCHEMA}.users (username) SELECT 'user' || n FROM generate_series(1, 50) n")

    def connect(self, name: str, database: str):
        import psycopg2

        connection = psycopg2.connect(
            host=ADDRESSES[name], port=self.port, user="postgres", dbname=database, connect_timeout=5
        )
        connection.autocommit = True
        return connection

    @contextmanager
    def session(self, name: str, database: str):
        connection = self.connect(name, database)
        try:
            with connection.cursor() as cursor:
                yield cursor
        finally:
            connection.close()

    def one(self, name: str, database: str, query: str, params=()):
        with self.session(name, database) as cursor:
            cursor.execute(query, params)
            return cursor.fetchone()

    def placement(self) -> str:
        return self.one("db1", "directory", "SELECT cluster FROM shard_map WHERE logical_shard = %s", (SHARD,))[0]

    def journal(self, move_id: int) -> tuple[str, str, str | None]:
        return self.one("db1", "directory", "SELECT status, step, error FROM shard_moves WHERE id = %s", (move_id,))

    def schemas(self, name: str) -> set[str]:
        with self.session(name, "instagram") as cursor:
            cursor.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"{SCHEMA}%",))
            return {row[0] for row in cursor.fetchall()}

    def write(self, name: str) -> None:
        """A write to the shard where the app would find it on `name` (it fails if fenced)."""
        with self.session(name, "instagram") as cursor:
            cursor.execute(f"INSERT INTO {SCHEMA}.users (username) VALUES (%s)", (f"after-{time.monotonic_ns()}",))


@pytest.fixture
def clusters(tmp_path, template, monkeypatch):
    monkeypatch.delenv("IGOPS_POSTGRES_PASSWORD", raising=False)
    made = None
    try:
        made = Clusters(tmp_path, template)
        yield made
    finally:
        if made is not None:
            servers.remove(made.base, made.started)


class Said(Reporter):
    """What the move says: its log lines and its steps (title, seconds, status)."""

    def __init__(self):
        self.lines: list[str] = []
        self.steps: list[tuple[str, float, str]] = []

    def log(self, message):
        self.lines.append(message)

    @contextmanager
    def step(self, title):
        started = time.monotonic()
        status = "failed"
        try:
            with super().step(title) as record:
                yield record
            status = "ok"
        finally:
            self.steps.append((title, time.monotonic() - started, status))


class InThread:
    """An igops call in a thread of its own, so that a test can stop waiting for one that hangs."""

    def __init__(self, call):
        self.result = self.error = None

        def run():
            try:
                self.result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def done_within(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()


@contextmanager
def at_pause_point(monkeypatch, point: str, action):
    """`action` run once where a move would stop with --pause-after `point`."""
    pause = MoveSession.pause
    ran = []

    def pause_and_act(session, where):
        if where == point and not ran:
            ran.append(where)
            action()
        return pause(session, where)

    monkeypatch.setattr(MoveSession, "pause", pause_and_act)
    yield ran


def start(clusters: Clusters, said: Said) -> InThread:
    plan = shards.plan_move(clusters.fleet, SHARD, "pg2")
    return InThread(lambda: shards.start_move(clusters.fleet, plan, said))


def last_move_id(clusters: Clusters) -> int:
    return clusters.one("db1", "directory", "SELECT max(id) FROM shard_moves")[0]


def switch_step(said: Said) -> tuple[str, float, str]:
    return next(step for step in said.steps if step[0].startswith("cut over:"))


def cutover_directory_session(clusters: Clusters) -> int:
    """The pid of the cut-over's directory session, holding the map change it staged."""
    return clusters.one(
        "db1",
        "postgres",
        "SELECT pid FROM pg_stat_activity WHERE datname = 'directory' AND application_name = 'igops-cutover' "
        "AND state = 'idle in transaction'",
    )[0]


def resume_finishes(clusters: Clusters, move_id: int) -> None:
    result = shards.resume_move(clusters.fleet, move_id, Reporter())
    assert result.status == "done" and clusters.placement() == "pg2"
    assert clusters.schemas("db1") == set() and clusters.schemas("db3") == {SCHEMA}
    assert clusters.one("db3", "instagram", f"SELECT count(*) FROM {SCHEMA}.users")[0] >= 50


@needs_postgres
def test_a_map_row_another_session_holds_stops_the_cut_over_in_time_and_leaves_the_shard_writable(
    clusters, monkeypatch
):
    holder = clusters.connect("db1", "directory")
    holder.autocommit = False

    def operator_locks_the_row():  # a transaction left open (after the verification: slots wait for it)
        with holder.cursor() as cursor:
            cursor.execute("SELECT cluster FROM shard_map WHERE logical_shard = %s FOR UPDATE", (SHARD,))

    said = Said()
    with at_pause_point(monkeypatch, "verified", operator_locks_the_row) as ran:
        move = start(clusters, said)
    try:
        assert move.done_within(MOVE_LIMIT_S), "the cut-over waits on the directory's lock with no end"
        assert ran == ["verified"]
        # Three attempts, each waiting lock_timeout for the row with writes held, then releasing them.
        title, seconds, status = switch_step(said)
        assert status == "failed" and seconds < 3 * (CUTOVER_DEADLINE.lock_ms / 1000 + 2)
        assert isinstance(move.error, IgopsError)
        assert move.error.message.startswith("cut-over gave up after 3 attempts: the directory rows the switch")
        assert "stayed locked by another session for over 2000 ms" in move.error.message
        assert "end the session holding them" in move.error.hint and "--resume" in move.error.hint
        # Undone: the source serves the shard, writable; the map and the journal are unchanged.
        move_id = last_move_id(clusters)
        assert clusters.schemas("db1") == {SCHEMA} and clusters.placement() == "main"
        clusters.write("db1")
        status, step, error = clusters.journal(move_id)
        assert (status, step) == ("active", "verified") and "cut-over gave up" in error
    finally:
        holder.rollback()
        holder.close()
        move.done_within(MOVE_LIMIT_S)
    resume_finishes(clusters, move_id)


@needs_postgres
def test_a_target_that_stops_in_the_verifications_write_pause_is_cut_off_and_writes_flow(clusters, monkeypatch):
    """The verification holds the source's writes while the target applies up to a mark. A target
    backend that stops running (SIGSTOP: alive to its kernel, it fires no timer) is cut off by the
    watchdog; the lock holder's transaction ends with its connection, and the move resumes."""
    monkeypatch.setattr(shard_verify, "HOLD_LIMIT_S", 3.0)
    wait_applied = shard_verify.wait_applied
    stopped = []

    def target_stops(watch, *args):
        if not stopped:
            stopped.append(watch.connection.get_backend_pid())
            os.kill(stopped[0], signal.SIGSTOP)
        return wait_applied(watch, *args)

    monkeypatch.setattr(shard_verify, "wait_applied", target_stops)
    move = start(clusters, Said())
    try:
        assert move.done_within(MOVE_LIMIT_S), "the verification waits on a stopped target with no end"
        assert isinstance(move.error, IgopsError), move.error
        assert move.error.message.startswith(
            f"a server stopped answering during the verification's write pause of {SCHEMA}: igops cut its "
            "connections after 3 s"
        )
        assert clusters.placement() == "main" and clusters.schemas("db1") == {SCHEMA}
        clusters.write("db1")  # the lock went with its connection: writes flow
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    monkeypatch.setattr(shard_verify, "wait_applied", wait_applied)
    resume_finishes(clusters, last_move_id(clusters))


@needs_postgres
def test_a_directory_that_hangs_after_the_fence_is_cut_off_and_the_map_stays_consistent(clusters, monkeypatch):
    # Shorter than in production, for the test's sake: the write hold's limit, and the retries.
    for module in (shard_cutover, shard_switch, shard_move):
        monkeypatch.setattr(module, "HOLD_LIMIT_S", 6.0)
    monkeypatch.setattr(shard_switch, "MAP_RETRY_S", 4.0)
    stopped = []

    def directory_hangs():
        pid = cutover_directory_session(clusters)
        os.kill(pid, signal.SIGSTOP)  # holding the map change it staged, answering nothing
        stopped.append(pid)

    said = Said()
    with at_pause_point(monkeypatch, "fenced", directory_hangs) as ran:
        move = start(clusters, said)
        try:
            assert move.done_within(MOVE_LIMIT_S), "the map's commit waits on a hung directory with no end"
            assert ran == ["fenced"]
            title, seconds, status = switch_step(said)
            assert status == "failed" and seconds < 6 + 4 + 2 * 3 + 5
            assert isinstance(move.error, IgopsError)
            assert move.error.message.startswith("main is fenced but the shard map could not be switched")
            assert "shard 0 is unavailable" in move.error.message
            assert "--resume" in move.error.hint and "as soon as the directory answers" in move.error.hint
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            move.done_within(MOVE_LIMIT_S)
    # Whether the stopped session's COMMIT took or the server ended it, map and journal agree,
    # and the source was not un-fenced behind a map that may name the target.
    deadline = time.monotonic() + 30
    while clusters.one("db1", "postgres", "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (stopped[0],))[0]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    move_id = last_move_id(clusters)
    status, step, _ = clusters.journal(move_id)
    assert status == "active" and (step == "switched") == (clusters.placement() == "pg2")
    assert clusters.schemas("db1") == {f"{SCHEMA}_moved_{move_id}"}
    resume_finishes(clusters, move_id)


@needs_postgres
def test_a_map_commit_whose_answer_was_lost_is_found_to_have_taken(clusters, monkeypatch):
    """The directory's session stops after the fence and runs again once igops has cut it off
    (and before the server's idle timeout ends it): the COMMIT igops sent took, its answer lost.
    A new connection finds the switch journaled and the move goes on."""
    for module in (shard_cutover, shard_switch, shard_move):
        monkeypatch.setattr(module, "HOLD_LIMIT_S", 6.0)

    def directory_stalls_for_a_while():
        pid = cutover_directory_session(clusters)
        os.kill(pid, signal.SIGSTOP)
        # Past the write hold's 6 s limit, within the 10 s the server lets a transaction sit idle.
        threading.Timer(7.5, os.kill, (pid, signal.SIGCONT)).start()

    said = Said()
    with at_pause_point(monkeypatch, "fenced", directory_stalls_for_a_while):
        move = start(clusters, said)
        assert move.done_within(MOVE_LIMIT_S)
    assert move.error is None and move.result.status == "done" and clusters.placement() == "pg2"
    assert any(line.startswith("the shard map's commit failed (no answer within 6 s") for line in said.lines)
    assert clusters.schemas("db1") == set()
    # The stopped session's own COMMIT switched the map, not a new one after the server ended it.
    assert "idle-in-transaction timeout" not in Path(f"{clusters.started[0]}.log").read_text()


@needs_postgres
def test_a_target_clock_that_steps_back_during_the_cut_over_is_refused_and_the_fence_undone(clusters, monkeypatch):
    with clusters.session("db3", "instagram") as cursor:
        cursor.execute(
            "CREATE SCHEMA skew; CREATE TABLE skew.setting (behind interval NOT NULL); "
            "INSERT INTO skew.setting VALUES ('0 s'); "
            "CREATE FUNCTION skew.clock_timestamp() RETURNS timestamptz LANGUAGE sql "
            "AS 'SELECT pg_catalog.clock_timestamp() - (SELECT behind FROM skew.setting)'; "
            'ALTER DATABASE instagram SET search_path = skew, pg_catalog, "$user", public'
        )

    def clock_steps_back():  # after the check before the cut-over, which it passed
        with clusters.session("db3", "instagram") as cursor:
            cursor.execute("UPDATE skew.setting SET behind = '3 s'")

    said = Said()
    with at_pause_point(monkeypatch, "locked", clock_steps_back):
        move = start(clusters, said)
        assert move.done_within(MOVE_LIMIT_S)
    assert isinstance(move.error, RefusedError)
    message, hint = move.error.message, move.error.hint
    assert message.startswith("db3's clock had not reached the moment db1 was fenced 1.5 s after it")
    assert message.endswith("the shard map was not switched and main was un-fenced: shard 0 is served there")
    assert hint.startswith("fix time synchronisation on db3") and hint.endswith("verifies again and cuts over")
    warning = next(line for line in said.lines if line.startswith("warning: db3's clock had not reached"))
    assert warning.endswith("un-fencing main (the shard map was not switched)")
    move_id = last_move_id(clusters)
    assert clusters.schemas("db1") == {SCHEMA} and clusters.placement() == "main"
    clusters.write("db1")
    status, step, error = clusters.journal(move_id)
    assert (status, step) == ("active", "verified") and error.startswith("db3's clock had not reached")
    with clusters.session("db3", "instagram") as cursor:
        cursor.execute("UPDATE skew.setting SET behind = '0 s'")
    resume_finishes(clusters, move_id)


@needs_postgres
def test_a_watchdog_ends_a_call_on_a_backend_that_no_longer_runs(clusters):
    """No server-side timeout or TCP keepalive ends this wait: the stopped backend runs no timer,
    and its kernel answers for it."""
    import psycopg2

    connection = clusters.connect("db1", "directory")
    pid = connection.get_backend_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with Watchdog(1.0, [connection]) as watchdog, pytest.raises(psycopg2.OperationalError):
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        assert watchdog.fired and time.monotonic() - started < 5 and connection.closed
    finally:
        os.kill(pid, signal.SIGCONT)


@needs_postgres
def test_a_session_deadline_holds_for_its_block_only(clusters):
    """On a connection that lives longer (the journal's, the move's own): the server's settings
    and the socket's TCP options, then theirs again."""
    connection = clusters.connect("db1", "directory")

    def tcp() -> tuple[int, int]:
        with socket.socket(fileno=os.dup(connection.fileno())) as duplicate:
            return (
                duplicate.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                duplicate.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )

    try:
        before = tcp()
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '7s'")
            with session_deadline(connection, CUTOVER_DEADLINE):
                cursor.execute("SHOW statement_timeout")
                assert cursor.fetchone() == ("10s",)
                cursor.execute("SHOW lock_timeout")
                assert cursor.fetchone() == ("2s",)
                assert tcp() == (4, 10_000)
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone() == ("0",)
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone() == ("7s",)
        assert tcp() == before != (4, 10_000)
    finally:
        connection.close()


# --- the logic alone ------------------------------------------------------------------------------
def test_the_clock_wait_ends_once_the_clock_has_passed_the_moment():
    readings = iter([998, 999, 1000, 1001])
    assert shard_cutover.clock_passed(1000, lambda: next(readings), 5.0) is None
    assert next(readings, None) is None  # read until past the moment, not one reading more


@pytest.mark.parametrize("budget_s", [0.0, 0.05])
def test_the_clock_wait_says_how_far_short_a_clock_that_never_passes_is(budget_s):
    reads = []

    def behind():
        reads.append(1)
        return 1000 - 1500  # 1.5 s behind, and staying there

    started = time.monotonic()
    assert shard_cutover.clock_passed(1000, behind, budget_s) == 1500
    assert reads and time.monotonic() - started < budget_s + 1  # read at least once, and given up in time


def test_the_cut_over_deadlines_fit_together():
    """What the deadlines' comments rely on, so that a change of one is checked against the rest."""
    from igops.shard_locks import HOLD_LIMIT_S, LOCK_SETTINGS, LOCK_TIMEOUT_MS

    deadline = CUTOVER_DEADLINE
    # The directory rows a cut-over changes stay locked by another move's cut-over across its wait
    # for the target's clock: waiting for them must outlast that wait.
    assert deadline.lock_ms > shard_cutover.CLOCK_WAIT_S * 1000
    # A statement with writes held ends no later than the server would end the lock session.
    assert deadline.statement_ms <= deadline.idle_in_transaction_ms
    # The watchdog is a last resort: every wait it covers ends by its own deadline first.
    assert HOLD_LIMIT_S * 1000 > 2 * deadline.statement_ms + deadline.lock_ms + shard_cutover.CLOCK_WAIT_S * 1000
    assert HOLD_LIMIT_S > deadline.keepalives_idle_s + deadline.keepalives_interval_s * deadline.keepalives_count
    assert HOLD_LIMIT_S * 1000 > deadline.tcp_user_timeout_ms
    # The lock session's settings are the deadline's, with the table lock's own shorter wait.
    assert LOCK_SETTINGS == {
        "statement_timeout": "10s",
        "lock_timeout": f"{LOCK_TIMEOUT_MS}ms",
        "idle_in_transaction_session_timeout": "10s",
        "deadlock_timeout": "50ms",
    }
    assert deadline.connection_parameters() == {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 4,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": 10_000,
    }
