"""Reading the files of a run directory for the report page (``misalign.workflows.page``), as files
from
someone else: only regular files really inside the directory
(``misalign.runtime.files.open_inside``),
each up to a size; a file left out is named in one line (``Warn``) and a note takes its place.

JSON (``read_json``), short text such as ``config.toml`` (``read_text``), a CSV table shown by
its first ``ROWS`` rows and carried whole as a download link (``read_table``) and a PNG figure
(``read_figure``).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from misalign.config import ConfigError
from misalign.runtime.files import UnsafeFile, open_inside
from misalign.runtime.text import printable

ROWS = 50
"""Rows of a CSV table shown on the page (the full table is a download link)."""
EMBED_BYTES = 8 * 2**20
"""The largest CSV table embedded as a download link (base64 makes it a third larger); a
larger one is named by its path instead."""
JSON_BYTES = 16 * 2**20
"""The largest ``claims.json``, ``config.json``, ``version.json``, ``manifest.json`` or
``sweep.toml`` read (ours are kB)."""
RESULT_BYTES = 128 * 2**20
"""The largest ``run.json``, ``theory.json``, ``design.json`` or ``attacks.json`` read (a
play's report holds its outputs: a few MB for long plays of many agents)."""
FIGURE_BYTES = 32 * 2**20
"""The largest figure embedded (ours are well under 1 MB)."""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Warn = Callable[[str], None]
"""Where the page names what it leaves out: one line each."""


def warn_stderr(message: str) -> None:
    """Name something left out of the page: one line on stderr, ``misalign: warning: ...``."""
    print(f"misalign: warning: {printable(message)}", file=sys.stderr)


@dataclass(frozen=True)
class Table:
    """The first rows of a CSV file as display cells, and the whole file base64-encoded
    (``None`` when it is larger than ``EMBED_BYTES``: ``too_large`` says why); ``counted``:
    how many rows have a value in the column ``read_table`` was asked to count."""

    header: list[str]
    rows: list[list[dict[str, Any]]]
    total: int
    csv: str | None
    filename: str
    too_large: str = ""
    source: str = "table.csv"
    counted: int = 0


def read_json(directory: Path, name: str, most: int = JSON_BYTES) -> Any:
    """The JSON file ``name`` of a run directory, read with ``open_inside``.

    Args:
        directory: the run directory.
        name: the file's name in it.
        most: the most bytes it may hold.

    Returns:
        The parsed JSON.

    Raises:
        UnsafeFile: it is not a regular file really inside the directory, or too large.
        ConfigError: one line naming it when it cannot be read or is not valid JSON.
    """
    path = directory / name
    try:
        with open_inside(directory, name, most=most) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({why(exc)})") from None
    except (ValueError, RecursionError):  # an integer past 4300 digits; nesting too deep
        raise ConfigError(f"{path}: not JSON a run writes (too deep, or a huge number)") from None


def read_text(directory: Path, name: str, warn: Warn) -> str:
    """A short text file of a run directory (``config.toml``, ``sweep.toml``) to show as it
    is, or a note saying why it is not shown (a file left out is named by ``warn``).

    Args:
        directory: the run directory.
        name: the file's name in it.
        warn: where a file left out is named.

    Returns:
        The text, or a one-line note.
    """
    if not os.path.lexists(directory / name):
        return f"{name} is missing"
    try:
        with open_inside(directory, name, most=JSON_BYTES) as handle:
            return handle.read().decode("utf-8")
    except UnsafeFile as exc:
        return left_out(exc, warn)
    except (OSError, UnicodeDecodeError) as exc:
        return f"{name} cannot be read: {why(exc)}"


def why(exc: Exception) -> str:
    """Why a file could not be read, in a few words on one line."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    lines = str(exc).splitlines()
    return getattr(exc, "strerror", None) or (lines[0] if lines else type(exc).__name__)


def cell(text: str) -> dict[str, Any]:
    """A value for display: numbers right-aligned, long floats to 6 significant digits."""
    try:
        value = float(text)
    except ValueError:
        return {"text": text, "number": False}
    if math.isfinite(value) and any(c in text for c in ".eE"):
        text = format(value, ".6g")
    return {"text": text, "number": True}


def read_table(
    directory: Path,
    name: str,
    label: str,
    warn: Warn,
    count: str | None = None,
) -> tuple[Table | None, str]:
    """The first ``ROWS`` rows of the CSV file ``name``, its row count (read row by row, never
    whole into memory as rows) and, up to ``EMBED_BYTES``, the file itself.

    Args:
        directory: the run directory.
        name: the CSV's name in it (``table.csv``, ``sweep.csv``).
        label: the run's name, which names the download (``<label>-<name>``).
        warn: where a file left out is named.
        count: a column whose non-empty values are counted (``Table.counted``).

    Returns:
        The table, or ``None`` and why there is none.
    """
    path = directory / name
    if not os.path.lexists(path):
        return None, f"{name} is missing"
    try:
        raw = open_inside(directory, name)
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
            size = os.fstat(handle.fileno()).st_size
            reader = csv.reader(handle)
            header = next(reader, None)
            at = header.index(count) if header and count in header else None
            counted, total, shown = 0, 0, []
            for row in reader:
                if total < ROWS:
                    shown.append([cell(value) for value in row])
                total += 1
                counted += at is not None and at < len(row) and row[at] != ""
            encoded = None
            if size <= EMBED_BYTES:
                raw.seek(0)
                encoded = base64.b64encode(raw.read()).decode("ascii")
    except UnsafeFile as exc:
        return None, left_out(exc, warn)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, f"{name} cannot be read: {why(exc)}"
    if header is None:
        return None, f"{name} is empty"
    too_large = "" if encoded else f"{size / 2**20:.1f} MB; it is {path}"
    filename = f"{label}-{name}"
    return Table(header, shown, total, encoded, filename, too_large, name, counted), ""


def read_figure(directory: Path, name: str, warn: Warn) -> tuple[str | None, str]:
    """The PNG figure ``name`` base64-encoded.

    Args:
        directory: the run directory.
        name: the figure's name in it.
        warn: where a file left out is named.

    Returns:
        The encoded figure, or ``None`` and why there is none.
    """
    if not os.path.lexists(directory / name):
        return None, f"{name} is missing"
    try:
        with open_inside(directory, name, most=FIGURE_BYTES) as handle:
            data = handle.read()
    except UnsafeFile as exc:
        return None, left_out(exc, warn)
    except OSError as exc:
        return None, f"{name} cannot be read: {why(exc)}"
    if not data.startswith(PNG_MAGIC):
        return None, f"{name} is not a PNG"
    return base64.b64encode(data).decode("ascii"), ""


def left_out(exc: UnsafeFile, warn: Warn) -> str:
    """Name a file the page leaves out (``warn``: one line).

    Args:
        exc: the file and why it is not read.
        warn: where the line goes.

    Returns:
        The note the page shows in its place.
    """
    warn(f"{exc}; left out of the page")
    return f"{exc.path.name} left out: {exc.why}"


def num(value: Any, spec: str = ".3g") -> str:
    """A number read from a run for display: ``not finite`` for ``None``, NaN and infinities
    (``null`` in a run's JSON), anything that is not a number as short text.

    Args:
        value: the value.
        spec: the format of a float.

    Returns:
        The text.
    """
    if value is None:
        return "not finite"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)[:80]
    if isinstance(value, float) and not math.isfinite(value):
        return "not finite"
    return format(value, spec) if isinstance(value, float) else str(value)
