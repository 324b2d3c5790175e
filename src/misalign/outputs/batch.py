"""The batch summary of ``run --seeds`` (the JSON's ``batch`` object), from the batch's
measurements (``misalign.model.measure.Measured``): array work over the plays, no loop over
them, so 10^6 plays report in about a second."""

from __future__ import annotations

from typing import Any

import numpy as np

from misalign.api import Game
from misalign.model.measure import Measured, measure
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction

RECORDED = 200
"""``batch`` of a recorded trajectory keeps the distances of at most this many rounds (every
``ceil(rounds / RECORDED)``-th round and the last): what the batch figure draws."""


def recorded_rounds(rounds: int, every: int | None = None) -> np.ndarray:
    """The rounds (1-based) whose distances a batch keeps: every ``every``-th round and the
    last (``every``: at most ``RECORDED`` rounds when ``None``; 0: none)."""
    if every == 0 or rounds == 0:
        return np.zeros(0, dtype=np.int64)
    every = max(1, -(-rounds // RECORDED)) if every is None else every
    return np.unique(np.append(np.arange(every, rounds + 1, every), rounds))


def measured(game: Game, prediction: Prediction, trajectory: Trajectory) -> Measured:
    """The measurements of a recorded batch (``misalign.model.measure.measure``), with the
    distances of ``recorded_rounds``."""
    targets = {n: game.targets[n] for n in game.schedule.agents if n in game.targets}
    return measure(trajectory, prediction, targets, recorded_rounds(trajectory.rounds))


def batch(game: Game, prediction: Prediction, trajectory: Trajectory) -> dict[str, Any]:
    """The batch summary of a recorded batch (``batch_report`` of its ``measured``)."""
    return batch_report(measured(game, prediction, trajectory), game.seeds)


def batch_report(
    m: Measured, seeds: np.ndarray, record: str | None = None, device: str = "numpy"
) -> dict[str, Any]:
    """The batch of ``run --seeds`` as one story: which plays converge and which diverge, the
    spread of ``rho`` over seeds, and per agent with a target its final and predicted
    distance over the converging plays, robustly (median and 10-90% quantiles) and as mean
    ± std, with the largest gap between simulation and theory.

    A play counts as converging when the theory says so (``rho < 1``) and its outputs
    stayed finite; every other play is listed in ``diverging_seeds``. ``observed`` is what the
    plays did, judged from their outputs alone (``misalign.model.observe``): ``counts`` of plays
    per class and ``periods`` (cycles per period). ``record``: what the run kept of each
    play's outputs (``null`` when every output was kept); ``device``: where the plays ran
    (``numpy``, or the torch device of ``run --device``).

    Args:
        m: the batch's measurements.
        seeds: the plays' seeds.
        record: the run's ``--record`` mode.
        device: ``numpy``, or a torch device's name.

    Returns:
        The JSON-ready summary (per-play lists as numpy arrays; ``to_json`` writes them).
    """
    ok = m.ok
    distance = {}
    for name, simulated in m.final_distance.items():
        predicted = m.residual[name]
        with np.errstate(invalid="ignore"):
            gap = np.abs(simulated - predicted)[ok]
        distance[name] = {
            "simulated": np.where(ok, simulated, np.nan),
            "predicted": np.where(ok, predicted, np.nan),
            **_quantiles(simulated[ok], "simulated"),
            **_quantiles(predicted[ok], "predicted"),
            "max_abs_error": float(gap.max()) if ok.any() else None,
        }
    reached = m.rounds_to_prediction()[ok]
    reached = reached[reached > 0]
    return {
        "seeds": np.asarray(seeds),
        "plays": len(seeds),
        "converging": int(ok.sum()),
        "diverging_seeds": np.asarray(seeds)[~ok],
        "rho": {"per_seed": m.rho, **_quantiles(m.rho, "")},
        "distance": distance,
        "rounds_to_prediction": {
            "median": float(np.median(reached)) if len(reached) else None,
            "max": float(reached.max()) if len(reached) else None,
            "never": int(ok.sum() - len(reached)),
        },
        "spread": _spread(m, ok),
        "observed": m.observed().counts(),
        "record": record,
        "device": device,
    }


def _spread(m: Measured, ok: np.ndarray) -> dict[str, Any] | None:
    """With sampled agents (docs/theory.md §6), per agent the RMS distance of the final output
    from its predicted limit over the converging plays, ``observed = sqrt(mean |s_T - s*|^2)``,
    beside the theory's ``predicted = sqrt(mean tr Sigma)``; ``null`` without noise."""
    if not m.variance or not ok.any():
        return None
    return {
        name: {
            "observed": float(np.sqrt(m.final_gap[name][ok].mean())),
            "predicted": float(np.sqrt(trace[ok].mean())),
        }
        for name, trace in m.variance.items()
    }


def _quantiles(values: np.ndarray, prefix: str) -> dict[str, float | None]:
    """``median``, ``q10``, ``q90``, ``mean``, ``std`` and ``min``/``max`` of ``values``
    (``None`` when empty), keys prefixed with ``prefix_``."""
    stats = ("median", "q10", "q90", "mean", "std", "min", "max")
    keys = [f"{prefix}_{k}" if prefix else k for k in stats]
    if not len(values):
        return dict.fromkeys(keys)
    with np.errstate(invalid="ignore"):  # plays without a map have rho = inf: inf - inf
        q10, median, q90 = np.quantile(values, [0.1, 0.5, 0.9])
        numbers = (median, q10, q90, values.mean(), values.std(), values.min(), values.max())
    return {key: float(x) for key, x in zip(keys, numbers, strict=True)}
