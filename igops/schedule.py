"""Snapshot schedules: "every 6h", "every 30m", "every 1d at 03:00".

A schedule is a grid of moments in UTC: every INTERVAL, starting from the day's `at` time
(00:00 by default). "every 6h" is 00:00, 06:00, 12:00 and 18:00 UTC; "every 6h at 01:30" is
01:30, 07:30, 13:30 and 19:30. The interval must divide a day, so the grid is the same every
day and a person can say when the next snapshot is due without a calendar. A set of data is
due once a grid moment has passed and no group of it has been taken since that moment: run
`igops snapshot cron` every minute and each moment's group is taken within the minute (or on
the first run after an outage, once, not once per missed moment).

Stdlib only: the inventory validates schedules while it loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_PATTERN = re.compile(r"^every\s+(\d+)\s*(m|min|h|d)(?:\s+at\s+(\d{1,2}):(\d{2}))?$")
_UNIT_MINUTES = {"m": 1, "min": 1, "h": 60, "d": 24 * 60}
DAY_MINUTES = 24 * 60
EXAMPLES = '"every 6h", "every 30m", "every 1d at 03:00"'


class ScheduleError(ValueError):
    """A schedule that cannot be read, with how to write it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


@dataclass(frozen=True)
class Schedule:
    text: str
    interval: timedelta
    at_minutes: int  # the grid's anchor: minutes after midnight UTC

    def latest_slot(self, now: datetime) -> datetime:
        """The last grid moment at or before `now`."""
        day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        anchor = day + timedelta(minutes=self.at_minutes)
        steps = (now - anchor) // self.interval  # floor: negative before today's anchor
        return anchor + steps * self.interval

    def due(self, last_taken: datetime | None, now: datetime) -> bool:
        """Whether a group is due: none taken since the latest grid moment."""
        return last_taken is None or last_taken < self.latest_slot(now)

    def describe(self) -> str:
        return self.text


def parse(text: str) -> Schedule:
    cleaned = " ".join(str(text).strip().lower().split())
    match = _PATTERN.match(cleaned)
    if not match:
        raise ScheduleError(
            f"schedule {text!r} is not understood",
            f"write every N followed by m, h or d, optionally with at HH:MM (UTC): {EXAMPLES}",
        )
    count, unit, hour, minute = match.groups()
    minutes = int(count) * _UNIT_MINUTES[unit]
    if minutes <= 0:
        raise ScheduleError(f"schedule {text!r} has a zero interval", f"use an interval such as {EXAMPLES}")
    if minutes > DAY_MINUTES or DAY_MINUTES % minutes:
        raise ScheduleError(
            f"schedule {text!r}: {count}{unit} does not divide a day, so its times would move from day to day",
            "use an interval that divides 24 hours evenly, e.g. 15m, 30m, 1h, 4h, 6h, 12h or 1d",
        )
    at = 0
    if hour is not None:
        if int(hour) > 23 or int(minute) > 59:
            raise ScheduleError(
                f"schedule {text!r}: {hour}:{minute} is not a time of day",
                "write the time as HH:MM, 00:00 to 23:59 (UTC)",
            )
        at = int(hour) * 60 + int(minute)
    return Schedule(cleaned, timedelta(minutes=minutes), at % minutes)
