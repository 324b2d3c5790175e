"""``stability``: the play converges exactly when ``rho < 1``; ``rho`` against the step size
``eta`` and the boundary ``eta`` where it crosses 1 (docs/theory.md §2).

Two noise-free gradient agents (``d = 3``, ``n = 30``, isotropic, ``Gamma = eta I`` for
both) alternate for each ``eta`` of a grid and each seed. The rate at which the play moves,
measured from the successive round-to-round changes of the stacked outputs
``|s_t - s_{t-1}|`` (defined whether the play converges or not), is compared with the
theory's ``rho``; per seed, the ``eta`` where the measured rate crosses 1 is compared with
the one where ``rho`` does (both interpolated linearly on the grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.config import parse_config
from misalign.experiment import predict, setup, simulate
from misalign.experiments import Claim, Experiment, Result, measured_rate, write_run

NAME = "stability"


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 3,
        "n": 30,
        "preconditioner": "identity",
        "etas": np.linspace(0.2, 3.0, 15 if quick else 71).tolist(),
        "seeds": seeds or (4 if quick else 100),
        "rounds": 60,
        "rate_from": 0.8,
        "window": 30,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """Every ``(eta, seed)`` in one batch."""
    cfg = config(quick, seeds)
    grid = [(eta, s) for eta in cfg["etas"] for s in range(cfg["seeds"])]
    configs = []
    for eta, s in grid:
        agent = {"n": cfg["n"], "preconditioner": cfg["preconditioner"], "eta": eta}
        agents = {"A": agent, "B": agent}
        configs.append(
            parse_config({"seed": s, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents})
        )
    game = setup(configs)
    trajectory = simulate(game)
    prediction = predict(game)
    stacked = np.concatenate([trajectory.outputs(n) for n in ("A", "B")], axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        moves = np.linalg.norm(np.diff(stacked, axis=0), axis=-1)
    rate = measured_rate(moves, floor=1e-12, window=cfg["window"])
    rho = prediction.rho
    shape = (len(cfg["etas"]), cfg["seeds"])
    etas = np.array(cfg["etas"])
    boundary_theory = _crossing(etas, rho.reshape(shape))
    boundary_simulated = _crossing(etas, rate.reshape(shape))
    wrong_side = int(((rate >= 1) != (rho >= 1)).sum())
    rows = [
        {
            "eta": eta,
            "seed": s,
            "rho": rho[i],
            "measured_rate": rate[i],
            "diverged_at": int(trajectory.diverged_at[i]),
        }
        for i, (eta, s) in enumerate(grid)
    ]
    both = np.isfinite(boundary_theory) & np.isfinite(boundary_simulated)
    claims = [
        Claim(
            f"|measured rate - rho| / rho, max over plays with rho >= {cfg['rate_from']}",
            float(np.abs(rate / rho - 1)[rho >= cfg["rate_from"]].max()),
            1e-3,
        ),
        Claim("plays where the simulation and rho < 1 disagree on convergence", wrong_side, 0),
        Claim(
            "boundary eta: |simulated - theory| / theory, max over seeds",
            float(np.abs(boundary_simulated / boundary_theory - 1)[both].max())
            if both.any()
            else np.inf,
            1e-4,
        ),
        Claim("seeds whose boundary lies outside the grid", int((~both).sum()), 0),
    ]
    return write_run(out, cfg, rows, claims, _figure(cfg, etas, rho, rate, shape, boundary_theory))


def _crossing(etas: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per column, the first ``eta`` where ``values`` (``(etas, seeds)``) crosses 1 upwards,
    interpolated linearly; ``nan`` where it does not cross on the grid."""
    out = np.full(values.shape[1], np.nan)
    for s in range(values.shape[1]):
        above = np.flatnonzero(values[:, s] >= 1)
        if len(above) and above[0] > 0:
            k = above[0]
            v0, v1 = values[k - 1, s], values[k, s]
            out[s] = etas[k - 1] + (1 - v0) / (v1 - v0) * (etas[k] - etas[k - 1])
    return out


def _figure(cfg, etas, rho, rate, shape, boundary):
    from misalign.plot import new_figure

    fig, ax = new_figure(1, (6.5, 4.2))
    rho, rate = rho.reshape(shape), rate.reshape(shape)
    mean, std = rho.mean(axis=1), rho.std(axis=1)
    ax.plot(etas, mean, "-", color="C0", label="theory rho (mean over seeds)")
    ax.fill_between(etas, mean - std, mean + std, color="C0", alpha=0.2, label="theory ± std")
    ax.errorbar(
        etas,
        rate.mean(axis=1),
        rate.std(axis=1),
        fmt="o",
        ms=3,
        color="C1",
        capsize=2,
        label="simulation: rate of |s_t - s_(t-1)| ± std",
    )
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.axvline(np.nanmean(boundary), color="C3", ls="--", label="theory boundary eta (mean)")
    ax.set(
        xlabel="step size eta (both agents)",
        yscale="log",
        ylabel="rate per round",
        title=f"stability: rho against eta ({cfg['seeds']} seeds)",
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="the play converges exactly when rho < 1; the boundary eta where rho crosses 1",
    typical="2.5 s",
    config=config,
    run=run,
)
