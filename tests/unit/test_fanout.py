"""`igops exec` over many hosts without SSH: the live counts and the summary (igops.fanout), the
progress bar's place (a terminal's stderr only), and the command itself at 1,000 targets with
remote.run replaced, results streaming as hosts finish and the JSON counts exact."""

import io
import json
import threading
from pathlib import Path

import pytest
from rich.console import Console

from igops import fanout, remote
from igops.errors import ExitCode
from igops.output import Output

ROOT = Path(__file__).resolve().parents[2]
FLEET_1000 = ROOT / "config" / "example-1000.toml"


def result(host: str, kind: str = "ok", ms: float = 12.0) -> remote.HostResult:
    if kind == "ok":
        return remote.HostResult(host, "10.0.0.1", True, 0, "up 3 days\n", "", ms)
    if kind == "nonzero":
        return remote.HostResult(host, "10.0.0.1", False, 3, "", "no such file\n", ms)
    if kind == "timeout":
        return remote.HostResult(host, "10.0.0.1", False, None, "partial\n", "", ms, f"{remote.TIMED_OUT} 5 s")
    return remote.HostResult(host, "10.0.0.1", False, None, "", "", ms, "connection refused by 10.0.0.1:22")


def test_the_tally_counts_hosts_as_they_start_and_finish():
    tally = fanout.Tally(4)
    assert tally.counts() == "0 ok, 0 failed, 0 running"
    for _ in range(3):
        tally.started()
    tally.finished(True)
    tally.finished(False)
    assert tally.counts() == "1 ok, 1 failed, 1 running" and tally.done == 2


def test_the_tally_is_exact_with_a_thousand_hosts_over_many_threads():
    tally = fanout.Tally(1000)

    def work(indexes):
        for index in indexes:
            tally.started()
            tally.finished(index % 7 != 0)

    threads = [threading.Thread(target=work, args=(range(start, 1000, 16),)) for start in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = len([index for index in range(1000) if index % 7 == 0])
    assert (tally.ok, tally.failed, tally.running, tally.done) == (1000 - failed, failed, 0, 1000)


def test_the_summary_counts_every_kind_of_failure_exactly():
    results = (
        [result(f"app{i}") for i in range(990)]
        + [result(f"db{i}", "nonzero") for i in range(5)]
        + [result(f"cache{i}", "timeout") for i in range(3)]
        + [result(f"lb{i}", "unreachable") for i in range(2)]
    )
    summary = fanout.summarise(results)
    assert summary.counts() == {"ok": 990, "failed": 10, "exited_nonzero": 5, "timed_out": 3, "unreachable": 2}
    assert summary.line() == "990 of 1000 hosts ok; 10 failed: 5 exited non-zero, 3 timed out, 2 unreachable"
    assert summary.exit_code == ExitCode.PARTIAL


@pytest.mark.parametrize(
    "kinds,line,code",
    [
        (["ok"], "1 of 1 host ok", ExitCode.OK),
        (["ok", "ok"], "2 of 2 hosts ok", ExitCode.OK),
        (["unreachable", "unreachable"], "0 of 2 hosts ok; 2 failed: 2 unreachable", ExitCode.FAILED),
        (["ok", "timeout"], "1 of 2 hosts ok; 1 failed: 1 timed out", ExitCode.PARTIAL),
        ([], "0 of 0 hosts ok", ExitCode.OK),
    ],
)
def test_the_summary_line_and_exit_code(kinds, line, code):
    summary = fanout.summarise([result(f"h{i}", kind) for i, kind in enumerate(kinds)])
    assert summary.line() == line and summary.exit_code == code


def test_each_hosts_result_line():
    assert fanout.result_line(result("app1", ms=85.4)) == "app1: ok, exit 0 in 85 ms"
    assert fanout.result_line(result("db1", "nonzero", 90)) == "db1: FAILED, exit 3 in 90 ms"
    assert fanout.result_line(result("lb1", "unreachable")) == "lb1: FAILED, connection refused by 10.0.0.1:22"
    assert fanout.result_line(result("c1", "timeout")) == "c1: FAILED, command timed out after 5 s"
    assert fanout.output_lines(result("db1", "nonzero")) == ["db1: no such file"]
    both = remote.HostResult("h", "a", True, 0, "one\ntwo\n", "warn\n", 1.0)
    assert fanout.output_lines(both) == ["h: one", "h: two", "h: warn"]


def consoles(out: Output, err_terminal: bool, out_terminal: bool) -> tuple[io.StringIO, io.StringIO]:
    stdout, stderr = io.StringIO(), io.StringIO()
    out._out = Console(file=stdout, force_terminal=out_terminal, width=120, highlight=False)
    out._err = Console(file=stderr, force_terminal=err_terminal, width=120, highlight=False, soft_wrap=True)
    return stdout, stderr


def run_with_bar(out: Output) -> None:
    tally = fanout.Tally(3)
    with out.progress("hosts", total=3, counts=tally.counts) as advance:
        for ok in (True, True, False):
            tally.started()
            tally.finished(ok)
            advance(1)
            out.text(f"line {tally.done}")


def test_with_json_there_is_no_bar_and_no_console_is_made():
    out = Output("exec", json_mode=True)
    run_with_bar(out)
    assert out._err is None and out._out is None and not out.shows_progress()


def test_a_piped_stderr_gets_no_bar():
    out = Output("exec")
    stdout, stderr = consoles(out, err_terminal=False, out_terminal=False)
    run_with_bar(out)
    assert not out.shows_progress() and stderr.getvalue() == ""
    assert stdout.getvalue() == "line 1\nline 2\nline 3\n"


def test_a_terminal_gets_the_bar_with_its_counts_and_the_lines_above_it():
    out = Output("exec")
    stdout, stderr = consoles(out, err_terminal=True, out_terminal=True)
    run_with_bar(out)
    assert out.shows_progress()
    screen = stderr.getvalue()
    assert "2 ok, 1 failed, 0 running" in screen and "3/3" in screen
    # stdout shares the bar's terminal: its lines go through the bar's console, above the bar.
    assert "line 3" in screen and stdout.getvalue() == ""
    out.text("after")
    assert stdout.getvalue() == "after\n"


def test_with_stdout_redirected_the_lines_still_go_to_stdout_while_the_bar_shows():
    out = Output("exec")
    stdout, stderr = consoles(out, err_terminal=True, out_terminal=False)
    run_with_bar(out)
    assert "2 ok, 1 failed" in stderr.getvalue() and "line" not in stderr.getvalue()
    assert stdout.getvalue() == "line 1\nline 2\nline 3\n"


KINDS = {0: "nonzero", 1: "timeout", 2: "unreachable"}


@pytest.fixture
def fake_fleet_run(monkeypatch, tmp_path):
    """remote.run replaced: hosts finish in the reverse of the inventory's order; every 100th
    host fails (exit 3, timed out or unreachable in turn). Records what was printed meanwhile."""
    monkeypatch.setenv("IGOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(
        remote, "settings_for", lambda fleet: remote.SshSettings(tmp_path / "known_hosts", None, 5.0, 120.0, 100)
    )
    seen = {}

    def run(targets, command, settings, *, parallel=None, timeout=None, stdin=None, on_start=None, on_done=None):
        seen.update(command=command, parallel=parallel, count=len(targets))
        results = {}
        for index, target in reversed(list(enumerate(targets))):
            on_start(target)
            kind = KINDS[(index // 100) % 3] if index % 100 == 99 else "ok"
            results[target.name] = result(target.name, kind)
            on_done(results[target.name])
        return [results[target.name] for target in targets]

    monkeypatch.setattr(remote, "run", run)
    return seen


def igops(capsys, *args: str) -> tuple[int, str, str]:
    from igops.cli import main

    with pytest.raises(SystemExit) as ended:
        main(list(args))
    captured = capsys.readouterr()
    return ended.value.code, captured.out, captured.err


def test_exec_on_1000_hosts_streams_each_result_and_sums_up_exactly(fake_fleet_run, capsys):
    code, stdout, _ = igops(capsys, "-c", str(FLEET_1000), "exec", "--yes", "--", "uptime")
    assert code == ExitCode.PARTIAL and fake_fleet_run["count"] == 1000
    lines = stdout.splitlines()
    results = [line for line in lines if ": ok, exit 0" in line or ": FAILED" in line]
    assert len(results) == 1000
    # As they finished: the last host of the inventory first, each after its output.
    assert results[:2] == ["cache48: FAILED, exit 3 in 12 ms", "cache47: ok, exit 0 in 12 ms"]
    assert lines[:2] == ["cache48: no such file", "cache48: FAILED, exit 3 in 12 ms"]
    summary = lines[-1]
    assert summary == "990 of 1000 hosts ok; 10 failed: 4 exited non-zero, 3 timed out, 3 unreachable"
    # The table at the end repeats the failures alone, in the inventory's order.
    table = lines[lines.index(results[-1]) + 1 : -1]
    assert table[0].rstrip() == "failed on 10 hosts" and table[1].split() == ["host", "exit", "time", "result"]
    assert [row.split()[0] for row in table[2:]] == [
        "app92", "app192", "app292", "app392", "app492", "app592", "app692", "db46", "db146", "cache48"
    ]  # fmt: skip


def test_exec_on_1000_hosts_with_json_is_one_envelope_with_exact_counts(fake_fleet_run, capsys):
    code, stdout, stderr = igops(capsys, "-c", str(FLEET_1000), "exec", "--yes", "--json", "--", "uptime")
    envelope = json.loads(stdout)  # the whole of stdout: nothing streamed besides it
    data = envelope["data"]
    assert code == envelope["exit_code"] == ExitCode.PARTIAL
    assert (data["ok"], data["failed"], data["exited_nonzero"], data["timed_out"], data["unreachable"]) == (
        990,
        10,
        4,
        3,
        3,
    )
    assert len(data["hosts"]) == 1000 and data["hosts"][0]["host"] == "lb1"
    assert sum(host["ok"] for host in data["hosts"]) == 990
    assert "ok, exit 0" not in stderr


def test_exec_without_output_still_streams_each_result(fake_fleet_run, capsys):
    _, stdout, _ = igops(capsys, "-c", str(FLEET_1000), "exec", "--yes", "--no-output", "--role", "lb", "--", "true")
    assert fake_fleet_run["count"] == 8 and "up 3 days" not in stdout
    assert stdout.splitlines()[:2] == ["lb8: ok, exit 0 in 12 ms", "lb7: ok, exit 0 in 12 ms"]
    assert stdout.splitlines()[-1] == "8 of 8 hosts ok"


def test_exec_with_tsv_gives_every_host_a_row(fake_fleet_run, capsys):
    _, stdout, stderr = igops(
        capsys, "-c", str(FLEET_1000), "exec", "--yes", "--format", "tsv", "--role", "lb", "--", "true"
    )
    rows = stdout.splitlines()
    assert rows[0].split("\t") == ["host", "exit", "time", "result"] and len(rows) == 9
    assert "lb1: ok, exit 0" in stderr and "8 of 8 hosts ok" in stderr
