"""The access-trace format: CSV with header ``ts,job,path,offset,size,object_size,op,hint``.

One row per request: ``ts`` seconds (float, non-decreasing), ``job`` the
reader's id, ``path`` relative to the remote root, and the range
``[offset, offset+size)`` of an object of ``object_size`` bytes (``size > 0``,
within the object). ``op`` is ``read`` (a read, hit or miss) or ``prefetch``
(a client's explicit prefetch of the range); ``hint`` is the pattern hint the
client passed with a read, or empty. Traces with only the first six columns
(every row a read without a hint) are read too. :func:`read_trace` streams and
validates rows; errors name the line.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import IO, Iterable, Iterator, NamedTuple

HEADER = ("ts", "job", "path", "offset", "size", "object_size", "op", "hint")
SHORT_HEADER = HEADER[:6]
OPS = ("read", "prefetch")


class TraceRow(NamedTuple):
    """One read in a trace."""

    ts: float
    job: str
    path: str
    offset: int
    size: int
    object_size: int
    op: str = "read"
    hint: str = ""


def read_trace(source: str | Path | IO[str]) -> Iterator[TraceRow]:
    """Yield the rows of a trace file (or open text file), validating each.

    Raises ``ValueError`` naming the line for a missing or wrong header, a
    malformed row, or a timestamp lower than the one before.
    """
    if isinstance(source, (str, Path)):
        with open(source, newline="") as f:
            yield from _parse(f, str(source))
    else:
        yield from _parse(source, getattr(source, "name", "<trace>"))


def load_trace(source: str | Path | IO[str]) -> list[TraceRow]:
    """All rows of a trace, validated (see :func:`read_trace`)."""
    return list(read_trace(source))


def _parse(f: IO[str], name: str) -> Iterator[TraceRow]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{name}: empty file, expected header {','.join(HEADER)}")
    columns = tuple(field.strip() for field in header)
    if columns not in (HEADER, SHORT_HEADER):
        raise ValueError(f"{name}:1: expected header {','.join(HEADER)}, got {','.join(header)}")
    strings: dict[str, str] = {}  # share one str per distinct job and path
    last_ts = -math.inf
    for fields in reader:
        line = reader.line_num
        if not fields:
            continue
        try:
            row = _row(fields, strings, len(columns))
        except ValueError as e:
            raise ValueError(f"{name}:{line}: {e}") from None
        if row.ts < last_ts:
            raise ValueError(f"{name}:{line}: ts {row.ts} is lower than the previous row's {last_ts}")
        last_ts = row.ts
        yield row


def _row(fields: list[str], strings: dict[str, str], ncolumns: int) -> TraceRow:
    if len(fields) != ncolumns:
        raise ValueError(f"expected {ncolumns} fields ({','.join(HEADER[:ncolumns])}), got {len(fields)}")
    ts_text, job, path, offset_text, size_text, object_size_text = fields[:6]
    op, hint = fields[6:] if ncolumns == len(HEADER) else ("read", "")
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    try:
        ts = float(ts_text)
    except ValueError:
        ts = math.nan
    if not math.isfinite(ts) or ts < 0:
        raise ValueError(f"ts must be a finite number >= 0, got {ts_text!r}")
    if not job:
        raise ValueError("job is empty")
    if not path or path.startswith("/"):
        raise ValueError(f"path must be non-empty and relative to the remote root, got {path!r}")
    offset, size, object_size = _int("offset", offset_text), _int("size", size_text), _int("object_size", object_size_text)
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    if offset + size > object_size:
        raise ValueError(f"read [{offset}, {offset + size}) goes past object_size {object_size}")
    return TraceRow(ts, strings.setdefault(job, job), strings.setdefault(path, path), offset, size, object_size,
                    op, strings.setdefault(hint, hint))


def _int(field: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{field} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{field} must be >= 0, got {value}")
    return value


class TraceWriter:
    """Writes trace rows as CSV, header first; checks that ``ts`` never decreases."""

    def __init__(self, f: IO[str]) -> None:
        self._writer = csv.writer(f, lineterminator="\n")
        self._writer.writerow(HEADER)
        self._last_ts = -math.inf
        self.rows = 0

    def write(self, row: TraceRow) -> None:
        """Append one row."""
        if row.ts < self._last_ts:
            raise ValueError(f"ts {row.ts} is lower than the previous row's {self._last_ts}")
        self._last_ts = row.ts
        self._writer.writerow((f"{row.ts:.6f}", *row[1:]))
        self.rows += 1


def write_trace(dest: str | Path | IO[str], rows: Iterable[TraceRow]) -> int:
    """Write ``rows`` to a file path (``"-"`` for stdout) or open file; return the row count."""
    if isinstance(dest, (str, Path)) and str(dest) != "-":
        with open(dest, "w", newline="") as f:
            return write_trace(f, rows)
    writer = TraceWriter(sys.stdout if isinstance(dest, (str, Path)) else dest)
    for row in rows:
        writer.write(row)
    return writer.rows
