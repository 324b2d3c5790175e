"""The one shape of a registry entry: claims, results, the run directory it writes, and
the measurements entries share."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from misalign.model.philox import GENERATOR


@dataclass(frozen=True)
class Claim:
    """One numeric claim: ``measured`` (an error or a count) passes when ``<= tolerance``;
    with ``at_least``, ``measured`` (a boundary found by the run) passes when ``>= tolerance``.
    A NaN passes neither way."""

    name: str
    measured: float
    tolerance: float
    at_least: bool = False

    @property
    def passed(self) -> bool:
        if self.at_least:
            return bool(self.measured >= self.tolerance)
        return bool(self.measured <= self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Result:
    """What a run produced: the table's rows, the figures written and the claims checked."""

    rows: list[dict[str, Any]]
    figures: list[Path]
    claims: list[Claim]
    out: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.claims)


@dataclass(frozen=True)
class Experiment:
    """A registry entry.

    Attributes:
        name: the name ``misalign reproduce`` takes.
        claim: the claim it checks, one line.
        typical: wall time of the full run, measured (for example ``"4 s"``).
        config: ``config(quick, seeds) -> dict``, the resolved parameters.
        run: ``run(quick, seeds, out) -> Result``.
        compares: what each claim of the full run compares, measured against predicted, one
            line per claim in the order of ``claims.json``.
        full_only: how many claims at the end of ``compares`` only the full run checks.
    """

    name: str
    claim: str
    typical: str
    config: Callable[[bool, int | None], dict[str, Any]]
    run: Callable[[bool, int | None, Path], Result]
    compares: tuple[str, ...] = ()
    full_only: int = 0

    def describe(self) -> dict[str, Any]:
        """The entry as ``reproduce --list --json`` prints it."""
        return {
            "name": self.name,
            "claim": self.claim,
            "typical": self.typical,
            "claims": len(self.compares),
            "full_only": self.full_only,
            "compares": list(self.compares),
        }


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of the resolved parameters (names the default output directory)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_out(experiment: Experiment, quick: bool, seeds: int | None) -> Path:
    """``runs/<name>-<config hash>``."""
    return Path("runs") / f"{experiment.name}-{config_hash(experiment.config(quick, seeds))}"


def version() -> dict[str, Any]:
    """The package version, the git commit when ``git rev-parse HEAD`` works, and the
    generator of every seeded number (``misalign.model.philox.GENERATOR``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        found = package_version("misalign")
    except PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        found = None
    commit = None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
        if done.returncode == 0:
            commit = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"version": found, "commit": commit, "generator": GENERATOR}


def _plain(value: Any) -> Any:
    """Numpy scalars as Python numbers, non-finite floats as ``None`` (strict JSON)."""
    import math

    import numpy as np

    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_run(
    out: Path,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    claims: list[Claim],
    figure: Any,
) -> Result:
    """Write a run's files into ``out`` and return its ``Result``.

    Args:
        out: the output directory (created).
        config: the resolved parameters (``config.json``).
        rows: the table, one flat dict per row, the same keys in every row.
        claims: the numeric claims (``claims.json``).
        figure: a matplotlib figure (from ``misalign.outputs.figure.new_figure``): saved as
            ``figure.svg`` and ``figure.png`` (``save_figure``).

    Raises:
        ConfigError: ``out`` is, or holds, a symbolic link (``refuse_symlinks``).
    """
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from misalign.outputs.figure import save_figure
    from misalign.runtime.files import atomic_write, refuse_symlinks

    out = Path(out)
    refuse_symlinks(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{k: _plain(v) for k, v in row.items()} for row in rows]
    columns = list(rows[0]) if rows else []

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "table.csv", write_csv)
    table = pa.Table.from_pylist(rows)
    atomic_write(out / "table.parquet", lambda tmp: pq.write_table(table, tmp))
    texts = {
        "config.json": config,
        "version.json": version(),
        "claims.json": [c.as_dict() | {"measured": _plain(c.measured)} for c in claims],
    }
    for name, data in texts.items():
        text = json.dumps(data, indent=1, default=str)
        atomic_write(out / name, lambda tmp, text=text: Path(tmp).write_text(text))
    for axis in figure.axes:  # the SVG gets the legends save_figure would add
        if axis.get_legend() is None and axis.get_legend_handles_labels()[0]:
            axis.legend(frameon=False, fontsize="small")
    figure.savefig(out / "figure.svg")
    save_figure(figure, out / "figure.png")
    return Result(rows, [out / "figure.png", out / "figure.svg"], claims, out, config)


def worst(values: Any) -> float:
    """The largest of ``values``, ``nan`` when there are none (or one is ``nan``): a claim over
    an empty set, or over a play that produced no number, fails."""
    import numpy as np

    values = np.asarray(values, float)
    return float(np.max(values)) if values.size else float("nan")


def measured_rate(errors: Any, floor: float = 1e-9, window: int = 20) -> Any:
    """Per play, the geometric rate at which ``errors`` (``(rounds, B)``) shrink or grow,
    ``(e[t1] / e[t0]) ** (1 / (t1 - t0))`` over the last ``window`` rounds before the error
    first falls below ``floor`` (or before the end): the measured counterpart of ``rho``."""
    import numpy as np

    rounds = errors.shape[0]
    below = errors < floor
    t1 = np.where(below.any(axis=0), below.argmax(axis=0) - 1, rounds - 1)
    t1 = np.clip(t1, 1, rounds - 1)
    t0 = np.maximum(t1 - window, 0)
    plays = np.arange(errors.shape[1])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (errors[t1, plays] / errors[t0, plays]) ** (1.0 / (t1 - t0))


ROUNDED = 1e3
"""``two_mode_rate`` stops this far above its floor."""


def two_mode_rate(moves: Any, floor: float = 1e-12, window: int = 30) -> Any:
    """Per play, the rate of a play from its differences ``D_t = s_{t+1} - s_t`` alone
    (``(rounds, B, D)``): past the transient its two slowest modes dominate them, so
    ``D_{t+2} = a D_{t+1} + b D_t`` holds (Prony), and the rate is the largest root of
    ``z^2 - a z - b``. Two modes of close magnitude, real or a complex pair (whose ``|D_t|``
    oscillates), are told apart, which a ratio of norms (``measured_rate``) cannot do over a
    short window. Fitted by least squares, every round weighing one, over the last ``window``
    rounds before ``|D_t| / |D_0|`` falls below ``ROUNDED * floor`` (or before the end: the
    recurrence needs the differences' directions, which rounding spoils near ``floor``
    before it spoils their norms); a play whose
    differences stay on one line (one mode) gets the ratio of norms. The measured counterpart
    of ``rho``.

    Args:
        moves: the differences, ``(rounds, B, D)``.
        floor: where rounding starts to show, relative to the first difference.
        window: rounds fitted.

    Returns:
        The rates, ``(B,)`` (NaN where fewer than 4 rounds can be fitted).
    """
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        steps = np.linalg.norm(moves, axis=-1)
        relative = steps / steps[:1]
    ratio = measured_rate(relative, floor, window)
    rates = np.full(moves.shape[1], np.nan)
    for b in range(moves.shape[1]):
        below = ~(relative[:, b] >= ROUNDED * floor)  # NaN counts as below
        end = int(below.argmax()) if below.any() else len(relative)
        t = np.arange(max(end - window, 0), end - 2)
        if len(t) < 4:
            continue
        older, old, new = (moves[t + k, b] / steps[t, b, None] for k in range(3))
        design = np.stack([old.ravel(), older.ravel()], axis=1)
        sv = np.linalg.svd(design, compute_uv=False)
        if not np.isfinite(sv).all() or sv[1] < 1e-6 * sv[0]:
            rates[b] = ratio[b]  # one mode
            continue
        (a, c), *_ = np.linalg.lstsq(design, new.ravel(), rcond=None)
        rates[b] = np.abs(np.roots([1.0, -a, -c])).max()
    return rates


def theory_and_simulation(
    ax: Any,
    x: Any,
    theory: Any,
    simulated: Any,
    color: str,
    labels: tuple[str | None, str | None],
    **markers: Any,
) -> None:
    """Draw the theory as a line (mean over seeds) in a band of one standard deviation and the
    simulation as markers (mean) with standard-deviation error bars: the figures' one style.

    Args:
        ax: the matplotlib axes.
        x: the abscissae, ``(k,)``.
        theory: the theory's values, ``(k, seeds)`` (statistics over the last axis).
        simulated: the simulation's values, ``(k, seeds)``, or ``(k, m)`` for any ``m``.
        color: the colour of both.
        labels: the legend entries of the line and of the markers (``None``: no entry).
        **markers: passed to ``ax.errorbar`` (``ms``, ``capsize``, ...; defaults ``fmt="o"``,
            ``capsize=3``).

    Returns:
        None.
    """
    import numpy as np

    theory, simulated = np.asarray(theory, float), np.asarray(simulated, float)
    mean, std = theory.mean(axis=-1), theory.std(axis=-1)
    ax.plot(x, mean, "-", color=color, label=labels[0])
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    ax.errorbar(
        x,
        simulated.mean(axis=-1),
        simulated.std(axis=-1),
        color=color,
        label=labels[1],
        **{"fmt": "o", "capsize": 3} | markers,
    )


def errors_from_fixed_point(game: Any, trajectory: Any, prediction: Any) -> tuple[Any, Any]:
    """The simulated error on the stacked outputs (blocks in schedule order).

    Args:
        game, trajectory, prediction: ``misalign.api``'s ``setup``, ``simulate`` and
            ``predict`` of one batch of ``B`` plays.

    Returns:
        ``|s_t - s*|`` for rounds ``1..T`` (``(T, B)``; ``inf`` or ``nan`` where a play
        overflowed) and ``e_0 = s_0 - s*`` (``(B, N d)``; every block starts at the game's
        start).
    """
    import numpy as np

    names = game.schedule.agents
    star = np.concatenate([prediction.fixed_point[n] for n in names], axis=-1)
    start = np.concatenate([game.start] * len(names), axis=-1)
    stacked = np.concatenate([trajectory.outputs(n) for n in names], axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.linalg.norm(stacked - star, axis=-1), start - star


def errors_by_matrix_powers(R: Any, e0: Any, rounds: int) -> tuple[Any, Any]:
    """The theory's error ``|R^t e_0|`` by matrix powers of the round map.

    Args:
        R: the round maps, ``(B, m, m)`` (``misalign.model.theory.round_map(...).R``).
        e0: the initial errors ``s_0 - s*``, ``(B, m)``.
        rounds: ``T``.

    Returns:
        ``|R^t e_0|`` for ``t = 1..T`` (``(T, B)``) and ``max_t |R^t|_2`` over
        ``t = 0..T`` (``(B,)``), the bound on the growth ``|R^t e_0| / |e_0|``.
    """
    import numpy as np

    power = np.broadcast_to(np.eye(R.shape[-1]), R.shape).copy()
    errors = np.empty((rounds, len(e0)))
    bound = np.ones(len(e0))
    for t in range(rounds):
        power = R @ power
        errors[t] = np.linalg.norm(np.einsum("bij,bj->bi", power, e0), axis=-1)
        bound = np.maximum(bound, np.linalg.norm(power, ord=2, axis=(1, 2)))
    return errors, bound
