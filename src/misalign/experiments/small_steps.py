"""``small-steps``: as ``eta -> 0`` the fixed point tends to the ``H``-weighted mean of the
targets, error proportional to ``eta``; with the same ``G`` for both agents that mean is the
pooled least-squares solution, with different ``G_i`` it is not (docs/theory.md §2, small
steps).

Two agents with noisy labels (``d = 4``, ``n = 16``, noise 0.1) alternate with
``Gamma_i = eta G_i`` for ``eta`` on a log grid. ``same G``: both ``G = I``. ``different G``:
``A`` keeps ``G = I``, ``B`` takes its ``lsa-optimal`` preconditioner on an anisotropic
covariance. The limit is the theory's fixed point of ``B``'s output; the simulation is played
beside it and compared where it has converged within the rounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.config import parse_config
from misalign.experiment import predict, setup, simulate
from misalign.experiments import Claim, Experiment, Result, write_run

NAME = "small-steps"
VARIANTS = {
    "same G": {"B": {"preconditioner": "identity"}},
    "different G": {"B": {"preconditioner": "lsa-optimal", "spectrum": [4.0, 1.0, 0.5, 0.25]}},
}


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 4,
        "n": 16,
        "noise": 0.1,
        "variants": VARIANTS,
        "etas": np.geomspace(1e-4, 0.1, 4 if quick else 13).tolist(),
        "seeds": seeds or (4 if quick else 100),
        "rounds": 3000,
        "compare_below": 1e-9,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """One batch per variant over every ``(eta, seed)``."""
    cfg = config(quick, seeds)
    etas = np.array(cfg["etas"])
    grid = [(eta, s) for eta in cfg["etas"] for s in range(cfg["seeds"])]
    shape = (len(etas), cfg["seeds"])
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    curves = {}
    for variant, extra in cfg["variants"].items():
        configs = []
        for eta, s in grid:
            base = {"n": cfg["n"], "noise": cfg["noise"], "preconditioner": "identity", "eta": eta}
            agents = {"A": base, "B": base | extra["B"]}
            configs.append(
                parse_config({"seed": s, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents})
            )
        game = setup(configs)
        trajectory = simulate(game)
        prediction = predict(game)
        ls = {n: np.stack([p.least_squares() for p in game.prompts[n]]) for n in ("A", "B")}
        H = {n: game.agents[n].affine().H for n in ("A", "B")}
        weighted = np.linalg.solve(
            H["A"] + H["B"],
            (np.einsum("bij,bj->bi", H["A"], ls["A"]) + np.einsum("bij,bj->bi", H["B"], ls["B"]))[
                ..., None
            ],
        )[..., 0]
        X = {n: np.stack([p.X for p in game.prompts[n]]) for n in ("A", "B")}
        y = {n: np.stack([p.y for p in game.prompts[n]]) for n in ("A", "B")}
        gram = sum(np.einsum("bki,bkj->bij", X[n], X[n]) / cfg["n"] for n in X)
        moment = sum(np.einsum("bki,bk->bi", X[n], y[n]) / cfg["n"] for n in X)
        pooled = np.linalg.solve(gram, moment[..., None])[..., 0]
        limit = prediction.fixed_point["B"]
        scale = np.maximum(1.0, np.linalg.norm(pooled, axis=-1))
        to_weighted = (np.linalg.norm(limit - weighted, axis=-1) / scale).reshape(shape)
        to_pooled = (np.linalg.norm(limit - pooled, axis=-1) / scale).reshape(shape)
        final = trajectory.outputs("B")[-1]
        gap = np.linalg.norm(final - limit, axis=-1) / scale
        settled = prediction.rounds_to(cfg["compare_below"]) <= cfg["rounds"]
        simulated = np.linalg.norm(final - weighted, axis=-1) / scale
        curves[variant] = (
            to_weighted,
            to_pooled,
            np.where(settled, simulated, np.nan).reshape(shape),
        )
        slope = np.polyfit(np.log(etas), np.log(to_weighted), 1)[0]  # one slope per seed
        claims.append(
            Claim(
                f"{variant}: |log-log slope of |v* - weighted mean| against eta - 1|, max",
                float(np.abs(slope - 1).max()),
                0.05,
            )
        )
        claims.append(
            Claim(
                f"{variant}: simulation - theory where settled (relative), max",
                float(gap[settled].max()) if settled.any() else np.inf,
                1e-7,
            )
        )
        if variant == "same G":
            claims.append(
                Claim(
                    "same G: |v* - pooled LS| / eta at the smallest eta over that at the largest,"
                    " |ratio - 1|, max",
                    float(np.abs((to_pooled[0] / etas[0]) / (to_pooled[-1] / etas[-1]) - 1).max()),
                    0.25,
                )
            )
        else:
            claims.append(
                Claim(
                    "different G: |v* - weighted| / |v* - pooled LS| at the smallest eta, max"
                    " (the pooled solution is not the limit)",
                    float((to_weighted[0] / to_pooled[0]).max()),
                    1e-2,
                )
            )
        for i, (eta, s) in enumerate(grid):
            k = i // cfg["seeds"]
            rows.append(
                {
                    "variant": variant,
                    "eta": eta,
                    "seed": s,
                    "rho": prediction.rho[i],
                    "to_weighted_mean": to_weighted[k, s],
                    "to_pooled_ls": to_pooled[k, s],
                    "simulation_minus_theory": gap[i] if settled[i] else None,
                }
            )
    return write_run(out, cfg, rows, claims, _figure(cfg, etas, curves))


def _figure(cfg, etas, curves):
    from misalign.plot import new_figure

    fig, ax = new_figure(1, (6.5, 4.5))
    for k, (variant, (to_weighted, to_pooled, simulated)) in enumerate(curves.items()):
        for values, style, what in (
            (to_weighted, "-", "weighted mean"),
            (to_pooled, "--", "pooled LS"),
        ):
            log = np.log10(values)
            mean, std = log.mean(axis=1), log.std(axis=1)
            ax.plot(etas, 10**mean, style, color=f"C{k}", label=f"theory {variant}: |v* - {what}|")
            ax.fill_between(etas, 10 ** (mean - std), 10 ** (mean + std), color=f"C{k}", alpha=0.15)
        settled = np.isfinite(simulated).all(axis=1)  # etas whose plays all settled
        if settled.any():
            log = np.log10(simulated[settled])
            ax.errorbar(
                etas[settled],
                10 ** log.mean(axis=1),
                yerr=[
                    10 ** log.mean(axis=1) - 10 ** (log.mean(axis=1) - log.std(axis=1)),
                    10 ** (log.mean(axis=1) + log.std(axis=1)) - 10 ** log.mean(axis=1),
                ],
                fmt="o",
                mfc="none",
                color=f"C{k}",
                capsize=3,
                label=f"simulation {variant}: |s_T - weighted mean|",
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="step scale eta (Gamma_i = eta G_i)",
        ylabel="distance of the limit (relative, geometric mean ± std)",
        title=f"small steps: limit against eta ({cfg['seeds']} seeds)",
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="as eta -> 0 the limit tends to pooled least squares (same G only), error ~ eta",
    typical="4.1 s",
    config=config,
    run=run,
)
