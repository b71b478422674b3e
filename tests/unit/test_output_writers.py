"""The output boundary's other writers: the Nagios status line, and the question asked before
a change."""

import io
import sys

import pytest

from igops import safety
from igops.errors import NagiosStatus, UsageError
from igops.output import Output
from tests.conftest import run_igops


@pytest.fixture
def registered_secrets(monkeypatch):
    from igops import secrets

    monkeypatch.setattr(secrets, "_registered", set())
    return secrets


def test_nagios_mode_puts_the_status_line_alone_on_stdout(capsys, registered_secrets):
    registered_secrets.register("s3cr3t-value")
    out = Output("check", nagios=True)
    out.table(None, ["check"], [["ssh"]])
    out.text("a line for people")
    out.nagios_status("IGOPS CRITICAL - db1: s3cr3t-value | 'checks'=1;;;0")
    out.log("to stderr")
    captured = capsys.readouterr()
    assert captured.out == "IGOPS CRITICAL - db1: *** | 'checks'=1;;;0\n"
    assert "to stderr" in captured.err


def test_check_nagios_unknown_is_one_line_and_exit_3(tmp_path):
    result = run_igops("-c", str(tmp_path / "missing.toml"), "check", "--nagios")
    assert result.returncode == NagiosStatus.UNKNOWN
    assert result.stdout == (
        f"IGOPS UNKNOWN - inventory not found: {tmp_path / 'missing.toml'} (from --config) — "
        "pass --config FILE, set IGOPS_CONFIG, or create /etc/igops/igops.toml\n"
    )
    assert result.stderr == ""


def test_the_question_goes_to_stderr_and_the_answer_comes_from_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    assert Output("exec").ask("Run `true` on 2 hosts? [y/N] ") == "yes\n"
    captured = capsys.readouterr()
    assert captured.err == "Run `true` on 2 hosts? [y/N] " and captured.out == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "confirmed"), [("y\n", True), ("YES\n", True), ("n\n", False), ("\n", False)])
def test_confirm_asks_through_the_output(monkeypatch, answer, confirmed):
    monkeypatch.setattr(sys, "stdin", Terminal(answer))
    asked = []

    def ask(question: str) -> str:
        asked.append(question)
        return sys.stdin.readline()

    assert safety.confirm("Delete group g1?", False, ask) is confirmed
    assert asked == ["Delete group g1? [y/N] "]


def test_confirm_refuses_without_a_terminal_and_asks_nothing_with_yes(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    never = pytest.fail
    assert safety.confirm("Go?", True, never) is True
    with pytest.raises(UsageError, match="stdin is not a terminal"):
        safety.confirm("Go?", False, never)


def test_the_prompt_bytes_through_a_terminal(tmp_path):
    """The real CLI on a pseudo-terminal: the prompt is the plan's title, ` [y/N] `, on stderr."""
    from tests.unit.test_cli import inventory, run_with_a_terminal

    result = run_with_a_terminal(["-c", str(inventory(tmp_path)), "exec", "--", "true"], "n\n")
    prompt = next(line for line in result.stderr.splitlines() if "[y/N]" in line)
    assert prompt.startswith("Run `true` on 2 hosts (") and prompt.endswith(
        " at a time)? [y/N] error: "
        "not confirmed: nothing was changed — "
        "answer y to go ahead, or pass --yes "
        "after reviewing the plan"
    )
    assert "[y/N]" not in result.stdout


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize("width", [30, 80, 400])
@pytest.mark.parametrize("is_result", [False, True])
def test_a_plan_printed_at_once_reads_as_printed_a_line_at_a_time(terminal, width, is_result, registered_secrets):
    """The plan is one print (cheaper at a step per host); the text is what a print per line gave."""
    from rich.console import Console

    from igops.output import _escape

    registered_secrets.register("s3cr3t-value")
    title = "Run `sh -c 'echo [x]'` on 3 hosts"
    steps = ["web1 (root@10.0.0.1:22): echo '[bold]x[/bold]' s3cr3t-value", "", "  x" * 30, "ünï [" * 9, "end\\"]
    notes = ["a note [y]"]

    def console(file: io.StringIO) -> Console:
        return Console(file=file, force_terminal=terminal, width=width, highlight=False, soft_wrap=not is_result)

    expected, printed = io.StringIO(), io.StringIO()
    former = console(expected)
    former.print(f"[bold]{_escape(title)}[/bold]")
    for number, step in enumerate(steps, 1):
        former.print(f"  {number}. {_escape(step.replace('s3cr3t-value', '***'))}")
    former.print(f"  note: {_escape(notes[0])}")
    out = Output("exec")
    out._out = out._err = console(printed)
    out.plan(title, steps, is_result=is_result, notes=notes)
    assert printed.getvalue() == expected.getvalue() and "s3cr3t-value" not in printed.getvalue()


def test_colons_in_what_igops_prints_are_never_read_as_emoji_codes(capsys):
    """An endpoint (`/api/photos/:id: …`), an address or a time with colons prints as written:
    rich would turn `:id:` into an emoji."""
    out = Output("deploy")
    out.text("GET /api/photos/:id: p50 154 ms; db1:5432:main")
    out.err.print("GET /api/photos/:id: 5xx")
    captured = capsys.readouterr()
    assert "/api/photos/:id: p50" in captured.out and "db1:5432:main" in captured.out
    assert "/api/photos/:id: 5xx" in captured.err


def test_a_table_cell_is_markup_only_where_it_has_some_and_never_emoji(capsys):
    """Cells may carry markup (a status in colour); a cell without any is printed as written,
    colons and all, and one whose brackets are not markup too."""
    out = Output("deploy")
    out.table(
        None, ["host", "detail"], [["app1", "GET /api/photos/:id: 5xx"], ["app2", "[bold]ok[/bold]"], ["app3", "a [b"]]
    )
    printed = capsys.readouterr().out
    assert "GET /api/photos/:id: 5xx" in printed
    assert "app2  ok" in printed and "[bold]" not in printed
    assert "a [b" in printed
