"""The single output boundary.

People get rich tables on stdout and numbered steps, progress bars and logs on stderr. With
`--json`, stdout carries exactly one JSON envelope and nothing else (with `--watch`, one per
line, a refresh each). `--format plain` draws no rules; `--format tsv` puts only tab-separated
rows on stdout and sends the sentences to stderr. With `--nagios` (`igops check`), stdout is
the plugin's one status line (`NagiosWriter`) and nothing else. A question to the person
running igops (the confirmation before a change) is asked here too, on stderr. Domain modules
never print: they report through a `Reporter`, which this module implements for the CLI.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from igops.errors import IgopsError
from igops.secrets import redact, redact_data
from igops.tables import Column

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Task
    from rich.text import Text


@dataclass
class StepRecord:
    number: int  # the plan's step number; 0 for work done before the plan (shown as [pre])
    title: str
    status: str = "running"
    duration_ms: float | None = None
    detail: str | None = None


class Reporter:
    """What domain code may tell the person running it. The base class stays silent."""

    @contextmanager
    def step(self, title: str) -> Iterator[StepRecord]:
        yield StepRecord(0, title)

    def log(self, message: str) -> None:
        pass

    def fact(self, **fields: Any) -> None:
        """Something the run learned that a resume needs (the id of the shard move it started).
        Only an operation's reporter keeps it: in the operation's journal."""

    @contextmanager
    def recovery(self) -> Iterator[None]:
        """Steps that put things back (RESUME a pooler, hosts back in rotation): an operation
        that must stop (its lease lost) still runs them."""
        yield

    @contextmanager
    def progress(
        self, description: str, total: float | None, unit: str = "", counts: Callable[[], str] | None = None
    ) -> Iterator[Any]:
        yield lambda advance: None


class NagiosWriter:
    """The Nagios plugin convention (`check --nagios`): stdout is one line, `IGOPS STATE - TEXT |
    PERFDATA` (igops.checks.nagios makes it), redacted, and nothing else; the exit code is the
    state's 0/1/2/3."""

    def status(self, line: str) -> None:
        sys.stdout.write(redact(line) + "\n")
        sys.stdout.flush()


class Output(Reporter):
    def __init__(
        self,
        command: str,
        json_mode: bool = False,
        verbose: bool = False,
        table_format: str = "table",
        wide: bool = False,
        nagios: bool = False,
    ):
        self.command = command
        self.json_mode = json_mode
        # --nagios: the status line is stdout's alone; tables and result lines print nothing.
        self.nagios = NagiosWriter() if nagios else None
        self.verbose = verbose
        self.table_format = table_format  # 'table', 'plain' or 'tsv' (--format)
        self.wide = wide  # every column, even where the terminal is too narrow
        self._tsv_tables = 0  # tables written as TSV so far: the next is one empty line apart
        self.steps: list[StepRecord] = []
        # A command that shows a plan (one with --dry-run) numbers its steps as the plan does:
        # the probes before the plan are [pre], and the plan's step k is [k] on screen.
        self.shows_plan = False
        self.plan_shown = False
        self.planned: dict[str, Any] | None = None  # the plan shown: the envelope's "plan", for every command
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self._out: Console | None = None
        self._err: Console | None = None
        self._above_bar: Console | None = None  # while a progress bar shares stdout's terminal

    @property
    def out(self) -> Console:
        if self._out is None:
            from rich.console import Console

            self._out = Console(highlight=False, emoji=False)
            if not self._out.is_terminal:
                # Piped or captured output is read by programs: never truncate or wrap it.
                self._out.width = 400
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
        return self._err

    # --- progress and logs: stderr, in every mode -------------------------------------------
    def log(self, message: str) -> None:
        self.err.print(redact(message), markup=False)

    @contextmanager
    def step(self, title: str) -> Iterator[StepRecord]:
        before_plan = self.shows_plan and not self.plan_shown
        number = 0 if before_plan else sum(1 for step in self.steps if step.number) + 1
        record = StepRecord(number, redact(title))
        self.steps.append(record)
        started = time.monotonic()
        shown_below = False
        label = f"[{record.number}]" if record.number else "[pre]"
        self.err.print(f"[bold]{_escape(label)}[/bold] {_escape(record.title)} …")
        try:
            yield record
        except BaseException as exc:
            record.status = "failed"
            # An igops error leaving a step is the command's error line, said once on screen
            # right after; the record (--json) keeps it as the step's detail too.
            shown_below = record.detail is None and isinstance(exc, IgopsError)
            record.detail = record.detail or redact(str(exc))[:300]
            raise
        else:
            if record.status == "running":
                record.status = "ok"
        finally:
            record.duration_ms = round((time.monotonic() - started) * 1000, 1)
            colour = {"ok": "green", "failed": "red"}.get(record.status, "yellow")
            detail = f" — {_escape(record.detail)}" if record.detail and not shown_below else ""
            self.err.print(f"    [{colour}]{record.status}[/{colour}] ({_format_ms(record.duration_ms)}){detail}")

    def shows_progress(self) -> bool:
        """A progress bar is for a person: on stderr when it is a terminal, never with --json
        (nor when stderr is piped or captured, where it would be noise in a log)."""
        return not self.json_mode and self.err.is_terminal

    @contextmanager
    def progress(
        self, description: str, total: float | None, unit: str = "", counts: Callable[[], str] | None = None
    ) -> Iterator[Any]:
        """A transient bar on stderr while the body runs; it yields `advance(n)`, which pool
        threads may call. `counts`, read at each refresh, is shown after done/total ("630 ok,
        10 failed, 100 running"). While the bar is up, result lines for people (`text`) that
        would share its terminal print above it instead of through it."""
        if not self.shows_progress():
            yield lambda advance: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.text import Text

        class RateAndTimeLeft(ProgressColumn):
            """rich's own rate column counts decimal MB; every size igops prints is binary."""

            def render(self, task: Task) -> Text:
                return Text(
                    rate_and_time_left(task.finished_speed or task.speed, task.time_remaining),
                    style="progress.data.speed",
                )

        class Counts(ProgressColumn):
            def render(self, task: Task) -> Text:
                return Text(counts() if counts else "")

        # Bytes: done/total, rate and time left, in binary units (MiB, MiB/s) like every size shown.
        columns: list[ProgressColumn] = (
            [DownloadColumn(binary_units=True), RateAndTimeLeft()] if unit == "bytes" else [MofNCompleteColumn()]
        )
        if counts:
            columns.append(Counts())
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            *columns,
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            # stdout on the bar's terminal: a line printed there directly would be drawn over.
            self._above_bar = self.err if self.out.is_terminal else None
            try:
                yield lambda advance: bar.advance(task, advance)
            finally:
                self._above_bar = None

    # --- results: stdout ----------------------------------------------------------------------
    def table(self, title: str | None, columns: Sequence[Column | str], rows: list[list[Any]]) -> None:
        """A table on stdout (nothing in JSON mode). A plain string column is an identifier:
        shown whole and never hidden; see igops.tables.Column for free text and secondary ones."""
        if self.json_mode or self.nagios:
            return
        from igops import tables

        spec = tables.columns_of(columns)
        if self.table_format == "tsv":
            cells = [[_markup(redact(_cell(value, none=""))).plain for value in row] for row in rows]
            lines = tables.tsv_lines(spec, cells)
            self.out.file.write("\n" * bool(self._tsv_tables) + "".join(line + "\n" for line in lines))
            self.out.file.flush()
            self._tsv_tables += 1
            return
        self._print_table(title, spec, [[_markup(redact(_cell(value))) for value in row] for row in rows])

    def _print_table(self, title: str | None, spec: list[Column], texts: list[list[Text]]) -> None:
        from rich import box
        from rich.segment import Segments
        from rich.table import Table
        from rich.text import Text

        from igops import tables

        # Piped output is read by programs (grep, awk, cut): columns apart by spaces, no
        # box-drawing characters, as without colour; and nothing hidden or wrapped.
        terminal = self.out.is_terminal
        ruled = terminal and self.table_format == "table"
        fit = tables.layout(
            spec,
            [[text.plain for text in row] for row in texts],
            self.out.width if terminal else None,
            ruled,
            wide=self.wide,
        )
        table = Table(
            title=Text(redact(title)) if title else None,
            title_justify="left",
            show_edge=False,
            pad_edge=False,
            box=box.HEAVY_HEAD if ruled else None,
        )
        for index, width in zip(fit.shown, fit.widths, strict=False):
            table.add_column(Text(spec[index].name), width=width, no_wrap=not spec[index].wrap, overflow="fold")
        for row in texts:
            table.add_row(*(row[index] for index in fit.shown))
        if fit.total <= self.out.width:
            self.out.print(table)
        else:
            # Wider than the terminal even so: print it whole and let the terminal fold the lines,
            # rather than cut an identifier (a folded line still copies as one).
            self.out.print(Segments(self.out.render(table, self.out.options.update(width=fit.total))), crop=False)
        if fit.hidden:
            self.out.print(Text(tables.hidden_note(fit.hidden, self.out.width), style="dim"))

    def text(self, message: str) -> None:
        """A line of the result for people: on stdout, except with --format tsv, whose stdout
        is the rows alone (then stderr); nothing in JSON or Nagios mode."""
        if not self.json_mode and not self.nagios:
            console = self._above_bar or (self.err if self.table_format == "tsv" else self.out)
            console.print(redact(message), markup=False, highlight=False)

    def nagios_status(self, line: str) -> None:
        """`--nagios`: the plugin's status line, the whole of stdout."""
        (self.nagios or NagiosWriter()).status(line)

    def ask(self, question: str) -> str:
        """Ask the person at the terminal: the question on stderr (stdout is the result's), the
        answer a line of stdin."""
        sys.stderr.write(redact(question))
        sys.stderr.flush()
        return sys.stdin.readline()

    def plan(self, title: str, steps: list[str], is_result: bool = False, notes: Sequence[str] = ()) -> None:
        """The exact steps a mutating command will run, numbered as the run numbers them, then
        its notes (rules it follows, what it found), unnumbered. On stderr before a real run; on
        stdout when the plan is the result (a dry run), so `--dry-run > plan.txt` keeps it, except
        in JSON mode, where stdout is the envelope's alone (and the envelope has the plan)."""
        console = self.out if is_result and not self.json_mode else self.err
        self.plan_shown = True
        self.planned = {
            "title": redact(title),
            "steps": [redact(step) for step in steps],
            "notes": [redact(note) for note in notes],
        }
        # One print for the whole plan: printed a line at a time, a plan of a step per host (exec
        # on 1,000 hosts) cost about three times the client CPU, the same text.
        console.print(
            "\n".join(
                [
                    f"[bold]{_escape(redact(title))}[/bold]",
                    *(f"  {number}. {_escape(redact(step))}" for number, step in enumerate(steps, 1)),
                    *(f"  note: {_escape(redact(note))}" for note in notes),
                ]
            )
        )

    def envelope(self, data: Any, exit_code: int, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "command": self.command,
            "ok": exit_code == 0,
            "exit_code": int(exit_code),
            "started_at": self.started_at.isoformat(timespec="milliseconds"),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            "data": to_jsonable(data),
            "plan": self.planned,
            "steps": [asdict(step) for step in self.steps],
            "error": error,
        }

    def finish(
        self, data: Any, exit_code: int = 0, error: dict[str, Any] | None = None, one_line: bool = False
    ) -> None:
        if self.json_mode:
            # Redacted before serialising: json.dumps escapes what a secret may hold (`"`, `\`,
            # non-ASCII), and the escaped form would no longer match it.
            text = json.dumps(
                redact_data(to_jsonable(self.envelope(data, exit_code, error))), indent=None if one_line else 2
            )
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def fail(self, line: str, exit_code: int, error: dict[str, Any], data: Any = None) -> None:
        """A one-line error on stderr and, with --json, the envelope carrying it (and `data`,
        what the command found all the same, if anything)."""
        self.err.print(f"[red]error:[/red] {_escape(redact(line))}")
        self.finish(
            data, exit_code, {key: redact(value) if isinstance(value, str) else value for key, value in error.items()}
        )

    def watch(
        self, every: float, show: Callable[[], tuple[Any, int]], sleep: Callable[[float], None] = time.sleep
    ) -> None:
        """Run `show` (it prints and returns its data and exit code) every `every` seconds until
        Ctrl-C, like `watch` or `patronictl list -W`. On a terminal each refresh replaces the
        last; otherwise they follow one another, each under a heading line (TSV: one empty line
        apart). With --json, one envelope per refresh, one per line. Ctrl-C ends it normally."""
        redraw = self.out.is_terminal and not self.json_mode and self.table_format != "tsv"
        try:
            while True:
                self.steps, self.started = [], time.monotonic()
                self.started_at = datetime.now(UTC)
                heading = (
                    f"every {every:g} s: igops {self.command}    "
                    f"{self.started_at:%Y-%m-%d %H:%M:%S} UTC    (Ctrl-C stops)"
                )
                if redraw:
                    # Drawn off screen, then swapped in at once: the screen is never blank while
                    # the next refresh is read.
                    with self.out.capture() as screen:
                        self.out.print(heading, markup=False, highlight=False, style="dim")
                        data, code = show()
                    self.out.clear()
                    self.out.file.write(screen.get())
                    self.out.file.flush()
                else:
                    if not self.json_mode and self.table_format != "tsv":
                        self.text(heading)
                    data, code = show()
                self.finish(data, code, one_line=True)
                sleep(every)
        except KeyboardInterrupt:
            return


def rate_and_time_left(bytes_per_second: float | None, seconds_left: float | None) -> str:
    """A transfer's rate in binary units and its time left: "12.5 MiB/s, 3:07 left"."""
    if bytes_per_second is None:
        return "measuring the rate"
    value, unit = float(bytes_per_second), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    rate = f"{value:.0f} B/s" if unit == "B" else f"{value:.1f} {unit}/s"
    if seconds_left is None:
        return f"{rate}, time left unknown"
    minutes, seconds = divmod(round(seconds_left), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{rate}, {f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'} left"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """ "1 host", "2 hosts": a count and its noun, agreeing."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def human_bytes(value: int | float | None) -> str:
    """1536 -> "1.5 KiB"; None (not known) -> "-"."""
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


def to_jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {key: to_jsonable(item) for key, item in asdict(value).items()}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _cell(value: Any, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def _markup(text: str) -> Text:
    """A cell as rich Text: cells may carry markup (a status in colour); text that is not valid
    markup is taken as it is. Never emoji codes: the consoles print none either."""
    from rich.errors import MarkupError
    from rich.text import Text

    if "[" not in text:
        # No markup: most cells. Parsing each one took 0.3-0.4 s of a 1,000-host table.
        return Text(text)
    try:
        return Text.from_markup(text, emoji=False)
    except MarkupError:
        return Text(text)


def _format_ms(value: float) -> str:
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
