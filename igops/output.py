"""The single output boundary.

People get rich tables on stdout and numbered steps, progress bars and logs on stderr. With
`--json`, stdout carries exactly one JSON envelope and nothing else. Domain modules never print:
they report through a `Reporter`, which this module implements for the CLI.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from igops.errors import IgopsError
from igops.secrets import redact, redact_data


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

    @contextmanager
    def progress(self, description: str, total: float | None, unit: str = "") -> Iterator[Any]:
        yield lambda advance: None


class Output(Reporter):
    def __init__(self, command: str, json_mode: bool = False, verbose: bool = False):
        self.command = command
        self.json_mode = json_mode
        self.verbose = verbose
        self.steps: list[StepRecord] = []
        # A command that shows a plan (one with --dry-run) numbers its steps as the plan does:
        # the probes before the plan are [pre], and the plan's step k is [k] on screen.
        self.shows_plan = False
        self.plan_shown = False
        self.started = time.monotonic()
        self.started_at = datetime.now(timezone.utc)
        self._out = None
        self._err = None

    @property
    def out(self):
        if self._out is None:
            from rich.console import Console

            self._out = Console(highlight=False)
            if not self._out.is_terminal:
                # Piped or captured output is read by programs: never truncate or wrap it.
                self._out.width = 400
        return self._out

    @property
    def err(self):
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, soft_wrap=True)
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
            self.err.print(f"    [{colour}]{record.status}[/{colour}] "
                           f"({_format_ms(record.duration_ms)}){detail}")

    @contextmanager
    def progress(self, description: str, total: float | None, unit: str = "") -> Iterator[Any]:
        if self.json_mode or not self.err.is_terminal:
            yield lambda advance: None
            return
        from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, ProgressColumn,
                                   TextColumn, TimeElapsedColumn)
        from rich.text import Text

        class RateAndTimeLeft(ProgressColumn):
            """rich's own rate column counts decimal MB; every size igops prints is binary."""

            def render(self, task) -> Text:
                return Text(rate_and_time_left(task.finished_speed or task.speed, task.time_remaining),
                            style="progress.data.speed")

        # Bytes: done/total, rate and time left, in binary units (MiB, MiB/s) like every size shown.
        columns = ([DownloadColumn(binary_units=True), RateAndTimeLeft()] if unit == "bytes"
                   else [MofNCompleteColumn()])
        with Progress(TextColumn("{task.description}"), BarColumn(), *columns, TimeElapsedColumn(),
                      console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda advance: bar.advance(task, advance)

    # --- results: stdout ----------------------------------------------------------------------
    def table(self, title: str | None, columns: list[str], rows: list[list[Any]],
              styles: dict[str, str] | None = None) -> None:
        if self.json_mode:
            return
        from rich import box
        from rich.table import Table

        # Piped output is read by programs (grep, awk, cut): columns apart by spaces, no
        # box-drawing characters, as without colour.
        lines = box.HEAVY_HEAD if self.out.is_terminal else None
        table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=lines)
        for column in columns:
            table.add_column(column, style=(styles or {}).get(column))
        for row in rows:
            table.add_row(*(redact(_cell(value)) for value in row))
        self.out.print(table)

    def text(self, message: str) -> None:
        """A line of the result for people (stdout); nothing in JSON mode."""
        if not self.json_mode:
            self.out.print(redact(message), markup=False, highlight=False)

    def plan(self, title: str, steps: list[str], is_result: bool = False) -> None:
        """The exact steps a mutating command will run, numbered. On stderr before a real run;
        on stdout when the plan is the result (a dry run), so `--dry-run > plan.txt` keeps it,
        except in JSON mode, where stdout is the envelope's alone (and the envelope has the plan)."""
        console = self.out if is_result and not self.json_mode else self.err
        self.plan_shown = True
        console.print(f"[bold]{_escape(redact(title))}[/bold]")
        for number, step in enumerate(steps, 1):
            console.print(f"  {number}. {_escape(redact(step))}")

    def envelope(self, data: Any, exit_code: int, error: dict | None = None) -> dict:
        return {
            "command": self.command,
            "ok": exit_code == 0,
            "exit_code": int(exit_code),
            "started_at": self.started_at.isoformat(timespec="milliseconds"),
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
            "data": to_jsonable(data),
            "steps": [asdict(step) for step in self.steps],
            "error": error,
        }

    def finish(self, data: Any, exit_code: int = 0, error: dict | None = None) -> None:
        if self.json_mode:
            # Redacted before serialising: json.dumps escapes what a secret may hold (`"`, `\`,
            # non-ASCII), and the escaped form would no longer match it.
            text = json.dumps(redact_data(to_jsonable(self.envelope(data, exit_code, error))), indent=2)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def fail(self, line: str, exit_code: int, error: dict) -> None:
        """A one-line error on stderr and, with --json, the envelope carrying it."""
        self.err.print(f"[red]error:[/red] {_escape(redact(line))}")
        self.finish(None, exit_code, {key: redact(value) if isinstance(value, str) else value
                                      for key, value in error.items()})


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
    """"1 host", "2 hosts": a count and its noun, agreeing."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


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


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def _format_ms(value: float) -> str:
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
