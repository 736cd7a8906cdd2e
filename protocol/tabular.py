"""Reading a clinical export (CSV) the way a consortium's files really are, with errors that say where.

`read_table` returns the header and the raw cells; `parse_number` turns one cell into a float or NaN (missing),
honouring the configured missing markers (`NA`, empty, `?` by default) and a thousands separator (`"265,000"`).
Anything else that is not a number raises `TableError`, a ValueError that names the file, the column and the
(1-based, header = row 1) row, so a user sees one clear line instead of a bare `could not convert string to float`.
Shared by the device (device/data.py reads its local CSV) and the experiments' loaders, so both parse a file the
same way.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

MISSING = ("NA", "", "?")


class TableError(ValueError):
    """A malformed table: `str()` is one line naming the file, and where known the column and row."""

    def __init__(self, path: str | Path, detail: str, column: str | None = None, row: int | None = None) -> None:
        self.path, self.column, self.row, self.detail = str(path), column, row, detail
        where = "".join([f", column {column!r}" if column is not None else "", f", row {row}" if row else ""])
        super().__init__(f"{path}{where}: {detail}")


@dataclass(frozen=True)
class ReadOptions:
    """How cells are read: which strings mean "missing", and the thousands separator ("" = none)."""

    missing: tuple[str, ...] = MISSING
    thousands: str = ","
    delimiter: str = ","          # a thousands separator equal to it works only inside quoted cells ("265,000")


@dataclass(frozen=True)
class Table:
    """A CSV's header and raw (stripped) cells, row by row; `rows[i]` is file row i + 2."""

    path: str
    columns: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> list[str]:
        if name not in self.columns:
            raise TableError(self.path, f"no column {name!r} (columns: {', '.join(self.columns)})")
        i = self.columns.index(name)
        return [r[i] for r in self.rows]


def read_table(path: str | Path, options: ReadOptions = ReadOptions()) -> Table:
    """Header + cells. TableError for a missing/empty file, a duplicate or empty header name, a ragged row."""
    path = Path(path)
    if not path.is_file():
        raise TableError(path, "no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=options.delimiter)
            header = next(reader, None)
            if header is None:
                raise TableError(path, "empty file (no header row)")
            header = [h.strip() for h in header]
            rows = []
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise TableError(path, f"{len(row)} cells but the header has {len(header)} columns "
                                           "(an unquoted thousands separator or delimiter?)", row=line)
                rows.append([c.strip() for c in row])
    except UnicodeDecodeError as exc:
        raise TableError(path, f"not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise TableError(path, f"not a CSV file ({exc})") from None
    for name in header:
        if not name:
            raise TableError(path, "a header cell is empty")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise TableError(path, f"duplicate column names {duplicates}")
    if not rows:
        raise TableError(path, "no data rows")
    return Table(str(path), header, rows)


def is_missing(cell: str, options: ReadOptions = ReadOptions()) -> bool:
    return cell.strip() in options.missing


def parse_number(cell: str, options: ReadOptions = ReadOptions()) -> float | None:
    """A cell -> float, NaN when it is a missing marker, None when it is not a number (the caller raises)."""
    cell = cell.strip()
    if cell in options.missing:
        return math.nan
    text = cell.replace(options.thousands, "") if options.thousands else cell
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return value


def numeric_column(table: Table, name: str, options: ReadOptions = ReadOptions()) -> list[float]:
    """A column as floats (NaN = missing); TableError naming the first cell that is neither."""
    out = []
    for row, cell in enumerate(table.column(name), start=2):
        value = parse_number(cell, options)
        if value is None:
            markers = ", ".join(repr(m) for m in options.missing) or "none configured"
            if _non_finite(cell, options):
                raise TableError(table.path, f"{cell!r}: NaN or infinity is not a value (missing markers: "
                                             f"{markers})", name, row)
            raise TableError(table.path, f"{cell!r} is not a number nor a missing marker ({markers})", name, row)
        out.append(value)
    return out


def _non_finite(cell: str, options: ReadOptions) -> bool:
    try:
        return not math.isfinite(float(cell.replace(options.thousands, "") if options.thousands else cell))
    except ValueError:
        return False


def is_numeric(table: Table, name: str, options: ReadOptions = ReadOptions()) -> bool:
    """Every non-missing cell of the column parses as a number."""
    return all(parse_number(c, options) is not None for c in table.column(name))
