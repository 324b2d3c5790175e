"""The helper study: rounds for the main agent to reach its target, with and without a helper
(docs/theory.md §4).

For each dimension ``d``, condition number ``kappa`` and seed, the main agent ``A``
takes gradient steps (``Gamma = 0.5 I``) on a prompt whose covariance has eigenvalues
spaced geometrically from 1 down to ``1 / kappa`` (``n = 20 d`` examples, so
``H_A`` has condition number close to ``kappa``). Four plays are timed, each until
``|u_t - w_A*| < tol``:

- ``A alone``: ``A`` reads its own output (plain gradient descent);
- ``plain alternation``: ``A`` alternates with an aligned partner (same target,
  its own prompt of the same geometry), so the play's fixed point is ``w_A*``;
- ``white-box helper`` and ``secant helper``: ``A`` alternates with the helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from misalign.api import setup, simulate
from misalign.config import PlayConfig, parse_config
from misalign.runtime.progress import progress_bar

METHODS = ("A alone", "plain alternation", "white-box helper", "secant helper")


def study_config(method: str, d: int, kappa: float, seed: int, rounds: int) -> PlayConfig:
    """The play of one method for one ``(d, kappa, seed)``."""
    spectrum = np.geomspace(1.0, 1.0 / kappa, d).tolist() if d > 1 else [1.0]
    learner = {"n": 20 * d, "spectrum": spectrum, "preconditioner": "identity", "eta": 0.5}
    agents: dict[str, Any] = {"A": learner}
    schedule = ["A"]
    if method == "plain alternation":
        target = _target(d, seed)
        agents = {"A": learner | {"target": target}, "B": learner | {"target": target}}
        schedule = ["A", "B"]
    elif method.endswith("helper"):
        agents["H"] = {"kind": "helper", "serves": "A", "mode": method.split()[0]}
        schedule = ["H", "A"]  # the helper's first output is A's first input
    return parse_config(
        {"seed": seed, "d": d, "rounds": rounds, "schedule": schedule, "agents": agents}
    )


def _target(d: int, seed: int) -> list[float]:
    """``A``'s target as the other methods sample it (so every method chases the same one)."""
    config = study_config("A alone", d, 10.0, seed, 1)
    return setup(config).targets["A"][0].tolist()


def rounds_to_target(configs: Sequence[PlayConfig], tol: float) -> np.ndarray:
    """Play a batch and return, per play, the first round (from 1) with ``|u_t - w_A*| < tol``,
    or ``inf`` where the play never gets there."""
    game = setup(configs)
    distance = simulate(game).distance("A", game.targets["A"])
    reached = distance < tol
    return np.where(reached.any(axis=0), reached.argmax(axis=0) + 1.0, np.inf)


def run_helper_study(
    dims: Sequence[int] = (2, 5, 10, 20),
    kappas: Sequence[float] = (10, 100, 1000),
    seeds: int = 5,
    tol: float = 1e-8,
    cap: int = 100_000,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rounds to ``tol`` for every method, dimension, condition number and seed.

    Args:
        dims, kappas: the grid.
        seeds: seeds ``0..seeds-1`` per grid point.
        tol: the distance to ``w_A*`` that counts as reached.
        cap: the most rounds a play may take (``inf`` beyond).
        progress: show a progress bar on stderr.

    Returns:
        One row per ``(method, d, kappa)``: ``rounds`` per seed (``None`` past the cap),
        their median and maximum, and the measured condition number of ``H_A``.
    """
    rows = []
    bar = progress_bar(len(METHODS) * len(dims), "helper study") if progress else None
    for d in dims:
        grid = [(kappa, seed) for kappa in kappas for seed in range(seeds)]
        conditions = _conditions(d, grid)
        for method in METHODS:
            fast = method.endswith("helper")
            rounds = 4 * d + 10 if fast else cap
            configs = [study_config(method, d, k, s, rounds) for k, s in grid]
            taken = rounds_to_target(configs, tol)
            for kappa in kappas:
                mine = np.array([taken[i] for i, (k, _) in enumerate(grid) if k == kappa])
                cond = [conditions[i] for i, (k, _) in enumerate(grid) if k == kappa]
                rows.append(
                    {
                        "method": method,
                        "d": d,
                        "kappa": kappa,
                        "cond_H_A_median": float(np.median(cond)),
                        "rounds": [None if np.isinf(r) else int(r) for r in mine],
                        "rounds_median": float(np.median(mine)),
                        "rounds_max": float(mine.max()),
                    }
                )
            if bar is not None:
                bar.advance(bar.task_ids[0])
    if bar is not None:
        bar.stop()
    return rows


def _conditions(d: int, grid: list[tuple[float, int]]) -> list[float]:
    game = setup([study_config("A alone", d, k, s, 1) for k, s in grid])
    return np.linalg.cond(game.agents["A"].affine().H).tolist()
