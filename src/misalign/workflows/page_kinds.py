"""The report page's view of the run directories the CLI writes besides ``reproduce``'s
(``misalign.workflows.page``), read as files from someone else (``misalign.workflows.page_read``)
and told as a
headline, a few facts, small tables and a figure:

- a play (``misalign run``): ``run.json`` and ``trajectory.png``: what the outputs did (the
  observed class), the prediction (rho), per agent its predicted and final distance to target;
- a batch (``misalign run --seeds N``, the same files): how many plays ended in each class,
  rho's median and range, per agent the distances' median and 10-90% band;
- a prediction (``misalign theory``): ``theory.json`` (it draws no figure);
- a design (``misalign design``): ``design.json`` and ``design.png``: the advice table;
- an attack study (``misalign attacks``): ``attacks.json`` and ``attacks.png``;
- a sweep (``misalign sweep``): ``manifest.json``, ``sweep.csv`` and ``sweep.png``
  (``misalign.workflows.sweep_view``).

Each shows its configuration folded: ``config.toml``, a sweep's ``sweep.toml``.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from misalign.config import ConfigError
from misalign.runtime.text import plural
from misalign.workflows.page_read import (
    JSON_BYTES,
    RESULT_BYTES,
    Table,
    Warn,
    cell,
    num,
    read_figure,
    read_json,
    read_table,
    read_text,
)

MARKERS = {
    "claims.json": "reproduce",
    "run.json": "play",
    "theory.json": "prediction",
    "design.json": "design",
    "attacks.json": "attack study",
    "manifest.json": "sweep",
}
"""The file that makes a directory a run directory, and what kind of run it holds (the first
present wins)."""
FIGURES = {
    "run.json": "trajectory.png",
    "design.json": "design.png",
    "attacks.json": "attacks.png",
    "manifest.json": "sweep.png",
}
"""Each kind's figure (``theory`` draws none)."""


@dataclass(frozen=True)
class Grid:
    """A small table of the page: a title, column names and rows of display cells."""

    title: str
    header: list[str]
    rows: list[list[dict[str, Any]]]


@dataclass(frozen=True)
class View:
    """What the page shows of a run directory that is not ``reproduce``'s.

    Attributes:
        kind: what the run is (``play``, ``batch of 5 plays``, ``sweep``, ...).
        headline: one line for the contents table.
        facts: lines at the top of its section.
        grids: its small tables.
        figure: the figure, base64-encoded (``None``: none, ``figure_missing`` says why).
        figure_name: the figure's file (``None``: this kind draws none).
        figure_missing: why there is no figure.
        config: its configuration file as text, or a note.
        config_name: that file's name.
        table: a sweep's ``sweep.csv``.
        table_missing: why there is no ``sweep.csv``.
    """

    kind: str
    headline: str
    facts: list[str]
    grids: list[Grid]
    figure: str | None
    figure_name: str | None
    figure_missing: str
    config: str
    config_name: str
    table: Table | None = None
    table_missing: str = ""


def marker(directory: Path) -> str | None:
    """The file that makes ``directory`` a run directory (``MARKERS``), or ``None``."""
    return next((name for name in MARKERS if os.path.lexists(directory / name)), None)


def read_view(directory: Path, label: str, warn: Warn) -> View:
    """Read a run directory that is not ``reproduce``'s (see the module).

    Args:
        directory: the run directory (``marker`` names its file).
        label: the run's name on the page (names the CSV download).
        warn: where a file left out is named, one line each.

    Returns:
        The view.

    Raises:
        UnsafeFile: its main file (``run.json``, ...) is not a regular file really inside it:
            the run is left out.
        ConfigError: one line naming the main file when it is not valid JSON or not what
            misalign writes there.
    """
    main = marker(directory)
    data = read_json(directory, main, JSON_BYTES if main == "manifest.json" else RESULT_BYTES)
    if not isinstance(data, dict):
        kinds = {"list": "a list", "str": "a string", "NoneType": "null", "bool": "a boolean"}
        got = kinds.get(type(data).__name__, "a number")
        raise ConfigError(
            f"{directory / main}: not the {MARKERS[main]} misalign writes (got {got})"
        )
    config_name = "sweep.toml" if main == "manifest.json" else "config.toml"
    config = read_text(directory, config_name, warn)
    table, table_missing = None, ""
    if main == "manifest.json":
        table, table_missing = read_table(directory, "sweep.csv", label, warn, count="error")
        if table is None and table_missing == "sweep.csv is missing":
            table_missing += " (an unfinished sweep, or an older one: run it again to write it)"
    describe = DESCRIBE[main]
    try:
        kind, headline, facts, grids = describe(data, directory, config, table)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"{type(exc).__name__}: {str(exc)[:80]}"
        raise ConfigError(
            f"{directory / main}: not the {MARKERS[main]} misalign writes ({what})"
        ) from None
    figure_name = FIGURES.get(main)
    figure, missing = read_figure(directory, figure_name, warn) if figure_name else (None, "")
    return View(
        kind,
        headline,
        facts,
        grids,
        figure,
        figure_name,
        missing,
        config,
        config_name,
        table,
        table_missing,
    )


def _play(data: dict[str, Any], *_: Any) -> tuple[str, str, list[str], list[Grid]]:
    """A play's ``run.json`` (a batch's when it has ``batch``)."""
    if data.get("batch"):
        return _batch(data)
    prediction = data["prediction"]
    seen = _observed(data)
    facts = [seen, _predicted(prediction)]
    measured = data.get("rounds_to_prediction")
    if prediction["converges"]:
        when = "by the last round: no" if measured is None else f"from round {num(measured)}"
        facts.append(f"measured: every output within 1e-8 of its prediction {when}")
    if (data.get("agreement") or {}).get("holds") is False:
        facts.append(
            "the play does not end at the prediction: no verdict on who reaches its target"
        )
    if data.get("fit"):
        facts.append("language-model agents: predicted from the maps fitted to their answers")
    facts.append(f"{plural(int(data['rounds_played']), 'round')} played")
    final = data.get("distance") or {}
    rows = [
        [
            _as_is(str(name)),
            _as_is(_norm(agent.get("target"))),
            _as_is(num(prediction["distance"].get(name), ".4g")),
            _as_is(num(final.get(name), ".4g")),
        ]
        for name, agent in data["agents"].items()
    ]
    header = ["agent", "|target|", "predicted distance", "final distance"]
    verdict = "converges" if prediction["converges"] else "no limit"
    headline = (
        f"observed: {str(data['observed']['class'])[:40]}; predicted: {verdict} "
        f"(rho = {num(prediction['rho'], '.4g')})"
    )
    return "play", headline, facts, [Grid("distance to own target", header, rows)]


def _observed(data: dict[str, Any]) -> str:
    """What a play's outputs did (``observed``, ``misalign.model.observe``)."""
    observed = data["observed"]
    kind, tail = observed["class"], observed.get("tail")
    span = f" over rounds {tail[0]}..{tail[1]}" if isinstance(tail, list) and tail else ""
    stop = data.get("diverged_at")
    if kind == "fixed point":
        return f"observed: a fixed point (every output unchanged to 1e-6{span})"
    if kind == "cycle":
        return f"observed: a cycle of period {num(observed.get('period'))}"
    if kind == "bounded":
        return "observed: bounded, not settled"
    if kind == "growing" and stop is not None:
        return f"observed: growing (outputs overflowed at round {num(stop)})"
    if kind == "failed":  # failed_at; a run.json written before it had diverged_at
        return f"observed: failed at round {num(data.get('failed_at', stop))}"
    return f"observed: {str(kind)[:40]}"


def _predicted(prediction: dict[str, Any]) -> str:
    """The prediction's verdict and rate."""
    rho = num(prediction["rho"], ".4g")
    if prediction["converges"]:
        rounds = num(prediction.get("rounds_to_tol"))
        return (
            f"predicted: converges (rho = {rho} per round; about {rounds} rounds to shrink the "
            "error by 1e-8)"
        )
    return f"predicted: no equilibrium it converges to (rho = {rho} >= 1)"


def _norm(vector: Any) -> str:
    """``|vector|`` for display (``-``: no vector, ``not finite``: a value that is not)."""
    if not isinstance(vector, list) or not vector:
        return "-"
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
        return "not finite"
    return num(math.hypot(*vector), ".4g")


def _batch(data: dict[str, Any]) -> tuple[str, str, list[str], list[Grid]]:
    """A batch's ``run.json`` (``misalign run --seeds N``)."""
    from misalign.model.observe import COUNTED

    batch = data["batch"]
    seeds, rho = batch["seeds"], batch["rho"]
    plays = int(batch["plays"])
    counts = batch["observed"]["counts"]
    seen = ", ".join(
        f"{num(n)} {COUNTED.get(kind, str(kind)[:40])}" for kind, n in counts.items() if n
    )
    facts = [
        f"{plural(plays, 'play')} (seeds {num(seeds[0])}..{num(seeds[-1])}): "
        f"{num(batch['converging'])} predicted to converge; rho median "
        f"{num(rho['median'], '.4g')}, range {num(rho['min'], '.4g')} .. "
        f"{num(rho['max'], '.4g')}",
        f"observed: {seen} (each play judged from its outputs)",
    ]
    bad = batch["diverging_seeds"]
    if bad:
        shown = ", ".join(map(num, bad[:10])) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        )
        facts.append(
            f"{len(bad)} without a predicted limit (rho >= 1, or overflowed): seeds {shown}"
        )
    measured = batch.get("rounds_to_prediction") or {}
    if measured.get("median") is not None:
        facts.append(
            "measured: every output within 1e-8 of its prediction from round "
            f"{num(measured['median'])} (median; max {num(measured.get('max'))})"
        )
    rows = [
        [
            _as_is(str(name)),
            _as_is(_band(row, "predicted")),
            _as_is(_band(row, "simulated")),
            _as_is(f"{num(row['simulated_mean'], '.4g')} ± {num(row['simulated_std'], '.2g')}"),
        ]
        for name, row in (batch["distance"] or {}).items()
    ]
    header = ["agent", "predicted distance", "final distance", "final, mean ± std"]
    title = "distance to own target over the converging plays: median [10%, 90%]"
    headline = f"{plural(plays, 'play')}: {seen}; rho median {num(rho['median'], '.4g')}"
    return f"batch of {plural(plays, 'play')}", headline, facts, [Grid(title, header, rows)]


def _band(row: dict[str, Any], key: str) -> str:
    return (
        f"{num(row[f'{key}_median'], '.4g')} [{num(row[f'{key}_q10'], '.4g')}, "
        f"{num(row[f'{key}_q90'], '.4g')}]"
    )


def _theory(data: dict[str, Any], *_: Any) -> tuple[str, str, list[str], list[Grid]]:
    """A prediction's ``theory.json`` (``misalign theory``)."""
    prediction = data["prediction"]
    line = _predicted(prediction)
    facts = [line]
    if data.get("fit"):
        facts.append("language-model agents: predicted from the maps fitted to their answers")
    rows = [
        [
            _as_is(str(name)),
            _as_is(_norm(agent.get("target"))),
            _as_is(num(prediction["distance"].get(name), ".4g")),
        ]
        for name, agent in data["agents"].items()
    ]
    grid = Grid("distance to own target", ["agent", "|target|", "predicted distance"], rows)
    return "prediction (theory)", line, facts, [grid]


def _design(data: dict[str, Any], *_: Any) -> tuple[str, str, list[str], list[Grid]]:
    """A design's ``design.json`` (``misalign design``): its advice table."""
    from misalign.workflows.design import COLUMNS, table_rows

    agent = str(data["agent"])
    rows = [[_as_is(str(value)) for value in row] for row in table_rows(data)]
    facts = [
        f"advice for {agent}, who reads {str(data['partner'])[:40]}: each item verified by "
        f"re-simulating the change ({num(data['seeds'])} seeds for the random-example baseline)"
    ]
    title = f"advice for {agent}: predicted and simulated {agent} distance"
    return "design", f"advice for {agent}", facts, [Grid(title, list(COLUMNS), rows)]


def _attacks(data: dict[str, Any], *_: Any) -> tuple[str, str, list[str], list[Grid]]:
    """An attack study's ``attacks.json`` (``misalign attacks``): every row."""
    rows = data["rows"]
    header = list(dict.fromkeys(key for row in rows for key in row))
    shown = [[_as_is(_value(row.get(key))) for key in header] for row in rows]
    auc = ", ".join(f"{name} {num(value, '.3f')}" for name, value in data["roc_auc"].items())
    facts = [f"monitor ROC AUC against honest: {auc}"] if auc else []
    facts += [f"skipped {name}: {why}" for name, why in (data.get("skipped") or {}).items()]
    attacks = len({row["attack"] for row in rows})
    defences = len({row["defence"] for row in rows})
    headline = (
        f"{plural(attacks, 'attack')} x {plural(defences, 'defence')}, "
        f"{num(data['seeds'])} seeds each"
    )
    return (
        "attack study",
        headline,
        facts,
        [Grid("every attack against every defence", header, shown)],
    )


def _as_is(text: str) -> dict[str, Any]:
    """A cell shown as written (right-aligned when it reads as a number)."""
    return cell(text) | {"text": text}


def _value(value: Any) -> str:
    """A cell of an attack study's row: numbers to 4 significant digits, missing as ``-``."""
    return "-" if value is None else num(value, ".4g")


def _sweep(
    data: dict[str, Any], directory: Path, config: str, table: Table | None
) -> tuple[str, str, list[str], list[Grid]]:
    """A sweep's ``manifest.json``, with what its ``sweep.toml``, ``rows/`` and ``sweep.csv``
    say of its axes, its finished chunks and its errors."""
    points, chunks = int(data["points"]), int(data["chunks"])
    done = _chunks_done(directory)
    facts = [
        f"sweep {str(data['sweep'])[:40]}: {plural(points, 'point')} in "
        f"{plural(chunks, 'chunk')}; {done} of {chunks} finished"
        + ("" if done >= chunks else " (run it again with --resume to finish it)")
    ]
    columns = data.get("columns")
    axes = columns[1 : columns.index("rho_median")] if "rho_median" in columns else []
    facts += _sweep_file(config, [str(axis) for axis in axes])
    headline = f"{plural(points, 'point')}"
    if table is not None:
        errors = plural(table.counted, "point")
        facts.append(f"{errors} raised (the error column of sweep.csv)")
        headline += f", {plural(table.counted, 'error')}"
    return "sweep", headline, facts, []


def _chunks_done(directory: Path) -> int:
    """How many chunk files ``rows/`` holds (names only: nothing is read)."""
    rows = directory / "rows"
    if rows.is_symlink() or not rows.is_dir():
        return 0
    try:
        return sum(1 for name in os.listdir(rows) if name.startswith("chunk-"))
    except OSError:
        return 0


def _sweep_file(text: str, order: list[str]) -> list[str]:
    """What ``sweep.toml`` says of the sweep's plays and axes, in the order of the rows'
    columns (``order``; nothing when it is not TOML)."""
    try:
        sweep = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    from misalign.workflows.sweep import axis_size

    specs = sweep.get("axes") or {}
    axes = []
    for axis in [*(a for a in order if a in specs), *(a for a in specs if a not in order)]:
        try:
            axes.append(f"{axis} ({plural(axis_size(axis, specs[axis]), 'value')})")
        except (ConfigError, TypeError, KeyError, IndexError):
            axes.append(str(axis))
    seeds = num(sweep.get("seeds"))
    how = " zipped: " if sweep.get("mode") == "zip" else ": "
    return [f"{seeds} plays per point; axes{how}{', '.join(axes)}"]


DESCRIBE: dict[str, Callable[..., tuple[str, str, list[str], list[Grid]]]] = {
    "run.json": _play,
    "theory.json": _theory,
    "design.json": _design,
    "attacks.json": _attacks,
    "manifest.json": _sweep,
}
"""Per main file, what its run is told as: ``(kind, headline, facts, grids)``."""
