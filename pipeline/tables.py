"""CSV files as the pipeline writes and reads them back: safe to open in a spreadsheet.

A text cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is one a spreadsheet
may run as a formula (OWASP's "CSV injection"): a class folder named `=1+1`, or `@SUM(A1)`, would
reach the first cell of a row. Every CSV the pipeline writes goes through `writer`, which prefixes
such a cell with a single quote (`'=1+1`), as OWASP advises; plain numbers (`-0.25`, `+3`) are left
as they are. `unquoted` undoes it for the pipeline's own readers (an audit's suspects.csv given to
`--exclude`, a run's splits.csv), so a name survives the round trip. docs/formats.md says so.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import Any, TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def neutralised(cell: Any) -> Any:
    """`cell`, with a leading single quote where a spreadsheet would read a formula in it."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def unquoted(cell: str) -> str:
    """A cell as it was before `neutralised`."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(cell[1:]):
        return cell[1:]
    return cell


class _SafeWriter:
    def __init__(self, handle: TextIO) -> None:
        self._writer = csv.writer(handle)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([neutralised(cell) for cell in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(handle: TextIO) -> _SafeWriter:
    """csv.writer for `handle`, every cell neutralised."""
    return _SafeWriter(handle)


class _SafeDictWriter(csv.DictWriter):
    def writerow(self, rowdict: dict[str, Any]) -> Any:
        return super().writerow({key: neutralised(value) for key, value in rowdict.items()})

    def writeheader(self) -> Any:
        return self.writer.writerow([neutralised(name) for name in self.fieldnames])


def dict_writer(handle: TextIO, columns: list[str]) -> csv.DictWriter:
    """csv.DictWriter for `handle`, every cell and column name neutralised."""
    return _SafeDictWriter(handle, columns)
