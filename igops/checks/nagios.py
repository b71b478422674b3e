"""The Nagios plugin convention: one line, `TEXT | PERFDATA`, and exit 0/1/2/3.

Perfdata items are `'label'=value[UOM];warn;crit;min;max`: labels are always quoted (a quote in
one is doubled), trailing empty fields are dropped, and neither part may contain a `|` or a
newline, which would end the text or the line early.
"""

from __future__ import annotations

from igops.checks import Perf, Result, counts, overall
from igops.errors import NagiosStatus
from igops.output import plural
from igops.secrets import redact

PREFIX = "IGOPS"
MAX_PROBLEMS_SHOWN = 5
MAX_TEXT = 900


def perf_item(perf: Perf) -> str:
    label = perf.label.replace("'", "''").replace("=", "_").replace("|", "/")
    numbers = [_number(perf.value) + perf.unit] + [
        "" if value is None else _number(value) for value in (perf.warning, perf.critical, perf.minimum, perf.maximum)
    ]
    while len(numbers) > 1 and numbers[-1] == "":
        numbers.pop()
    return f"'{label}'=" + ";".join(numbers)


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def _clean(text: str) -> str:
    """One line without a `|`, redacted first: a secret holding a `|` or a run of blanks no
    longer matches once they are rewritten, nor half of one cut at MAX_TEXT (the writer's own
    redaction, later, would miss both)."""
    return " ".join(redact(text).replace("|", "/").split())


def line(fleet_name: str, results: list[Result], duration_s: float) -> tuple[str, NagiosStatus]:
    status = overall(results)
    tally = counts(results)
    problems = [result for result in results if result.status != NagiosStatus.OK]
    problems.sort(
        key=lambda result: -{NagiosStatus.CRITICAL: 3, NagiosStatus.WARNING: 2, NagiosStatus.UNKNOWN: 1}[result.status]
    )
    if not problems:
        text = f"{fleet_name}: {plural(len(results), 'check')} OK"
    else:
        parts = [f"{tally[name]} {name}" for name in ("critical", "warning", "unknown") if tally[name]]
        shown = "; ".join(
            f"{result.check} {result.target}: {result.summary}" for result in problems[:MAX_PROBLEMS_SHOWN]
        )
        more = f"; and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        text = f"{fleet_name}: {', '.join(parts)} of {plural(len(results), 'check')}: {shown}{more}"
    text = _clean(text)
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "…"
    perfdata = [
        Perf("checks", len(results), minimum=0),
        Perf("critical", tally["critical"], minimum=0),
        Perf("warning", tally["warning"], minimum=0),
        Perf("unknown", tally["unknown"], minimum=0),
        Perf("duration", round(duration_s, 3), "s", minimum=0),
    ]
    for result in results:
        perfdata.extend(result.perfdata)
    return f"{PREFIX} {status.name} - {text} | {' '.join(perf_item(perf) for perf in perfdata)}", status


def unknown(message: str) -> str:
    return f"{PREFIX} UNKNOWN - {_clean(message)}"
