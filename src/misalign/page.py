"""One static HTML page over experiment runs (``misalign report RUN_DIR...``).

A run directory is what ``misalign reproduce`` writes (see ``misalign.experiments``):
``claims.json`` (required), ``config.json``, ``version.json``, ``figure.png`` and
``table.csv``. The page reads top to bottom: a title, when and from which version it was
generated, how many claims pass, every failing claim (when one fails) and a contents table
(per run: the claim its experiment checks, how many of its claims pass, its verdict), then
one section per run, in the order given (a directory of runs in the registry's order; a run
named twice appears once): the claim the experiment checks, its figure (a PNG data URI), its
claims, and, folded, its resolved configuration and the first rows of its table (the whole
CSV rides along as a ``data:`` download link, up to ``EMBED_BYTES``). It needs no server and
loads nothing from outside the file: the CSS is inline and every value is escaped (Jinja2
autoescape).

A run directory may come from someone else (a shared tarball): only regular files really inside
it are read (``misalign.files.open_inside``). A file that is a symbolic link, a directory, a
FIFO or a device is named in one line on stderr and left out of the page (a note in its place);
a run directory that is itself a symbolic link, or whose ``claims.json`` is such a file, is left
out whole. The rest of the page is still built.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from misalign.config import ConfigError
from misalign.files import UnsafeFile, open_inside
from misalign.text import printable

ROWS = 50
"""Rows of ``table.csv`` shown on the page (the full table is a download link)."""

EMBED_BYTES = 8 * 2**20
"""The largest ``table.csv`` embedded as a download link (base64 makes it a third larger);
a larger one is named by its path instead."""
JSON_BYTES = 16 * 2**20
"""The largest ``claims.json``, ``config.json`` or ``version.json`` read (ours are kB)."""
FIGURE_BYTES = 32 * 2**20
"""The largest ``figure.png`` embedded (ours are well under 1 MB)."""

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Warn = Callable[[str], None]
"""Where the page names what it leaves out: one line each."""


def warn_stderr(message: str) -> None:
    """Name something left out of the page: one line on stderr, ``misalign: warning: ...``."""
    print(f"misalign: warning: {printable(message)}", file=sys.stderr)


@dataclass(frozen=True)
class Table:
    """The first rows of ``table.csv`` as display cells, and the whole file base64-encoded
    (``None`` when it is larger than ``EMBED_BYTES``: ``too_large`` says why)."""

    header: list[str]
    rows: list[list[dict[str, Any]]]
    total: int
    csv: str | None
    filename: str
    too_large: str = ""


@dataclass(frozen=True)
class Run:
    """One run directory, read and ready to render."""

    directory: Path
    name: str
    claims: list[dict[str, Any]]
    claim: str | None = None
    config: str = "{}"
    version: str = "misalign (version unknown)"
    figure: str | None = None
    figure_missing: str = ""
    table: Table | None = None
    table_missing: str = ""
    anchor: str = field(default="run", compare=False)

    @property
    def passed(self) -> int:
        """How many of its claims pass."""
        return sum(1 for c in self.claims if c["passed"])


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories from ``paths``, each once, in the order given: a directory with
    ``claims.json`` is a run; one without but with subdirectories that have it stands for
    those, in the registry's order (``misalign reproduce --list``; runs of no registry
    entry after them, by name). A run named twice (``runs/gap`` and ``runs/``, or a
    relative and an absolute path) appears where it is first named. A run directory that is a
    symbolic link is still listed: ``load_runs`` names it and leaves it out.

    Args:
        paths: run directories, or directories of runs.

    Returns:
        The run directories, as given or joined onto the directory that holds them.

    Raises:
        ConfigError: one line naming a path that does not exist or holds no run.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"{path}: no such run directory")
        if not path.is_dir():
            raise ConfigError(f"{path}: not a directory")
        if _holds_claims(path):
            inner = [path]
        else:
            inner = sorted(
                (p for p in path.iterdir() if p.is_dir() and _holds_claims(p)),
                key=_registry_order,
            )
            if not inner:
                raise ConfigError(
                    f"{path}: no claims.json (neither a run directory nor a directory of runs)"
                )
        for run in inner:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    return found


def _holds_claims(directory: Path) -> bool:
    """Whether ``directory`` holds a ``claims.json`` (of whatever kind: one that is not a regular
    file is named when the run is read, ``load_run``)."""
    return os.path.lexists(directory / "claims.json")


def _registry_order(directory: Path) -> tuple[int, str]:
    """Sort key of a run directory: its experiment's place in the registry, then its name."""
    from misalign.experiments import REGISTRY

    order = list(REGISTRY)
    try:
        config = _config(directory)
    except UnsafeFile:  # named once, when the run is read (load_run)
        config = {}
    name = _name(directory, config)
    return (order.index(name) if name in order else len(order), directory.name)


def _config(directory: Path) -> Any:
    """``config.json`` of a run directory, ``{}`` when there is none.

    Raises:
        UnsafeFile: it is not a regular file really inside the directory.
        ConfigError: it cannot be read or is not valid JSON.
    """
    has = os.path.lexists(directory / "config.json")
    return _read_json(directory, "config.json") if has else {}


def _name(directory: Path, config: Any) -> str:
    """A run's name: ``config.json``'s ``experiment``, else the directory's name."""
    experiment = config.get("experiment") if isinstance(config, dict) else None
    return str(experiment) if experiment else directory.resolve().name


def _read_json(directory: Path, name: str) -> Any:
    """The JSON file ``name`` of a run directory, read with ``open_inside``.

    Raises:
        UnsafeFile: it is not a regular file really inside the directory.
        ConfigError: one line naming it when it cannot be read or is not valid JSON.
    """
    path = directory / name
    try:
        with open_inside(directory, name, most=JSON_BYTES) as handle:
            return json.loads(handle.read().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({_why(exc)})") from None
    except (ValueError, RecursionError):  # an integer past 4300 digits; nesting too deep
        raise ConfigError(f"{path}: not JSON a run writes (too deep, or a huge number)") from None


def _why(exc: Exception) -> str:
    """Why a file could not be read, in a few words on one line."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    lines = str(exc).splitlines()
    return getattr(exc, "strerror", None) or (lines[0] if lines else type(exc).__name__)


def _claims(directory: Path) -> list[dict[str, Any]]:
    """The claims of a run directory (``claims.json``), each with its name and verdict.

    Raises:
        UnsafeFile: ``claims.json`` is not a regular file really inside the directory.
        ConfigError: one line naming it when it is not a list of valid claims.
    """
    path = directory / "claims.json"
    data = _read_json(directory, "claims.json")
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of claims")
    claims = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "name" not in entry or "passed" not in entry:
            raise ConfigError(f"{path}: claim {i} lacks a name or a verdict (passed)")
        if not isinstance(entry["passed"], bool):
            raise ConfigError(
                f"{path}: claim {i}: passed must be true or false (got {entry['passed']!r:.40})"
            )
        claims.append(
            {
                "name": str(entry["name"]),
                "measured": entry.get("measured"),
                "tolerance": entry.get("tolerance"),
                "passed": entry["passed"],
            }
        )
    return claims


def _version(directory: Path) -> str:
    """Which ``misalign`` wrote a run (``version.json``), for the page's header.

    Raises:
        UnsafeFile: ``version.json`` is not a regular file really inside the directory.
        ConfigError: it cannot be read or is not valid JSON.
    """
    if not os.path.lexists(directory / "version.json"):
        return "misalign (version unknown)"
    data = _read_json(directory, "version.json")
    if not isinstance(data, dict):
        return "misalign (version unknown)"
    text = f"misalign {data.get('version') or '(version unknown)'}"
    commit = data.get("commit")
    return f"{text} (commit {str(commit)[:12]})" if commit else text


def _cell(text: str) -> dict[str, Any]:
    """A CSV value for display: numbers right-aligned, long floats to 6 significant digits."""
    try:
        value = float(text)
    except ValueError:
        return {"text": text, "number": False}
    if math.isfinite(value) and any(c in text for c in ".eE"):
        text = format(value, ".6g")
    return {"text": text, "number": True}


def _table(directory: Path, name: str, warn: Warn) -> tuple[Table | None, str]:
    """The first ``ROWS`` rows of ``table.csv``, its row count (read row by row, never whole
    into memory as rows) and, up to ``EMBED_BYTES``, the file itself.

    Returns:
        The table, or ``None`` and why there is none (a file left out is named by ``warn``).
    """
    path = directory / "table.csv"
    if not os.path.lexists(path):
        return None, "table.csv is missing"
    try:
        raw = open_inside(directory, "table.csv")
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as handle:
            size = os.fstat(handle.fileno()).st_size
            reader = csv.reader(handle)
            header = next(reader, None)
            shown = [[_cell(value) for value in row] for row in itertools.islice(reader, ROWS)]
            total = len(shown) + sum(1 for _ in reader)
            encoded = None
            if size <= EMBED_BYTES:
                raw.seek(0)
                encoded = base64.b64encode(raw.read()).decode("ascii")
    except UnsafeFile as exc:
        return None, _left_out(exc, warn)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, f"table.csv cannot be read: {_why(exc)}"
    if header is None:
        return None, "table.csv is empty"
    too_large = "" if encoded else f"{size / 2**20:.1f} MB; it is {path}"
    return Table(header, shown, total, encoded, f"{name}-table.csv", too_large), ""


def _figure(directory: Path, warn: Warn) -> tuple[str | None, str]:
    """``figure.png`` base64-encoded.

    Returns:
        The encoded figure, or ``None`` and why there is none (a file left out is named by
        ``warn``).
    """
    if not os.path.lexists(directory / "figure.png"):
        return None, "figure.png is missing"
    try:
        with open_inside(directory, "figure.png", most=FIGURE_BYTES) as handle:
            data = handle.read()
    except UnsafeFile as exc:
        return None, _left_out(exc, warn)
    except OSError as exc:
        return None, f"figure.png cannot be read: {_why(exc)}"
    if not data.startswith(PNG_MAGIC):
        return None, "figure.png is not a PNG"
    return base64.b64encode(data).decode("ascii"), ""


def _left_out(exc: UnsafeFile, warn: Warn) -> str:
    """Name a file the page leaves out (``warn``: one line).

    Args:
        exc: the file and why it is not read.
        warn: where the line goes.

    Returns:
        The note the page shows in its place.
    """
    warn(f"{exc}; left out of the page")
    return f"{exc.path.name} left out: {exc.why}"


def load_run(directory: Path, anchor: str = "run", warn: Warn = warn_stderr) -> Run:
    """Read one run directory; a file of it that is not a regular file really inside it is
    named by ``warn`` and left out (a note in its place).

    Raises:
        ConfigError: one line naming the directory when it does not exist or lacks
            ``claims.json``, or naming a file that is not valid JSON.
        UnsafeFile: the directory is a symbolic link, or its ``claims.json`` is not a regular
            file inside it: the whole run is left out (``load_runs``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        missing = "no such run directory" if not directory.exists() else "not a directory"
        raise ConfigError(f"{directory}: {missing}")
    if not _holds_claims(directory):
        raise ConfigError(f"{directory}: no claims.json (not a run directory)")
    claims = _claims(directory)
    try:
        config = _config(directory)
        shown = json.dumps(config, indent=2, default=str)
    except UnsafeFile as exc:
        config, shown = {}, _left_out(exc, warn)
    try:
        version = _version(directory)
    except UnsafeFile as exc:
        version = f"misalign (version unknown: {_left_out(exc, warn)})"
    name = _name(directory, config)
    from misalign.experiments import REGISTRY

    entry = REGISTRY.get(name)
    figure, figure_missing = _figure(directory, warn)
    table, table_missing = _table(directory, name, warn)
    return Run(
        directory=directory,
        name=name,
        claims=claims,
        claim=entry.claim if entry is not None else None,
        config=shown,
        version=version,
        figure=figure,
        figure_missing=figure_missing,
        table=table,
        table_missing=table_missing,
        anchor=anchor,
    )


def load_runs(run_dirs: Sequence[Path], warn: Warn = warn_stderr) -> list[Run]:
    """Every run directory, in the order given (see ``load_run``); a run left out whole is
    named by ``warn``.

    Raises:
        ConfigError: no run directories given, or none left once those left out are.
    """
    if not run_dirs:
        raise ConfigError("no run directories given")
    runs = []
    for directory in map(Path, run_dirs):
        try:
            runs.append(load_run(directory, f"run-{len(runs) + 1}", warn))
        except UnsafeFile as exc:
            warn(f"{exc}; the run is left out of the page")
    if not runs:
        raise ConfigError("no run left to report (every one was left out)")
    return runs


def _num(value: Any) -> str:
    if value is None:
        return "not finite"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "not finite"
    return format(value, ".3g") if isinstance(value, float) else str(value)


def render(runs: Sequence[Run], now: datetime | None = None) -> str:
    """The page for runs already read (``load_runs``)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("misalign", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _num
    now = datetime.now(UTC) if now is None else now
    versions = list(dict.fromkeys(run.version for run in runs))
    return env.get_template("report.html.j2").render(
        title="misalign report",
        generated=now.strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions,
        runs=runs,
        failed=[(run, c) for run in runs for c in run.claims if not c["passed"]],
        passed=sum(run.passed for run in runs),
        total=sum(len(run.claims) for run in runs),
    )


def build_page(run_dirs: Sequence[Path], now: datetime | None = None) -> str:
    """The HTML page over ``run_dirs`` (runs or directories of runs, see ``find_runs``), as
    one string.

    Raises:
        ConfigError: one line naming a directory that does not exist or lacks
            ``claims.json``.
    """
    return render(load_runs(find_runs(run_dirs)), now)


def write(runs: Sequence[Run], out: Path) -> Path:
    """Render ``runs`` into ``out`` atomically, creating its directory; returns ``out``.

    Raises:
        ConfigError: ``out`` is a symbolic link (``refuse_symlinks``).
        OSError: ``out`` cannot be written; ``NotADirectoryError`` naming the file in the way
            when a part of its directory is one.
    """
    import errno

    from misalign.files import atomic_write, refuse_symlinks

    text = render(runs)
    out = Path(out)
    refuse_symlinks(out, inside=False)
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{parent} is a file, not a directory")
            break
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


def write_page(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the page over ``run_dirs`` (see ``find_runs``) into ``out`` atomically; returns
    ``out``."""
    return write(load_runs(find_runs(run_dirs)), out)
