"""``single-agent``: one agent alone, reading its own output, reaches its least-squares
target at the predicted rate (docs/theory.md §1-2).

Agent ``A`` (``d = 5``, ``n = 50``, covariance eigenvalues 1, 0.9, 0.8, 0.7 and 0.15 (so the slowest
mode stands apart and the asymptotic rate shows within the play), label noise
0.1, ``Gamma = eta I``) plays alone for each ``eta`` of a grid and each seed. Its output
tends to the prompt's least-squares solution ``w_LS = X^+ y`` (not ``w*``: the labels are
noisy), and the error shrinks at the rate ``rho`` of ``I - eta S``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, measured_rate, write_run
from misalign.runtime.text import plural

NAME = "single-agent"


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 5,
        "n": 50,
        "spectrum": [1.0, 0.9, 0.8, 0.7, 0.15],
        "noise": 0.1,
        "preconditioner": "identity",
        "etas": np.linspace(0.3, 1.0, 4 if quick else 8).tolist(),
        "seeds": seeds or (8 if quick else 200),
        "rounds": 1500,
        "floor": 1e-11,
        "window": 20,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """Play every ``(eta, seed)`` in one batch; measure the rate and the final error."""
    cfg = config(quick, seeds)
    grid = [(eta, s) for eta in cfg["etas"] for s in range(cfg["seeds"])]
    agent = {
        "n": cfg["n"],
        "spectrum": cfg["spectrum"],
        "noise": cfg["noise"],
        "preconditioner": cfg["preconditioner"],
    }
    configs = [
        parse_config(
            {
                "seed": s,
                "d": cfg["d"],
                "rounds": cfg["rounds"],
                "schedule": ["A"],
                "agents": {"A": agent | {"eta": eta}},
            }
        )
        for eta, s in grid
    ]
    game = setup(configs)
    trajectory = simulate(game)
    prediction = predict(game)
    least_squares = np.stack([np.linalg.lstsq(p.X, p.y, rcond=None)[0] for p in game.prompts["A"]])
    scale = np.maximum(1.0, np.linalg.norm(least_squares, axis=-1))
    errors = trajectory.distance("A", least_squares) / scale
    rate = measured_rate(errors, cfg["floor"], cfg["window"])
    rho = prediction.rho
    final = errors[-1]
    fixed = np.linalg.norm(prediction.fixed_point["A"] - least_squares, axis=-1) / scale
    rows = [
        {
            "eta": eta,
            "seed": s,
            "rho": rho[i],
            "measured_rate": rate[i],
            "final_error": final[i],
            "fixed_point_error": fixed[i],
        }
        for i, (eta, s) in enumerate(grid)
    ]
    claims = [
        Claim("final |u_T - w_LS| / max(1, |w_LS|), max over plays", float(final.max()), 1e-8),
        Claim("predicted fixed point - w_LS (relative), max over plays", float(fixed.max()), 1e-9),
        Claim("|measured rate - rho|, max over plays", float(np.abs(rate - rho).max()), 1e-3),
    ]
    return write_run(out, cfg, rows, claims, _figure(cfg, grid, rho, rate))


def _figure(cfg, grid, rho, rate):
    from misalign.outputs.figure import new_figure

    fig, ax = new_figure(1, (6, 4.2))
    etas = np.array([eta for eta, _ in grid])
    xs = np.array(cfg["etas"])
    mean = np.array([rho[etas == x].mean() for x in xs])
    std = np.array([rho[etas == x].std() for x in xs])
    ax.plot(xs, mean, "-", color="C0", label="theory: rho of I - eta S (mean over seeds)")
    ax.fill_between(xs, mean - std, mean + std, color="C0", alpha=0.2, label="theory ± std")
    sim = np.array([rate[etas == x].mean() for x in xs])
    sim_std = np.array([rate[etas == x].std() for x in xs])
    ax.errorbar(xs, sim, sim_std, fmt="o", color="C1", capsize=3, label="simulation: rate ± std")
    ax.set(
        xlabel="step size eta",
        ylabel="rate of |u_t - w_LS| per round",
        title=f"one agent alone reaches w_LS at rate rho ({plural(cfg['seeds'], 'seed')})",
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="one agent alone reaches its least-squares target at the predicted rate rho",
    typical="2.2 s",
    config=config,
    run=run,
    compares=(
        "simulated final output vs the prompt's least-squares solution (a direct solve)",
        "the theory's fixed point vs the least-squares solution (a direct solve)",
        "simulated rate of |u_t - w_LS| vs the theory's rho",
    ),
)
