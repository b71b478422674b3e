"""Tables for people and for programs, and how each column gives way on a narrow terminal.

A column is an identifier unless it says otherwise: its values stay whole on one line and it is
never hidden, because someone will paste them (a snapshot group id, an LSN, a host name). Free
text (`wrap`) wraps onto more lines. Secondary columns (`drop`) are hidden, the highest rank
first, when the table does not fit the terminal. A table that still does not fit once its free
text is wrapped as narrow as it goes (its identifiers alone are too wide) is printed wider than
the terminal, which folds the line where it must: a value is never cut. `--wide` keeps every
column and, if that cannot fit, every row on one line. Output that is not a terminal is read by
programs and never hides or wraps anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A free-text column wraps down to its longest word, and no narrower than this (unless its
# values are all shorter).
MIN_WRAP_WIDTH = 10


@dataclass(frozen=True)
class Column:
    name: str
    wrap: bool = False  # free text: may wrap onto more lines to fit
    drop: int = 0  # 0: always shown; otherwise hidden when the terminal is too narrow, highest first


@dataclass
class Layout:
    shown: list[int]  # the indexes of the columns shown, in order
    widths: list[int]  # their content widths (padding and rules excluded)
    hidden: list[str]  # the names of the columns left out
    total: int  # the printed width of the table


def columns_of(columns: Sequence[Column | str]) -> list[Column]:
    return [column if isinstance(column, Column) else Column(column) for column in columns]


def layout(columns: list[Column], cells: list[list[str]], width: int | None, ruled: bool, wide: bool = False) -> Layout:
    """Which columns to show and how wide, for plain `cells` (rows of text). `width` is the
    terminal's; None means no terminal to fit (every column, nothing wrapped)."""
    natural = [_natural_width(column, [row[index] for row in cells]) for index, column in enumerate(columns)]
    least = [
        _least_width(column, [row[index] for row in cells], natural[index]) for index, column in enumerate(columns)
    ]
    shown = list(range(len(columns)))
    if width is None:
        return Layout(shown, natural, [], _total(natural, ruled))
    droppable = (
        []
        if wide
        else sorted(
            (index for index, column in enumerate(columns) if column.drop),
            key=lambda index: (columns[index].drop, index),
        )
    )
    hidden: list[int] = []
    while _total([least[index] for index in shown], ruled) > width and droppable:
        hidden.append(droppable.pop())
        shown.remove(hidden[-1])
    # A column hidden early may fit beside what is left once a wider one has gone too.
    for index in reversed(hidden):
        if _total([least[other] for other in sorted([*shown, index])], ruled) <= width:
            shown = sorted([*shown, index])
    widths = [natural[index] for index in shown]
    excess = _total(widths, ruled) - width
    # Narrow the widest free-text column a character at a time, never below its least width.
    while excess > 0:
        candidates = [
            position for position, index in enumerate(shown) if columns[index].wrap and widths[position] > least[index]
        ]
        if not candidates:
            break
        widest = max(candidates, key=lambda position: widths[position])
        widths[widest] -= 1
        excess -= 1
    if excess > 0 and wide:
        # --wide asked for every column: if even so it will not fit, keep each row on one line.
        widths = [natural[index] for index in shown]
    # Otherwise what still does not fit is identifiers, which are never cut: the table runs wider
    # by that much, and its free text stays wrapped to its least width.
    return Layout(
        shown,
        widths,
        [columns[index].name for index in range(len(columns)) if index not in shown],
        _total(widths, ruled),
    )


def tsv_lines(columns: list[Column], cells: list[list[str]]) -> list[str]:
    """The header row, then one row per line, fields apart by tabs (tabs and line breaks inside
    a value become spaces)."""
    return ["\t".join(_tsv_field(value) for value in row) for row in [[c.name for c in columns], *cells]]


def hidden_note(hidden: list[str], width: int) -> str:
    return f"hidden to fit {width} columns: {', '.join(hidden)} (--wide shows every column)"


def _natural_width(column: Column, values: list[str]) -> int:
    from rich.cells import cell_len

    return max([cell_len(line) for text in [column.name, *values] for line in text.splitlines() or [""]])


def _least_width(column: Column, values: list[str], natural: int) -> int:
    if not column.wrap:
        return natural
    from rich.cells import cell_len

    longest_word = max([cell_len(word) for text in [column.name, *values] for word in text.split()] or [1])
    return max(longest_word, min(natural, MIN_WRAP_WIDTH))


def _total(widths: list[int], ruled: bool) -> int:
    """Content plus one space each side of every inner border, plus the rule itself."""
    return sum(widths) + max(len(widths) - 1, 0) * (3 if ruled else 2)


def _tsv_field(value: str) -> str:
    return " ".join(value.replace("\t", " ").splitlines()) if value else ""
