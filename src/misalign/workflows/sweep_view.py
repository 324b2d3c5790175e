"""What a finished sweep gives to look at beside its parquet rows: ``sweep.csv`` (every row, for
any tool), ``sweep.png`` (the key statistics over the axes) and a summary table, printed at the
end of ``misalign sweep``.

The figure draws each of ``KEYS`` (one panel each) against the first axis: one line for a
sweep of one axis (or a zip sweep, whose axes move together), a line per value of the second
axis when it has at most ``LINES`` values, else a heat map over the first two axes. The table
has a row per point for a sweep of one axis, a zip sweep or one of at most ``SHOWN`` points,
else a row per value of the first axis; at most ``SHOWN`` rows, evenly spread. Whatever is left
of the other axes is reduced over the points that have a value: ``share_diverged`` by its mean,
the others by their median.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from misalign.config import ConfigError
from misalign.runtime.files import atomic_write
from misalign.runtime.text import plural
from misalign.workflows.sweep import Sweep, axis_values, read_rows

CSV = "sweep.csv"
"""Every row of the sweep, in point order, beside ``rows/``."""
FIGURE = "sweep.png"
"""The key statistics over the axes."""
KEYS = ("rho_median", "share_diverged", "rounds_to_prediction_median")
"""The statistics the figure draws and the table shows (with up to ``AGENTS`` residuals)."""
TITLES = {
    "rho_median": "rho, median over each point's plays",
    "share_diverged": "share of plays that diverged",
    "rounds_to_prediction_median": "rounds to the prediction (within 1e-8), median",
}
SHOWN = 20
"""The most rows of the summary table."""
LINES = 8
"""The most values of the second axis drawn as one line each (more: a heat map)."""
AGENTS = 3
"""The most agents whose ``<name>.residual_mean`` the table shows (all are in the CSV)."""


def write_views(sweep: Sweep, out: Path, again: bool = True) -> dict[str, Any]:
    """Write ``sweep.csv`` and ``sweep.png`` into the finished sweep's directory, atomically.

    Args:
        sweep: the sweep.
        out: its output directory, every chunk finished.
        again: write them even where they exist (``False``: a finished sweep run again
            writes only what is missing, such as the files of a sweep from an older version).

    Returns:
        ``{"csv": path, "figure": path, "table": summary_table(...)}``.

    Raises:
        ConfigError: one line naming the file that cannot be written.
    """
    out = Path(out)
    rows = read_rows(out)
    axes = _axes(sweep)
    grids = _grids(sweep, axes, rows)
    writers = {CSV: lambda: write_csv(rows, out / CSV)}
    writers[FIGURE] = lambda: plot_sweep(sweep, axes, grids, out / FIGURE)
    for name, write in writers.items():
        try:
            if again or not (out / name).exists():
                write()
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot write {name} ({exc.strerror or exc})") from None
    errors = rows.column("error").to_pylist()
    return {
        "csv": str(out / CSV),
        "figure": str(out / FIGURE),
        "table": summary_table(sweep, axes, grids, errors),
    }


def write_csv(rows, path: Path) -> Path:
    """Write a table of rows as CSV, atomically: numbers as parquet holds them (shortest text
    that reads back the same), a missing value empty, a list or table as JSON text.

    Args:
        rows: a pyarrow table (``misalign.workflows.sweep.read_rows``).
        path: the CSV file.

    Returns:
        ``path``.
    """
    import pyarrow as pa
    import pyarrow.csv

    for i, field in enumerate(rows.schema):
        if pa.types.is_nested(field.type):
            text = [None if v is None else json.dumps(v) for v in rows.column(i).to_pylist()]
            rows = rows.set_column(i, field.name, pa.array(text, pa.string()))
    options = pyarrow.csv.WriteOptions(quoting_style="needed")
    atomic_write(path, lambda tmp: pyarrow.csv.write_csv(rows, tmp, options))
    return path


def _axes(sweep: Sweep) -> list[tuple[str, list[Any]]]:
    """Each axis and its values, in file order (one for a zip sweep: its first)."""
    axes = [(axis, axis_values(axis, spec)) for axis, spec in sweep.resolved["axes"].items()]
    return axes[:1] if sweep.resolved["mode"] == "zip" else axes


def _residuals(sweep: Sweep) -> list[str]:
    """The residual columns the table shows: ``<name>.residual_mean`` of the first agents."""
    return [f"{name}.residual_mean" for name in sweep.agents[:AGENTS]]


def _grids(sweep: Sweep, axes, rows) -> dict[str, np.ndarray]:
    """Each key column (and ``errors``, 1 where a point raised) as an array over the axes
    (``NaN`` where there is no value): shape ``(n1, n2, ...)`` for a grid, ``(n,)`` for zip."""
    shape = tuple(len(values) for _, values in axes)
    points = rows.column("point").to_numpy()
    grids = {}
    for name in [*KEYS, *_residuals(sweep)]:
        full = np.full(len(sweep.points), np.nan)
        full[points] = rows.column(name).to_numpy()
        grids[name] = full.reshape(shape)
    failed = np.zeros(len(sweep.points))
    failed[points] = rows.column("error").is_valid().to_numpy(zero_copy_only=False)
    grids["errors"] = failed.reshape(shape)
    return grids


def _reduce(values: np.ndarray, key: str, keep: int) -> np.ndarray:
    """``values`` over the axes reduced to its first ``keep`` axes: ``errors`` summed,
    ``share_diverged`` by its mean, the others by their median, over the values that are not
    ``NaN`` (``NaN`` where none is)."""
    flat = values.reshape(*values.shape[:keep], -1)
    if key == "errors":
        return flat.sum(axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no value in a slice: NaN
        return (np.nanmean if key == "share_diverged" else np.nanmedian)(flat, axis=-1)


def summary_table(sweep: Sweep, axes, grids, errors: list[str | None]) -> dict[str, Any]:
    """The summary table: a row per point for a sweep of one axis, a zip sweep or one of at
    most ``SHOWN`` points, else a row per value of the first axis with the other axes reduced
    (``_reduce``); at most ``SHOWN`` rows, evenly spread.

    Args:
        sweep: the sweep.
        axes: ``_axes(sweep)``.
        grids: ``_grids(...)``.
        errors: per point, in point order, ``None`` or its error.

    Returns:
        ``{"title": str, "columns": [...], "rows": [[...], ...]}``: axis values as the sweep
        file gives them, statistics as numbers (``None``: no value), counts as integers.
    """
    stats = [*KEYS, *_residuals(sweep)]
    title = f"sweep {sweep.digest}: {plural(len(sweep.points), 'point')}"
    title += f", {plural(sweep.seeds, 'play')} each"
    if len(sweep.agents) > AGENTS:
        title += f"; residuals of the first {AGENTS} of {len(sweep.agents)} agents"
    if len(axes) == 1 or len(sweep.points) <= SHOWN:
        failed = any(e is not None for e in errors)
        flat = {s: grids[s].reshape(-1) for s in stats}
        rows = [
            [i, *sweep.points[i], *(_plain(flat[s][i]) for s in stats)]
            + ([errors[i]] if failed else [])
            for i in _spread(len(sweep.points))
        ]
        columns = ["point", *sweep.axes, *stats, *(["error"] if failed else [])]
        return {
            "title": title + _shown(len(rows), len(sweep.points), "point"),
            "columns": columns,
            "rows": rows,
        }
    first, values = axes[0]
    count = len(sweep.points) // len(values)
    reduced = {key: _reduce(grids[key], key, 1) for key in [*stats, "errors"]}
    rows = [
        [values[i], count, *(_plain(reduced[s][i]) for s in stats), int(reduced["errors"][i])]
        for i in _spread(len(values))
    ]
    title += (
        f"; per value of {first}, over its {plural(count, 'point')}: share_diverged the mean, "
        f"the others the median{_shown(len(rows), len(values), 'value')}"
    )
    return {"title": title, "columns": [first, "points", *stats, "errors"], "rows": rows}


def _spread(n: int) -> list[int]:
    """At most ``SHOWN`` of ``range(n)``, evenly spread, the first and the last included."""
    return [int(i) for i in np.unique(np.linspace(0, n - 1, min(SHOWN, n)).round())]


def _shown(rows: int, of: int, noun: str) -> str:
    """What a title says when the table shows only some of its points or values."""
    return f"; {rows} of the {of:,} {noun}s shown (every row in {CSV})" if rows < of else ""


def _plain(value: float) -> float | None:
    """A number for JSON: ``None`` for ``NaN``."""
    return None if np.isnan(value) else float(value)


def cell(value: Any) -> str:
    """A value of the summary table as text: numbers to 4 significant digits, ``-`` for none,
    a list or table as JSON."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, ".4g")
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def plot_sweep(sweep: Sweep, axes, grids: dict[str, np.ndarray], path: Path) -> Path:
    """Draw ``KEYS`` over the axes (see the module) into ``path``, atomically. Each panel's
    title says how: ``a line per <axis>`` or ``heat map, <axis> up``, and which axes it
    reduces (``mean over ...``, ``median over ...``).

    Args:
        sweep: the sweep.
        axes: ``_axes(sweep)``.
        grids: ``_grids(...)``.
        path: the PNG.

    Returns:
        ``path``.
    """
    from misalign.outputs.figure import new_figure, save_figure

    fig, panels = new_figure(len(KEYS), (4.6 * len(KEYS), 4.0))
    first, values = axes[0]
    x, labels = _positions(values)
    spec = sweep.resolved["axes"][first]
    log = isinstance(spec, dict) and "logspace" in spec
    zipped = sweep.resolved["mode"] == "zip"
    heat = len(axes) >= 2 and len(axes[1][1]) > LINES
    keep = min(len(axes), 2)
    for ax, key in zip(panels, KEYS, strict=True):
        data = _reduce(grids[key], key, keep)
        how = []
        if keep == 2:
            how.append(f"heat map, {axes[1][0]} up" if heat else f"a line per {axes[1][0]}")
        if axes[keep:]:
            reduced = "mean" if key == "share_diverged" else "median"
            how.append(f"{reduced} over {', '.join(axis for axis, _ in axes[keep:])}")
        ax.set_title(TITLES[key] + (f"\n({'; '.join(how)})" if how else ""), fontsize="medium")
        if heat:
            _heat(ax, axes, data, key)
            continue
        data = data if keep == 2 else data[:, None]
        order = np.argsort(x, kind="stable") if zipped else slice(None)
        for j in range(data.shape[1]):
            named = keep == 2 and ax is panels[0]
            label = f"{axes[1][0]} = {cell(axes[1][1][j])}" if named else None
            ax.plot(np.asarray(x)[order], data[order, j], "o-", ms=4, label=label)
        if key == "rho_median":
            ax.axhline(1.0, color="0.5", ls="--", lw=1, label="rho = 1: edge of stability")
        if key == "share_diverged":
            ax.set_ylim(-0.05, 1.05)
        ax.set(xlabel=first, xscale="log" if log else "linear")
        _ticks(ax, "x", x, labels)
    how = plural(len(sweep.axes), "axis", "axes")
    if zipped and len(sweep.axes) > 1:
        moves = "moves" if len(sweep.axes) == 2 else "move"
        how = f"zip: {', '.join(sweep.axes[1:])} {moves} with {first}"
    fig.suptitle(f"sweep {sweep.digest}: {plural(len(sweep.points), 'point')} ({how})")
    atomic_write(path, lambda tmp: save_figure(fig, tmp), suffix=".png")
    return path


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Where an axis' values go on the page: the numbers themselves, or (values that are not
    all numbers) their places, with their text as labels."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    return [float(i) for i in range(len(values))], [_label(v) for v in values]


def _label(value: Any) -> str:
    """A value as a tick's name: a number to 3 significant digits, other values cut short."""
    if isinstance(value, float):
        return format(value, ".3g")
    text = cell(value)
    return text if len(text) <= 16 else text[:15] + "…"


def _ticks(ax, which: str, places: list[float], labels: list[str] | None) -> None:
    """Name the places of an axis whose values are not numbers, or of a heat map (at most 8
    names across, 12 up)."""
    if labels is None:
        return
    step = max(1, -(-len(labels) // (8 if which == "x" else 12)))
    getattr(ax, f"set_{which}ticks")(places[::step], labels[::step], fontsize=7)


def _heat(ax, axes, data: np.ndarray, key: str) -> None:
    """A heat map of ``data`` (first axis across, second axis up); no value in grey."""
    from matplotlib import colormaps

    (first, x_values), (second, y_values) = axes[:2]
    shown = np.ma.masked_invalid(data.T)
    ax.set(xlabel=first, ylabel=second)
    if shown.count() == 0:
        ax.text(0.5, 0.5, "no value to draw", ha="center", transform=ax.transAxes)
        return
    image = ax.imshow(
        shown,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=colormaps["viridis"].with_extremes(bad="0.75"),
    )
    for which, values in (("x", x_values), ("y", y_values)):
        places = list(range(len(values)))
        _ticks(ax, which, places, [_label(v) for v in values])
    ax.figure.colorbar(image, ax=ax, shrink=0.9, label=key)
