"""Sweeps: one batched play (and its prediction) per point of a grid of configuration overrides,
streamed to a parquet dataset chunk by chunk, and resumable after a kill at any moment.

A sweep file::

    base = "two_agents.toml"   # a play configuration: a path (relative to this file) or a table
    seeds = 10                 # plays per point: seeds seed, seed + 1, ... of the point's config
    mode = "grid"              # grid: every combination of the axes; zip: their i-th values
    chunk = 16                 # points per parquet file (the unit of work and of resume)

    [axes]                     # keys: dotted configuration paths, as --set writes them
    "agents.B.eta" = {linspace = [0.1, 1.0, 10]}
    "agents.A.n" = [4, 8, 12]
    seed = {uniform = [0, 1000, 3], seed = 7}    # random draws with their own seed
    # {logspace = [0.01, 1.0, 5]}: geometric, from 0.01 to 1.0 (numpy's geomspace)

A sweep has at most ``POINTS`` points (the product of its axes' sizes in a grid), counted
before any value is built. Every point's configuration is validated before any point runs. A
point is one batched play of ``seeds`` seeds through the Python API (``setup``, ``simulate``,
``predict``) and gives one row: ``point`` (its index), the axis values (one column per axis,
named by its path), ``rho_median``, ``rounds_to_prediction_median`` (over the plays that reach
their prediction within 1e-8), ``share_diverged``, per agent with a target
``<name>.residual_mean`` and ``<name>.residual_std`` (distance of the final output to the
agent's own target, over the plays that stayed finite) and ``<name>.predicted_residual`` (mean
over the converging plays), ``seconds`` and ``error`` (``null``, or the one-line message of a
point that raised: the sweep goes on). A statistic without a value is ``null``.

The output directory holds ``sweep.toml`` (the resolved sweep, base inline: running it again
gives the same hash), ``manifest.json`` (the sweep's hash, points and chunks) and
``rows/chunk-NNNNN.parquet``, one file per finished chunk, each written to a temporary file
and renamed into place (and, once every chunk is done, ``sweep.csv`` and ``sweep.png``:
``misalign.workflows.sweep_view``): a kill leaves whole chunk files only, and ``resume`` computes
the
missing ones. Each chunk file records whose rows it holds (``IDENTITY`` in its metadata: the
sweep's hash, its axes, the chunk's number and points) and carries page checksums; a chunk
that is damaged, from another sweep or in another chunk's place is not taken as finished:
``resume`` says so in one line and computes it again. ``read_rows`` reads the dataset back.

Why one module: the axes, the chunks, the executors (joblib and Ray) and --resume share
the chunk files' format and the rules that keep a killed sweep whole.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from misalign.config import (
    BlackBoxConfig,
    ConfigError,
    HelperAgentConfig,
    PlayConfig,
    _apply,
    _validated,
    parse_config,
    read_toml,
)
from misalign.runtime.progress import progress_bar
from misalign.runtime.sizes import cores
from misalign.runtime.text import plural
from misalign.runtime.text import warn as warn_stderr

ROWS = "rows"
"""The dataset's folder inside the output directory."""
MANIFEST = "manifest.json"
IDENTITY = b"misalign.workflows.sweep"
"""The key of a chunk file's metadata that records its sweep: JSON ``{"sweep": hash, "axes":
[...], "chunk": k, "points": [first, last]}``."""
RANGES = ("linspace", "logspace", "uniform")
STATS = ("rho_median", "rounds_to_prediction_median", "share_diverged")
PER_AGENT = ("residual_mean", "residual_std", "predicted_residual")
POINTS = 10**6
"""The most points a sweep may have: each point's configuration is validated before any runs
(about half a millisecond a point, minutes at the limit), and every point is held in memory."""
SHOWN = 2000
"""Sweeps of this many points or more show a bar while every point is validated (drawn on
stderr, on a terminal only)."""
POINT_BYTES, AXIS_BYTES, VALUE_BYTES = 128, 32, 32
"""Estimated bytes the grid holds: per point (its tuple and its place in the sweep), per point
and axis (its slot in the tuple, and the column the schema reads), per axis value."""


class SweepConfig(BaseModel):
    """A sweep file as validated data (axes are checked by ``axis_values``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    base: dict[str, Any] | str = Field(description="a play configuration, or the path of one")
    seeds: int = Field(default=1, ge=1, le=10**6, description="plays per point")
    mode: Literal["grid", "zip"] = "grid"
    chunk: int = Field(default=16, ge=1, le=10**6, description="points per parquet file")
    axes: dict[str, list[Any] | dict[str, Any]] = Field(min_length=1)


class SweepStopped(RuntimeError):
    """The backend failed before every chunk finished (a worker died, the cluster went away);
    the finished chunks are kept, and ``resume`` computes the rest."""


@dataclass(frozen=True)
class Sweep:
    """A validated sweep, ready to run.

    Attributes:
        resolved: the sweep as plain data with its base inline (``sweep.toml`` of the run).
        digest: a short hash of ``resolved``, naming the sweep.
        base: the base play configuration as plain data.
        seeds: plays per point.
        chunk: points per chunk.
        axes: the axes' paths, in file order.
        points: per point, its value on every axis.
        agents: every agent with a target in any point, in order of first appearance.
    """

    resolved: dict[str, Any]
    digest: str
    base: dict[str, Any]
    seeds: int
    chunk: int
    axes: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]
    agents: tuple[str, ...]

    @property
    def chunks(self) -> int:
        """The number of chunks."""
        return math.ceil(len(self.points) / self.chunk)

    def chunk_points(self, k: int) -> list[tuple[int, tuple[Any, ...]]]:
        """Chunk ``k``'s points as ``(index, values)``."""
        stop = min(len(self.points), (k + 1) * self.chunk)
        return [(i, self.points[i]) for i in range(k * self.chunk, stop)]

    @property
    def columns(self) -> list[str]:
        """The columns of every row, in order."""
        agents = [f"{name}.{stat}" for name in self.agents for stat in PER_AGENT]
        return ["point", *self.axes, *STATS, *agents, "seconds", "error"]


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file and validate every point's configuration.

    Args:
        path: the sweep TOML; a ``base`` given as a path is read relative to its folder.

    Returns:
        The sweep.

    Raises:
        ConfigError: one line: the file, a key of the sweep, or the axis (and value) whose
            override gives an invalid configuration.
    """
    path = Path(path)
    return parse_sweep(read_toml(path), path.parent)


def parse_sweep(data: dict[str, Any], folder: Path = Path(".")) -> Sweep:
    """Validate a sweep given as plain data (see ``load_sweep``).

    Args:
        data: the sweep's keys.
        folder: where a ``base`` path is read from.

    Returns:
        The sweep.

    Raises:
        ConfigError: as ``load_sweep``.
    """
    config: SweepConfig = _validated(SweepConfig, data)
    check_grid(config)
    base = (
        config.base if isinstance(config.base, dict) else read_toml(folder / config.base, "base: ")
    )
    try:
        parse_config(base)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    values = {axis: axis_values(axis, spec) for axis, spec in config.axes.items()}
    if config.mode == "zip":
        points = list(zip(*values.values(), strict=True))
    else:
        points = list(itertools.product(*values.values()))
    axes = tuple(values)
    agents: dict[str, None] = {}
    checked: set[str] = set()
    shown = len(points) >= SHOWN and sys.stderr.isatty()
    bar = progress_bar(len(points), "validating points") if shown else None
    for k, point in enumerate(points):
        config_ = _checked(base, axes, point, config.seeds, checked)
        agents |= dict.fromkeys(
            n for n, a in config_.agents.items() if not isinstance(a, HelperAgentConfig)
        )
        if bar is not None and k % 1000 == 999:
            bar.advance(bar.task_ids[0], 1000)
    if bar is not None:
        bar.stop()
    resolved = {
        "base": base,
        "seeds": config.seeds,
        "mode": config.mode,
        "chunk": config.chunk,
        "axes": dict(config.axes),
    }
    canonical = json.dumps(resolved, sort_keys=True)
    return Sweep(
        resolved=resolved,
        digest=hashlib.sha256(canonical.encode()).hexdigest()[:12],
        base=base,
        seeds=config.seeds,
        chunk=config.chunk,
        axes=axes,
        points=tuple(points),
        agents=tuple(agents),
    )


def axis_size(axis: str, spec: list[Any] | dict[str, Any]) -> int:
    """How many values an axis takes, without building them.

    Args:
        axis: the axis' dotted path (for messages).
        spec: as ``axis_values`` reads it.

    Returns:
        The number of values.

    Raises:
        ConfigError: one line naming the axis.
    """
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"axis {axis}: needs at least one value")
        return len(spec)
    return _range(axis, spec)[3]


def axis_values(axis: str, spec: list[Any] | dict[str, Any]) -> list[Any]:
    """The values an axis takes.

    Args:
        axis: the axis' dotted path (for messages).
        spec: a non-empty list of values, or ``{linspace = [a, b, n]}``,
            ``{logspace = [a, b, n]}`` (geometric from ``a`` to ``b``, both positive) or
            ``{uniform = [a, b, n], seed = S}`` (``n`` draws from ``U(a, b)`` by seed ``S``).

    Returns:
        The values, as plain Python data.

    Raises:
        ConfigError: one line naming the axis.
    """
    if isinstance(spec, list):
        axis_size(axis, spec)
        return list(spec)
    kind, a, b, n = _range(axis, spec)
    if kind == "linspace":
        return np.linspace(a, b, n).tolist()
    if kind == "logspace":
        return np.geomspace(a, b, n).tolist()
    return np.random.default_rng(spec["seed"]).uniform(a, b, n).tolist()


def _range(axis: str, spec: dict[str, Any]) -> tuple[str, float, float, int]:
    """A range axis checked: ``(kind, start, stop, count)``.

    Raises:
        ConfigError: one line naming the axis: not exactly one known range, a bad
            ``[start, stop, count]``, a logspace end not positive, a uniform without its seed.
    """
    kinds = [k for k in RANGES if k in spec]
    allowed = {kinds[0], "seed"} if kinds == ["uniform"] else set(kinds)
    if len(kinds) != 1 or set(spec) - allowed:
        raise ConfigError(
            f"axis {axis}: expected a list of values, or one of "
            f"{{linspace = [a, b, n]}}, {{logspace = [a, b, n]}}, "
            f"{{uniform = [a, b, n], seed = S}} (got keys {', '.join(spec) or 'none'})"
        )
    kind = kinds[0]
    triple = spec[kind]
    numbers = isinstance(triple, list) and len(triple) == 3
    numbers = numbers and all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in triple
    )
    if not numbers or not (isinstance(triple[2], int) and 1 <= triple[2] <= 10**7):
        raise ConfigError(
            f"axis {axis}: {kind} needs [start, stop, count]: two finite numbers and a "
            f"count from 1 to 10^7 (got {triple!r})"
        )
    a, b, n = float(triple[0]), float(triple[1]), triple[2]
    if kind == "logspace" and (a <= 0 or b <= 0):
        raise ConfigError(f"axis {axis}: logspace needs positive ends (got {a:g}, {b:g})")
    seed = spec.get("seed")
    if kind == "uniform" and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"axis {axis}: uniform needs its own seed = S, S >= 0 (got {seed!r})")
    return kind, a, b, n


def check_grid(config: SweepConfig) -> int:
    """Count a sweep's points from its axes' sizes, before any value or point is built, and
    refuse a grid beyond ``POINTS`` points or the memory available.

    Args:
        config: the validated sweep file.

    Returns:
        The number of points.

    Raises:
        ConfigError: one line: an axis is malformed (naming it), zip axes differ in length,
            or ``axes: the sweep has N points (a x b x ...), more than the limit of POINTS``
            (or more than memory holds, as ``misalign.runtime.sizes.require`` says).
    """
    from misalign.runtime.sizes import require

    sizes = {axis: axis_size(axis, spec) for axis, spec in config.axes.items()}
    if config.mode == "zip":
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{axis} has {n}" for axis, n in sizes.items())
            raise ConfigError(f"axes: zip mode needs axes of one length ({listed})")
        points = next(iter(sizes.values()))
    else:
        points = math.prod(sizes.values())
    if points > POINTS:
        how = " x ".join(map(str, sizes.values())) if config.mode == "grid" else "zipped"
        raise ConfigError(
            f"axes: the sweep has {points:,} points ({how}), more than the limit of "
            f"{POINTS:,} points per sweep; split it into several sweeps"
        )
    held = points * (POINT_BYTES + AXIS_BYTES * len(sizes)) + VALUE_BYTES * sum(sizes.values())
    require({"axes": held}, f"the sweep's {points:,} points")
    return points


def point_config(base: dict[str, Any], axes: Sequence[str], values: Sequence[Any]) -> PlayConfig:
    """The configuration of one point: ``base`` with every axis set to its value.

    Raises:
        ConfigError: the overrides give no valid configuration.
    """
    data = json.loads(json.dumps(base))  # a deep copy, as plain data
    for axis, value in zip(axes, values, strict=True):
        _apply(data, f"{axis}={_toml(value)}")
    return parse_config(data)


def _checked(
    base: dict[str, Any], axes: Sequence[str], point: Sequence[Any], seeds: int, checked: set
) -> PlayConfig:
    """A point's configuration, checked to run as a sweep point; a problem is one line naming
    the axis (and value) that causes it, or every axis of the point when none alone does."""
    try:
        config = point_config(base, axes, point)
        _runnable(config, seeds)
        return config
    except ConfigError as exc:
        problem = str(exc)
    for axis, value in zip(axes, point, strict=True):
        key = f"{axis}={_toml(value)}"
        if key in checked:
            continue
        try:
            _runnable(point_config(base, [axis], [value]), seeds)
            checked.add(key)
        except ConfigError as exc:
            raise ConfigError(f"axis {axis} = {_toml(value)}: {_detail(str(exc), axis)}") from None
    where = ", ".join(f"{axis} = {_toml(value)}" for axis, value in zip(axes, point, strict=True))
    raise ConfigError(f"axes {where}: {_detail(problem, '')}")


def _runnable(config: PlayConfig, seeds: int) -> None:
    """Refuse what a sweep point cannot run: language-model agents (a sweep plays analytic and
    trained maps only) and a batch that would not fit in memory."""
    from misalign.api import check_size

    boxes = [n for n, a in config.agents.items() if isinstance(a, BlackBoxConfig)]
    if boxes:
        kind = config.agents[boxes[0]].kind
        raise ConfigError(f"agents.{boxes[0]}: a sweep plays no black-box agents ({kind})")
    check_size(config, seeds)


def _detail(message: str, axis: str) -> str:
    """A configuration message without the ``--set`` and axis prefixes the axis already says."""
    message = message.removeprefix("--set ")
    return message.removeprefix(f"{axis}: ") if axis else message


def _toml(value: Any) -> str:
    """A value as TOML text (inline tables), as ``--set`` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf, -inf and nan are TOML too
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # dates and times: TOML's own, read back as text


def run_point(
    base: dict[str, Any], axes: Sequence[str], values: Sequence[Any], seeds: int
) -> dict[str, Any]:
    """Play one point: ``seeds`` plays of its configuration as one batch, and its prediction.

    Args:
        base: the base configuration.
        axes: the axes' paths.
        values: the point's value on each axis.
        seeds: plays (seeds ``seed .. seed + seeds - 1`` of the point's configuration).

    Returns:
        The point's statistics (``STATS``, ``<agent>.<PER_AGENT>``), ``seconds`` and
        ``error``: ``None``, or the one-line message when the point raised.
    """
    started = time.perf_counter()
    try:
        row = _measure(point_config(base, axes, values), seeds)
        row["error"] = None
    except Exception as exc:  # one failed point is a row, not the end of the sweep
        text = str(exc).splitlines()[0] if str(exc) else ""
        row = {"error": f"{type(exc).__name__}: {text}" if text else type(exc).__name__}
    row["seconds"] = time.perf_counter() - started
    return row


def _measure(config: PlayConfig, seeds: int) -> dict[str, Any]:
    """The statistics of one batched play of ``config`` over ``seeds`` seeds."""
    from misalign.api import predict, setup, simulate
    from misalign.model.measure import rounds_to_prediction

    game = setup(config, seeds=range(config.seed, config.seed + seeds))
    trajectory = simulate(game)
    prediction = predict(game)
    finite = trajectory.diverged_at < 0
    reached = rounds_to_prediction(prediction.fixed_point, trajectory)
    row: dict[str, Any] = {
        "rho_median": float(np.median(prediction.rho)),
        "rounds_to_prediction_median": _median(reached[reached > 0]),
        "share_diverged": float(1 - finite.mean()),
    }
    converges = prediction.converges
    for name, target in game.targets.items():
        with np.errstate(over="ignore", invalid="ignore"):
            final = np.linalg.norm(trajectory.outputs(name)[-1] - target, axis=-1)
        predicted = np.linalg.norm(prediction.residual[name], axis=-1)[converges]
        row[f"{name}.residual_mean"] = _mean(final[finite])
        row[f"{name}.residual_std"] = float(final[finite].std()) if finite.any() else None
        row[f"{name}.predicted_residual"] = _mean(predicted)
    return row


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


@dataclass(frozen=True)
class Chunk:
    """One unit of work, as sent to a worker: chunk ``k`` of a sweep and what its points need.

    Attributes:
        k: the chunk's number.
        base: the base configuration.
        axes: the axes' paths.
        seeds: plays per point.
        columns: every row's columns.
        points: ``(index, values)`` per point.
    """

    k: int
    base: dict[str, Any]
    axes: tuple[str, ...]
    seeds: int
    columns: tuple[str, ...]
    points: tuple[tuple[int, tuple[Any, ...]], ...]

    @classmethod
    def of(cls, sweep: Sweep, k: int) -> Chunk:
        """Chunk ``k`` of ``sweep``."""
        return cls(
            k,
            sweep.base,
            sweep.axes,
            sweep.seeds,
            tuple(sweep.columns),
            tuple(sweep.chunk_points(k)),
        )


def run_chunk(chunk: Chunk) -> tuple[int, list[dict[str, Any]]]:
    """Play a chunk's points, one after another.

    Returns:
        ``(k, rows)``: one row per point, every column of ``chunk.columns`` present
        (``None`` where a value is missing or not a number).
    """
    rows = []
    for index, values in chunk.points:
        row = dict.fromkeys(chunk.columns)
        row |= {"point": index, **dict(zip(chunk.axes, values, strict=True))}
        row |= run_point(chunk.base, chunk.axes, values, chunk.seeds)
        rows.append({key: _null_nan(row[key]) for key in chunk.columns})
    return chunk.k, rows


def _null_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


Backend = Literal["local", "ray"]


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    backend: Backend = "local",
    workers: int | None = None,
    address: str | None = None,
    resume: bool = False,
    progress: bool = False,
    warn: Callable[[str], None] = warn_stderr,
) -> dict[str, Any]:
    """Run a sweep into ``out``, writing each chunk's rows as it finishes.

    Args:
        sweep: from ``load_sweep``.
        out: the output directory.
        backend: ``local`` (joblib worker processes) or ``ray``.
        workers: worker processes (local; default all cores) or CPUs of a Ray instance
            started here (default all cores).
        address: ray: join the running cluster at this address (default: start a local
            instance, or use the one this process has already started).
        resume: finish a sweep of which some chunks are done; without it such a directory
            is refused.
        progress: show a progress bar (points done, points per second) on stderr.
        warn: told, one line each, of every chunk file ``resume`` computes again or removes
            (damaged, from another sweep, in another chunk's place, not a chunk of this one).

    Returns:
        A summary: ``sweep`` (hash), ``points``, ``chunks``, ``computed`` (chunks computed by
        this call), ``errors`` (points that raised, in the whole dataset), ``seconds`` (of
        this call), ``out`` and ``finished_before`` (the sweep was already complete: this
        call computed nothing). ``misalign.workflows.sweep_view.write_views`` then writes
        ``sweep.csv``, ``sweep.png`` and the summary table (the ``sweep`` command does).

    Raises:
        ConfigError: ``out`` is or holds a symbolic link, holds another sweep, or a partial
            one (or a chunk file that is not a finished chunk of this sweep) without
            ``resume``; the backend is missing or its cluster unreachable; a file cannot be
            written (a full disk, a read-only folder: what finished is kept).
        SweepStopped: the backend failed part way; what finished is kept.
    """
    started = time.perf_counter()
    out = Path(out)
    check_backend(backend, address)
    done = _prepare(sweep, out, resume, warn)
    pending = [k for k in range(sweep.chunks) if k not in done]
    if pending:
        workers = workers or cores()
        if backend == "ray":
            start = functools.partial(_ray, sweep, pending, workers, address)
        else:
            start = functools.partial(_local, sweep, pending, workers)
        _collect(sweep, out, start, len(sweep.points) - _points(sweep, pending), progress)
    return {
        "sweep": sweep.digest,
        "points": len(sweep.points),
        "chunks": sweep.chunks,
        "computed": len(pending),
        "errors": _errors(out),
        "seconds": time.perf_counter() - started,
        "out": str(out),
        "finished_before": not pending,
    }


def check_backend(backend: str, address: str | None = None) -> None:
    """Refuse, before anything is written, a backend that cannot run: an unknown name, Ray
    not installed, or a cluster address nothing listens at (Ray itself would retry for
    minutes).

    Raises:
        ConfigError: one line saying what to install or which address failed.
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend: expected local or ray (got {backend!r})")
    if address is not None and backend != "ray":
        raise ConfigError("--address: needs --backend ray")
    if backend == "local":
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("--backend ray: Ray is not installed; pip install '.[ray]'") from None
    if address is None or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT)")
    import socket

    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--address {address}: no Ray cluster reachable ({reason})") from None


def _points(sweep: Sweep, chunks: Sequence[int]) -> int:
    return sum(len(sweep.chunk_points(k)) for k in chunks)


def chunk_path(out: Path, k: int) -> Path:
    """Where chunk ``k``'s rows live."""
    return out / ROWS / f"chunk-{k:05d}.parquet"


def _prepare(sweep: Sweep, out: Path, resume: bool, warn: Callable[[str], None]) -> set[int]:
    """Check ``out`` against the sweep, record the sweep there when new, and remove the
    temporary files a kill left behind; with ``resume``, also every chunk file that is not a
    finished chunk of this sweep (``_unfinished``), each named by ``warn``.

    Returns:
        The chunks already finished.

    Raises:
        ConfigError: ``out`` is, or holds, a symbolic link (``refuse_symlinks``), holds
            another sweep, a partial one or a chunk file that is not a finished chunk of it
            without ``resume``, or cannot be written.
    """
    from misalign.runtime.files import atomic_write, refuse_symlinks

    refuse_symlinks(out)
    manifest = out / MANIFEST
    try:
        if manifest.exists():
            recorded = json.loads(manifest.read_text()).get("sweep")
            if recorded != sweep.digest:
                raise ConfigError(
                    f"--out {out}: holds sweep {recorded}, not this sweep file ({sweep.digest}); "
                    "choose another --out"
                )
        elif (out / ROWS).exists() and any((out / ROWS).iterdir()):
            raise ConfigError(f"--out {out}: holds rows but no {MANIFEST}; choose another --out")
        else:
            import tomli_w

            text = tomli_w.dumps(sweep.resolved)
            atomic_write(out / "sweep.toml", lambda tmp: Path(tmp).write_text(text))
            record = {
                "sweep": sweep.digest,
                "points": len(sweep.points),
                "chunks": sweep.chunks,
                "chunk": sweep.chunk,
                "columns": sweep.columns,
            }
            body = json.dumps(record, indent=1)
            atomic_write(manifest, lambda tmp: Path(tmp).write_text(body))
        (out / ROWS).mkdir(parents=True, exist_ok=True)
        for stale in (out / ROWS).glob(".chunk-*"):
            stale.unlink()
    except OSError as exc:
        raise ConfigError(_cannot_write(out, exc)) from None
    except json.JSONDecodeError:
        raise ConfigError(f"--out {out}: {MANIFEST} is not JSON; choose another --out") from None
    done, bad = _unfinished(sweep, out)
    if (done or bad) and (len(done) < sweep.chunks or bad) and not resume:
        first = f" ({bad[0][0].name} {bad[0][1]})" if bad else ""
        raise ConfigError(
            f"--out {out}: this sweep has {len(done)} of {sweep.chunks} chunks done{first}; "
            "pass --resume to finish it"
        )
    names = _names(sweep)
    try:
        for path, why in bad:
            path.unlink()
            again = "computing it again" if path.name in names else "removed"
            warn(f"--out {out}: {ROWS}/{path.name} {why}; {again}")
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot remove {exc.filename} ({exc.strerror})") from None
    return done


def _names(sweep: Sweep) -> set[str]:
    """The file names of the sweep's chunks.

    Args:
        sweep: the sweep.

    Returns:
        ``chunk-00000.parquet`` ... for each of its chunks.
    """
    return {chunk_path(Path(), k).name for k in range(sweep.chunks)}


def _unfinished(sweep: Sweep, out: Path) -> tuple[set[int], list[tuple[Path, str]]]:
    """Which chunk files in ``out`` hold finished chunks of ``sweep``, and which do not.

    Args:
        sweep: the sweep.
        out: its output directory.

    Returns:
        The finished chunks' numbers, and ``(path, why)`` for every other file named like a
        chunk (``chunk-*.parquet``): damaged, recording another sweep (or none), in another
        chunk's place, or beyond the sweep's chunks.
    """
    schema, names = _schema(sweep), _names(sweep)
    done, bad = set(), []
    for path in sorted((out / ROWS).glob("chunk-*.parquet")):
        if path.name not in names:
            bad.append((path, f"is not a chunk of this sweep ({sweep.chunks} chunks)"))
            continue
        k = int(path.stem.removeprefix("chunk-"))
        why = _foreign(sweep, schema, k, path)
        if why is None:
            done.add(k)
        else:
            bad.append((path, why))
    return done, bad


def _foreign(sweep: Sweep, schema, k: int, path: Path) -> str | None:
    """Why the file at ``path`` is not chunk ``k`` of ``sweep`` as this sweep wrote it
    (``None``: it is). Every page is read and its checksum checked.

    Args:
        sweep: the sweep.
        schema: its rows' schema (``_schema``).
        k: the chunk the file's name says it holds.
        path: the file.

    Returns:
        ``None``, or a few words: ``is damaged (...)``, ``holds rows of sweep ...``, ...
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, page_checksum_verification=True)
        identity = json.loads((table.schema.metadata or {}).get(IDENTITY, b"null"))
    except (OSError, ValueError, pa.ArrowException) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        text = text.removeprefix(f"Could not open Parquet input source '{path}': ")
        return f"is damaged ({text.split('. ')[0][:120]})"
    if not isinstance(identity, dict):
        return "records no sweep (not written by misalign sweep, or by an older version)"
    recorded = str(identity.get("sweep"))[:40]
    if recorded != sweep.digest:
        return f"holds rows of sweep {recorded}, not of this one ({sweep.digest})"
    if identity.get("axes") != list(sweep.axes):  # the hash does not see the axes' order
        return "holds rows of this sweep with its axes in another order"
    if not table.schema.remove_metadata().equals(schema):
        return "has other columns than this sweep's rows"
    points = [index for index, _ in sweep.chunk_points(k)]
    if identity.get("chunk") != k or table.column("point").to_pylist() != points:
        return f"holds the rows of chunk {str(identity.get('chunk'))[:20]}, not of chunk {k}"
    return None


def _collect(
    sweep: Sweep,
    out: Path,
    start: Callable[[], Iterator[tuple[int, list[dict[str, Any]]]]],
    done: int,
    progress: bool,
) -> None:
    """Start the backend (``start()``: its chunks' results), write every chunk's rows as it
    arrives, atomically, and advance the progress bar. Ctrl-C or SIGTERM while the backend
    starts waits until it has (``misalign.runtime.terminate.deferred``); then, or at any later
    moment, the chunks in flight are stopped and the finished ones kept, with nothing on stderr
    from loky's manager thread (``misalign.runtime.terminate.quiet_manager_thread``)."""
    import pyarrow.parquet as pq

    from misalign.runtime.files import atomic_write
    from misalign.runtime.terminate import deferred, quiet_manager_thread

    schema = _schema(sweep)
    write = {"write_page_checksum": True}
    bar = None
    if progress:
        columns = ["{task.fields[rate]} points/s"]
        bar = progress_bar(len(sweep.points), "sweep", done=done, columns=columns, rate="-")
    started, computed, written, results = time.perf_counter(), 0, 0, None
    try:
        with deferred():
            results = start()
        for k, rows in results:
            table = _table(rows, schema).replace_schema_metadata({IDENTITY: _identity(sweep, k)})
            path = chunk_path(out, k)
            try:
                atomic_write(path, lambda tmp, t=table: pq.write_table(t, tmp, **write))
            except OSError as exc:  # the disk filled up, the folder became read-only
                raise ConfigError(
                    f"{_cannot_write(out, exc)}; the finished chunks are kept: run it again "
                    "with --resume once the folder can be written"
                ) from None
            computed, written = computed + len(rows), written + 1
            if bar is not None:
                rate = f"{computed / (time.perf_counter() - started):.3g}"
                bar.update(bar.task_ids[0], advance=len(rows), rate=rate)
    except ConfigError:
        raise
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the executor is shut down below, and
        quiet_manager_thread()  # loky's manager thread may raise meanwhile: not ours to show
        raise
    except Exception as exc:  # a worker died, the cluster went away
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise SweepStopped(
            f"the sweep stopped after {plural(written, 'new chunk')} ({type(exc).__name__}"
            f"{': ' + text if text else ''}); the finished chunks are kept: run it again "
            "with --resume"
        ) from exc
    finally:
        if bar is not None:
            bar.stop()
        if results is not None:
            _close(results)


def _close(results: Iterator[tuple[int, list[dict[str, Any]]]]) -> None:
    """Stop the backend's chunks in flight (a generator's ``close``), quietly: joblib warns
    that the tasks still running are cancelled, which is the point of stopping them."""
    import warnings

    close = getattr(results, "close", None)
    if close is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "[0-9]+ tasks ", UserWarning, "joblib")
            close()


def _cannot_write(out: Path, exc: OSError) -> str:
    """One line for a disk error in a sweep's directory.

    Args:
        out: the sweep's directory.
        exc: the error (its ``filename``, where it names one, is the file not written).

    Returns:
        ``--out OUT: cannot write FILE (why)``.
    """
    from misalign.runtime.files import reason

    name = f" {exc.filename}" if isinstance(exc.filename, str) else ""
    return f"--out {out}: cannot write{name} ({reason(exc)})"


def _identity(sweep: Sweep, k: int) -> bytes:
    """What chunk ``k``'s file records of its sweep (``IDENTITY``).

    Args:
        sweep: the sweep.
        k: the chunk.

    Returns:
        JSON: the sweep's hash and axes, the chunk's number and its first and last point.
    """
    points = sweep.chunk_points(k)
    record = {
        "sweep": sweep.digest,
        "axes": list(sweep.axes),
        "chunk": k,
        "points": [points[0][0], points[-1][0]],
    }
    return json.dumps(record).encode()


def _schema(sweep: Sweep):
    """The dataset's schema: each axis' type inferred from all its values (JSON text where
    they share none), floats for the statistics."""
    import pyarrow as pa

    fields = [pa.field("point", pa.int64())]
    for j, axis in enumerate(sweep.axes):
        values = [point[j] for point in sweep.points]
        try:
            kind = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            kind = pa.string()
        fields.append(pa.field(axis, kind))
    numbers = [c for c in sweep.columns if c not in ("point", *sweep.axes, "seconds", "error")]
    fields += [pa.field(c, pa.float64()) for c in [*numbers, "seconds"]]
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


def _table(rows: list[dict[str, Any]], schema):
    """The rows as a table of ``schema`` (axis values JSON-encoded where the schema says text
    but a value is not)."""
    import pyarrow as pa

    text = {f.name for f in schema if f.type == pa.string() and f.name != "error"}
    fixed = [
        {k: json.dumps(v) if k in text and not isinstance(v, str) else v for k, v in row.items()}
        for row in rows
    ]
    return pa.Table.from_pylist(fixed, schema=schema)


def read_rows(out: str | Path):
    """Every finished row of the sweep in ``out``, as a pyarrow table sorted by ``point``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((Path(out) / ROWS).glob("chunk-*.parquet"))
    if not files:
        return pa.table({})
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.sort_by("point")


def _errors(out: Path) -> int:
    """Points of the dataset in ``out`` that raised."""
    import pyarrow.parquet as pq

    files = sorted((out / ROWS).glob("chunk-*.parquet"))
    errors = (pq.read_table(f, columns=["error"]).column(0) for f in files)
    return sum(len(column) - column.null_count for column in errors)


def _local(
    sweep: Sweep, chunks: Sequence[int], workers: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Chunks run by joblib worker processes (in this process with one worker), in the order
    they finish. The workers outlive no sweep: each watches the sweep (``_watch_parent``) and
    exits within a second of its death (a sweep killed with SIGKILL, even while the worker
    was starting), and an idle worker exits after ``IDLE_S`` (loky's default keeps it 300 s);
    Ctrl-C and SIGTERM (``misalign.runtime.terminate``) close the generator, which shuts them
    down."""
    from joblib import Parallel, delayed, parallel_config

    if TRACKER_QUIET not in sys.warnoptions:  # passed to loky's resource tracker as -W
        sys.warnoptions.append(TRACKER_QUIET)
    config = {"initializer": _watch_parent, "initargs": (os.getpid(),)}
    with parallel_config(backend="loky", idle_worker_timeout=IDLE_S, **config):
        parallel = Parallel(n_jobs=workers, return_as="generator_unordered")
    return parallel(delayed(run_chunk)(Chunk.of(sweep, k)) for k in chunks)


IDLE_S = 10
"""Seconds an idle joblib worker waits for work before it exits."""

TRACKER_QUIET = "ignore::UserWarning:joblib.externals.loky.backend.resource_tracker"
"""The warning filter loky's resource tracker process starts with (it inherits the sweep's
``-W`` options): when a stopped sweep's workers have unlinked their semaphores just before the
tracker's own clean-up, it warns of 'leaked semlock objects' it then finds gone
(``FileNotFoundError``) on the sweep's stderr; nothing leaked."""
WATCH_S = 0.5
"""How often a worker checks that the sweep that started it is alive."""


def _watch_parent(parent: int) -> None:
    """In a worker process: exit at once when the sweep that started it is gone (the worker
    is then re-parented), so that a killed sweep leaves no process behind; and leave Ctrl-C
    to the sweep, which stops its workers (a terminal sends it to every process of the sweep,
    and a worker's traceback of it would be noise).

    Args:
        parent: the sweep's process ID, taken in the sweep: a worker that starts after the
            sweep died (a SIGKILL while the workers were starting) has another parent
            already, and exits at once.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=watch, name="misalign-parent-watch", daemon=True).start()


def _ray(
    sweep: Sweep, chunks: Sequence[int], workers: int, address: str | None
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Chunks run as Ray tasks, in the order they finish. Joins the cluster at ``address``, or
    uses the instance this process runs, or starts a local one (stopped at the end).

    Raises:
        ConfigError: Ray does not start, or does not join the cluster at ``address``.
    """
    import logging

    import ray

    from misalign.runtime.reaper import Reaper
    from misalign.runtime.terminate import reclaim, terminated

    started, reaper = False, None
    if not ray.is_initialized():
        reaper = Reaper()  # a SIGKILL of this process must not leave Ray's agents behind
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # no banner, no notes
        try:
            if address is not None:
                ray.init(address=address, **quiet)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, **quiet)
        except SystemExit as exc:  # Ray's own SIGTERM handler, set while it starts
            if exc.code != signal.SIGTERM:
                raise
            raise terminated() from None
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError: one line
            reaper.done()
            where = f"--address {address}" if address else "--backend ray"
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{where}: cannot start or join Ray ({text})") from None
        finally:
            reclaim()  # SIGTERM stops the sweep as Ctrl-C does, not by Ray's handlers
        started = True
    return _ray_results(ray, sweep, chunks, started, reaper)


def _ray_results(ray, sweep: Sweep, chunks: Sequence[int], started: bool, reaper):
    """Submit every chunk, yield results as they finish, and stop a Ray instance started here
    (and its watchdog, ``misalign.runtime.reaper``, which ends it if this process is killed)."""
    try:
        task = ray.remote(run_chunk)
        pending = [task.remote(Chunk.of(sweep, k)) for k in chunks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()
        if reaper is not None:
            reaper.done()


def summary_line(summary: dict[str, Any]) -> str:
    """The summary as one line for a terminal."""
    views = f"; table {summary['csv']}, figure {summary['figure']}"
    if summary["finished_before"]:
        return (
            f"sweep {summary['sweep']} already finished: {plural(summary['points'], 'point')} in "
            f"{summary['out']}; nothing to do{views}"
        )
    return (
        f"sweep {summary['sweep']}: {plural(summary['points'], 'point')} in "
        f"{plural(summary['chunks'], 'chunk')} ({summary['computed']} computed now, "
        f"{summary['seconds']:.3g} s), {plural(summary['errors'], 'error')}; "
        f"rows in {Path(summary['out']) / ROWS}{views}"
    )


__all__ = [
    "Chunk",
    "Sweep",
    "SweepConfig",
    "SweepStopped",
    "axis_size",
    "axis_values",
    "check_backend",
    "check_grid",
    "chunk_path",
    "load_sweep",
    "parse_sweep",
    "point_config",
    "read_rows",
    "run_chunk",
    "run_point",
    "run_sweep",
    "summary_line",
]
