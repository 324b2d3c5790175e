"""One static HTML page over run directories (``misalign report RUN_DIR...``).

A run directory is one the CLI writes: what ``misalign reproduce`` writes (see
``misalign.experiments``: ``claims.json``, ``config.json``, ``version.json``, ``figure.png``
and ``table.csv``), a play or a batch of plays (``misalign run``), a prediction (``theory``), a
design, an attack study or a sweep (``misalign.workflows.page_kinds``). The page reads top to
bottom: a
title, when and from which version it was generated, how many claims pass, the registry
entries with no run on the page, every failing claim and every verdict of ``claims.json`` that
its numbers contradict, and a contents table (per run: its kind, quick or full for
``reproduce``, the claim its experiment checks or what the run shows, how many of its claims
pass, its verdict), then one section per run, in the order given (a directory of runs in the
registry's order, other runs after them by name; a run named twice appears once): the claim or
the run's facts, its figure (a PNG data URI), its claims or small tables, and, folded, its
configuration and the first rows of its CSV table (the whole CSV rides along as a ``data:``
download link, up to ``EMBED_BYTES``). It needs no server and loads nothing from outside the
file: the CSS is inline and every value is escaped (Jinja2 autoescape).

Every verdict is recomputed from the claim's ``measured`` and ``tolerance`` by the rule of
``misalign.experiments.Claim`` (a value that is missing, not finite or not a number fails);
``passed`` in ``claims.json`` is only compared with it, and a disagreement is shown as such.

A run directory may come from someone else (a shared tarball): only regular files really inside
it are read (``misalign.runtime.files.open_inside``). A file that is a symbolic link, a directory, a
FIFO or a device is named in one line on stderr and left out of the page (a note in its place);
a run directory that is itself a symbolic link, or whose main file (``claims.json``,
``run.json``, ...) is such a file, is left out whole. The rest of the page is still built.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from misalign.config import ConfigError
from misalign.runtime.files import UnsafeFile
from misalign.workflows.page_kinds import MARKERS, Grid, marker, read_view
from misalign.workflows.page_read import (
    Table,
    Warn,
    left_out,
    num,
    read_figure,
    read_json,
    read_table,
    warn_stderr,
)

_NO_RUN = f"no run here (none of {', '.join(MARKERS)})"
"""What the page says of a directory that holds no run (one line, exit 2)."""


@dataclass(frozen=True)
class Run:
    """One run directory, read and ready to render.

    Attributes:
        kind: ``reproduce``, or what ``misalign.workflows.page_kinds`` calls the run.
        claims: ``reproduce``: each claim with its recomputed verdict (``passed``), the one in
            ``claims.json`` (``stored``) and whether they differ (``disagrees``).
        claim: ``reproduce``: the claim its registry entry checks; else the run's headline.
        mode: ``reproduce``: quick or full (``run_mode``).
        facts, grids: what the section tells of a run that is not ``reproduce``'s.
        version: which misalign wrote it (``None``: the run does not say).
        figure_name: its figure's file (``None``: it draws none).
        table_name: its CSV's file (``None``: it writes none).
    """

    directory: Path
    name: str
    claims: list[dict[str, Any]]
    kind: str = "reproduce"
    claim: str | None = None
    mode: str = ""
    facts: list[str] = field(default_factory=list)
    grids: list[Grid] = field(default_factory=list)
    config: str = "{}"
    config_name: str = "config.json"
    version: str | None = "misalign (version unknown)"
    figure: str | None = None
    figure_name: str | None = "figure.png"
    figure_missing: str = ""
    table: Table | None = None
    table_name: str | None = "table.csv"
    table_missing: str = ""
    anchor: str = field(default="run", compare=False)

    @property
    def passed(self) -> int:
        """How many of its claims pass (by their recomputed verdicts)."""
        return sum(1 for c in self.claims if c["passed"])

    @property
    def reproduced(self) -> bool:
        """Whether it is a run of ``misalign reproduce`` (it has claims to check)."""
        return self.kind == "reproduce"


def find_runs(paths: Sequence[Path]) -> list[Path]:
    """Run directories from ``paths``, each once, in the order given: a directory holding one
    of ``misalign.workflows.page_kinds.MARKERS`` (``claims.json``, ``run.json``, ``theory.json``,
    ``design.json``, ``attacks.json``, a sweep's ``manifest.json``) is a run; one without but
    with subdirectories that hold one stands for those, in the registry's order (``misalign
    reproduce --list``; other runs after them, by name). A run named twice (``runs/gap`` and
    ``runs/``, or a relative and an absolute path) appears where it is first named. A run
    directory that is a symbolic link is still listed: ``load_runs`` names it and leaves it
    out.

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
        if marker(path):
            inner = [path]
        else:
            inner = sorted(
                (p for p in path.iterdir() if p.is_dir() and marker(p)), key=_registry_order
            )
            if not inner:
                raise ConfigError(
                    f"{path}: {_NO_RUN} (neither a run directory nor a directory of runs)"
                )
        for run in inner:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    return found


def _registry_order(directory: Path) -> tuple[int, str]:
    """Sort key of a run directory: its experiment's place in the registry, then its name."""
    from misalign.experiments import REGISTRY

    order = list(REGISTRY)
    try:
        config = _config(directory) if marker(directory) == "claims.json" else {}
    except (UnsafeFile, ConfigError):  # named once, when the run is read (load_run)
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
    return read_json(directory, "config.json") if has else {}


def _name(directory: Path, config: Any) -> str:
    """A run's name: ``config.json``'s ``experiment``, else the directory's name."""
    experiment = config.get("experiment") if isinstance(config, dict) else None
    return str(experiment) if experiment else directory.resolve().name


def _claims(directory: Path) -> list[dict[str, Any]]:
    """The claims of a run directory (``claims.json``), each with its name, its numbers, its
    verdict recomputed from them (``verdict``) and the one ``claims.json`` records.

    Raises:
        UnsafeFile: ``claims.json`` is not a regular file really inside the directory.
        ConfigError: one line naming it when it is not a list of valid claims.
    """
    path = directory / "claims.json"
    data = read_json(directory, "claims.json")
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
        name, measured, tolerance = (
            str(entry["name"]),
            entry.get("measured"),
            entry.get("tolerance"),
        )
        passed = verdict(name, measured, tolerance, entry.get("at_least", False))
        claims.append(
            {
                "name": name,
                "measured": measured,
                "tolerance": tolerance,
                "passed": passed,
                "stored": entry["passed"],
                "disagrees": passed != entry["passed"],
            }
        )
    return claims


def verdict(name: str, measured: Any, tolerance: Any, at_least: Any = False) -> bool:
    """Whether a claim passes, by the rule of ``misalign.experiments.Claim``
    (``measured <= tolerance``; ``>=`` for a claim ``at_least``), from the numbers a
    ``claims.json`` records: a value that is missing (``null``: not finite when written), not
    finite or not a number fails.

    Args:
        name: the claim's name.
        measured: its measured value, as read.
        tolerance: its tolerance, as read.
        at_least: its ``at_least``, as read (only ``true`` counts; absent in older runs).

    Returns:
        The verdict.
    """
    from misalign.experiments import Claim

    def number(value: Any) -> float:
        plain = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if plain else math.nan

    try:
        return Claim(name, number(measured), number(tolerance), at_least is True).passed
    except OverflowError:  # an integer too large for a float
        return False


def run_mode(name: str, config: Any) -> str:
    """Whether a ``reproduce`` run was the quick or the full variant: its ``config.json``
    against its registry entry's configurations (``--seeds N`` as recorded).

    Args:
        name: the run's experiment.
        config: its ``config.json``.

    Returns:
        ``full``, ``quick (--quick)`` (each with ``, --seeds N`` when the seeds were given),
        ``neither quick nor full ...`` when it matches neither, or ``""`` for a run of no
        registry entry.
    """
    from misalign.experiments import REGISTRY

    entry = REGISTRY.get(name)
    if entry is None or not isinstance(config, dict):
        return ""
    seeds = config.get("seeds")
    given = isinstance(seeds, int) and not isinstance(seeds, bool) and 0 < seeds <= 10**9
    for quick, option in ((False, "full"), (True, "quick (--quick)")):
        for tried in (None, seeds) if given else (None,):
            resolved = json.loads(json.dumps(entry.config(quick, tried), default=str))
            if resolved == config:
                return option + ("" if tried is None else f", --seeds {seeds}")
    return "neither quick nor full (a configuration this version's registry does not write)"


def _version(directory: Path) -> str:
    """Which ``misalign`` wrote a run (``version.json``), for the page's header.

    Raises:
        UnsafeFile: ``version.json`` is not a regular file really inside the directory.
        ConfigError: it cannot be read or is not valid JSON.
    """
    if not os.path.lexists(directory / "version.json"):
        return "misalign (version unknown)"
    data = read_json(directory, "version.json")
    if not isinstance(data, dict):
        return "misalign (version unknown)"
    text = f"misalign {data.get('version') or '(version unknown)'}"
    commit = data.get("commit")
    return f"{text} (commit {str(commit)[:12]})" if commit else text


def load_run(directory: Path, anchor: str = "run", warn: Warn = warn_stderr) -> Run:
    """Read one run directory; a file of it that is not a regular file really inside it is
    named by ``warn`` and left out (a note in its place).

    Raises:
        ConfigError: one line naming the directory when it does not exist or holds no run, or
            naming a file that is not valid JSON or not what misalign writes there.
        UnsafeFile: the directory is a symbolic link, or its main file (``claims.json``, ...)
            is not a regular file inside it: the whole run is left out (``load_runs``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        missing = "no such run directory" if not directory.exists() else "not a directory"
        raise ConfigError(f"{directory}: {missing}")
    main = marker(directory)
    if main is None:
        raise ConfigError(f"{directory}: {_NO_RUN} (not a run directory)")
    if main != "claims.json":
        name = directory.resolve().name
        view = read_view(directory, name, warn)
        return Run(
            directory=directory,
            name=name,
            claims=[],
            kind=view.kind,
            claim=view.headline,
            facts=view.facts,
            grids=view.grids,
            config=view.config,
            config_name=view.config_name,
            version=None,
            figure=view.figure,
            figure_name=view.figure_name,
            figure_missing=view.figure_missing,
            table=view.table,
            table_name="sweep.csv" if view.kind == "sweep" else None,
            table_missing=view.table_missing,
            anchor=anchor,
        )
    claims = _claims(directory)
    try:
        config = _config(directory)
        shown = json.dumps(config, indent=2, default=str)
    except UnsafeFile as exc:
        config, shown = {}, left_out(exc, warn)
    try:
        version = _version(directory)
    except UnsafeFile as exc:
        version = f"misalign (version unknown: {left_out(exc, warn)})"
    name = _name(directory, config)
    from misalign.experiments import REGISTRY

    entry = REGISTRY.get(name)
    figure, figure_missing = read_figure(directory, "figure.png", warn)
    table, table_missing = read_table(directory, "table.csv", name, warn)
    return Run(
        directory=directory,
        name=name,
        claims=claims,
        claim=entry.claim if entry is not None else None,
        mode=run_mode(name, config),
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


def missing_entries(runs: Sequence[Run]) -> list[str]:
    """The registry entries no ``reproduce`` run on the page is of (none when the page has no
    ``reproduce`` run: it is then not about the registry).

    Args:
        runs: the page's runs.

    Returns:
        Their names, in the registry's order.
    """
    from misalign.experiments import REGISTRY

    names = {run.name for run in runs if run.reproduced}
    return [name for name in REGISTRY if name not in names] if names else []


def render(runs: Sequence[Run], now: datetime | None = None) -> str:
    """The page for runs already read (``load_runs``)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("misalign", "workflows/templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = num
    from misalign.experiments import REGISTRY

    now = datetime.now(UTC) if now is None else now
    versions = list(dict.fromkeys(run.version for run in runs if run.version is not None))
    checked = [run for run in runs if run.reproduced]
    return env.get_template("report.html.j2").render(
        title="misalign report",
        generated=now.strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions,
        runs=runs,
        checked=checked,
        quick=[run for run in checked if run.mode.startswith("quick")],
        missing=missing_entries(runs),
        registry=len(REGISTRY),
        failed=[(run, c) for run in runs for c in run.claims if not c["passed"]],
        disagreeing=[(run, c) for run in runs for c in run.claims if c["disagrees"]],
        passed=sum(run.passed for run in runs),
        total=sum(len(run.claims) for run in runs),
    )


def build_page(run_dirs: Sequence[Path], now: datetime | None = None) -> str:
    """The HTML page over ``run_dirs`` (runs or directories of runs, see ``find_runs``), as
    one string.

    Raises:
        ConfigError: one line naming a directory that does not exist or holds no run.
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

    from misalign.runtime.files import atomic_write, refuse_symlinks

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
