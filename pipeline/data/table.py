"""Tables of images as users keep them: a CSV (or TSV) file, a Parquet file, or a dataframe.

A table is read row by row (streamed: a million-row CSV is never held whole as text), only the
columns asked for, each cell as it is (text from a CSV, Python values from Parquet and dataframes;
empty cells and NaN as None). Problems are one line each: a file that is missing or not UTF-8, a
column that is not there (the line names the ones there are), a row with more cells than the
header. Quoted cells with commas, quotes or line breaks inside are read as the CSV standard says.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline import tables
from pipeline.atomic import one_line
from pipeline.errors import PipelineError

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}
PARQUET_SUFFIXES = (".parquet", ".pq")
BLOCK_ROWS = 65536  # rows of a Parquet file read at a time


def is_dataframe(source: Any) -> bool:
    """A pandas (or pandas-like) dataframe: columns and per-column lists, not a path."""
    return hasattr(source, "columns") and hasattr(source, "__getitem__") and not isinstance(source, str | Path)


class Table:
    """One table of images, opened: its `columns`, its `folder` (where relative paths in it start;
    None for a dataframe) and its rows, streamed by `rows(columns)`."""

    def __init__(self, source: Any, flag: str = "--labels") -> None:
        self.source = source
        self.flag = flag
        if is_dataframe(source):
            self.name = "the dataframe"
            self.folder: Path | None = None
            self.columns = [str(c) for c in source.columns]
            self._kind = "frame"
            return
        path = Path(source)
        self.name = str(path)
        if path.is_dir():
            raise PipelineError(f"{flag} {path} is a folder: name a table (.csv, .tsv or .parquet)")
        if not path.exists():
            raise PipelineError(f"{flag} {path}: no such file")
        if not path.is_file():
            raise PipelineError(f"{flag} {path} is not a regular file (a pipe or device): name a table file")
        self.folder = path.resolve().parent
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            self._kind = "parquet"
            self.columns = self._parquet_columns(path)
        elif suffix in CSV_SUFFIXES or not suffix:
            self._kind = "csv"
            self._delimiter = CSV_SUFFIXES.get(suffix, ",")
            self.columns = self._csv_header(path)
        else:
            raise PipelineError(f"{flag} {path}: a table is .csv, .tsv or .parquet, not {suffix}")
        if len(set(self.columns)) != len(self.columns):
            repeated = sorted({c for c in self.columns if self.columns.count(c) > 1})
            raise PipelineError(f"{flag} {path} names the column {repeated[0]!r} twice: rename one")

    def __str__(self) -> str:
        return self.name

    def require(self, column: str, flag: str) -> str:
        """`column` if the table has it, else one line naming the columns it has."""
        if column not in self.columns:
            shown = ", ".join(self.columns[:20]) + (", ..." if len(self.columns) > 20 else "")
            raise PipelineError(f"{self.name} has no column {column!r} (its columns: {shown}): name one with {flag}")
        return column

    def rows(self, columns: Sequence[str]) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(row number as a person counts it: the CSV's line of the header is 1, a dataframe's first
        row is 1, cells of `columns`) for every row, streamed."""
        if self._kind == "frame":
            values = [self.source[c].tolist() for c in columns]
            for number, cells in enumerate(zip(*values), start=1):
                yield number, tuple(_cell(v) for v in cells)
        elif self._kind == "parquet":
            yield from self._parquet_rows(columns)
        else:
            yield from self._csv_rows(columns)

    # --- CSV --------------------------------------------------------------------------------------

    def _open(self, path: Path) -> Any:
        return open(path, newline="", encoding="utf-8-sig")

    def _csv_header(self, path: Path) -> list[str]:
        try:
            with self._open(path) as handle:
                header = next(csv.reader(handle, delimiter=self._delimiter), None)
        except UnicodeDecodeError as error:
            raise PipelineError(f"{self.flag} {path} is not UTF-8 text (byte {error.start} of the file): save it as "
                                "UTF-8") from None
        except (OSError, csv.Error) as error:
            raise PipelineError(f"{self.flag} {path}: cannot read it ({one_line(error)})") from None
        if not header:
            raise PipelineError(f"{self.flag} {path} is empty: a table starts with a header row (e.g. path,label)")
        return [tables.unquoted(name.strip()) for name in header]

    def _csv_rows(self, columns: Sequence[str]) -> Iterator[tuple[int, tuple[Any, ...]]]:
        positions = [self.columns.index(c) for c in columns]
        width = len(self.columns)
        path = Path(self.source)
        try:
            with self._open(path) as handle:
                reader = csv.reader(handle, delimiter=self._delimiter, strict=True)
                next(reader, None)
                for cells in reader:
                    if not cells:
                        continue  # a blank line
                    if len(cells) > width:
                        raise PipelineError(f"{path} line {reader.line_num} has {len(cells)} cells, the header "
                                            f"{width}: quote cells that hold the delimiter")
                    cells += [""] * (width - len(cells))
                    yield reader.line_num, tuple(_text_cell(cells[p]) for p in positions)
        except UnicodeDecodeError as error:
            raise PipelineError(f"{self.flag} {path} is not UTF-8 text (byte {error.start} of the file): save it as "
                                "UTF-8") from None
        except csv.Error as error:
            raise PipelineError(f"{self.flag} {path} is not a well-formed CSV ({one_line(error)}): quote cells that "
                                "hold commas, quotes or line breaks") from None

    # --- Parquet ----------------------------------------------------------------------------------

    def _parquet_file(self, path: Path) -> Any:
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise PipelineError(f"{self.flag} {path}: reading Parquet needs pyarrow: pip install "
                                "'bottleneck-pipeline[audit]', or give a CSV") from None
        try:
            return parquet.ParquetFile(path)
        except (OSError, ValueError) as error:
            raise PipelineError(f"{self.flag} {path} is not a readable Parquet file ({one_line(error)})") from None

    def _parquet_columns(self, path: Path) -> list[str]:
        return [str(name) for name in self._parquet_file(path).schema_arrow.names]

    def _parquet_rows(self, columns: Sequence[str]) -> Iterator[tuple[int, tuple[Any, ...]]]:
        number = 0
        for batch in self._parquet_file(Path(self.source)).iter_batches(batch_size=BLOCK_ROWS, columns=list(columns)):
            values = [batch.column(c).to_pylist() for c in columns]
            for cells in zip(*values):
                number += 1
                yield number, tuple(_cell(v) for v in cells)


def _text_cell(cell: str) -> str | None:
    cell = tables.unquoted(cell.strip())
    return cell or None


def _cell(value: Any) -> Any:
    """A dataframe's or Parquet's value: None for missing (None, NaN, empty text), text stripped."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if hasattr(value, "item") and not isinstance(value, list | tuple):  # numpy scalars
        return _cell(value.item())
    return value
