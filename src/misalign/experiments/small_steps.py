"""``small-steps``: as ``eta -> 0`` the fixed point tends to the ``H``-weighted mean of the
targets, error proportional to ``eta``; with the same ``G`` for both agents that mean is the
pooled least-squares solution, with different ``G_i`` it is not (docs/theory.md §2, small
steps).

Two agents with noisy labels (``d = 4``, ``n = 16``, noise 0.1) alternate with
``Gamma_i = eta G_i`` for ``eta`` on a log grid. ``same G``: both ``G = I``. ``different G``:
``A`` keeps ``G = I``, ``B`` takes its ``lsa-optimal`` preconditioner on an anisotropic
covariance. The step scales run from 0.01 to 0.1, where every play settles within the rounds
(``rounds_to(1e-9)``; a claim over a play that has not settled fails). Every claim is on the
simulated final output ``s_T`` of ``B``: its distance to the ``H``-weighted mean (the closed
form) falls like ``eta`` (log-log slope 1); it equals the theory's fixed point ``v*``; with
the same ``G`` its distance to the pooled least-squares solution (a direct solve of both
prompts) falls like ``eta`` too, with different ``G`` it stays far from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, worst, write_run
from misalign.runtime.text import plural

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
        "etas": np.geomspace(0.01, 0.1, 4 if quick else 7).tolist(),
        "seeds": seeds or (4 if quick else 100),
        "rounds": 10000,
        "compare_below": 1e-9,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """One batch per variant over every ``(eta, seed)``."""
    cfg = config(quick, seeds)
    etas = np.array(cfg["etas"])
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    curves = {}
    for variant, extra in cfg["variants"].items():
        found = _variant(cfg, extra)
        curves[variant] = tuple(
            np.where(found["settled"], found[k], np.nan) if k.startswith("simulated") else found[k]
            for k in ("to_weighted", "to_pooled", "simulated_weighted")
        )
        claims += _claims(cfg, variant, etas, found)
        for k, eta in enumerate(cfg["etas"]):
            for s in range(cfg["seeds"]):
                rows.append(
                    {
                        "variant": variant,
                        "eta": eta,
                        "seed": s,
                        "rho": found["rho"][k, s],
                        "to_weighted_mean": found["to_weighted"][k, s],
                        "to_pooled_ls": found["to_pooled"][k, s],
                        "simulated_to_weighted_mean": found["simulated_weighted"][k, s],
                        "simulated_to_pooled_ls": found["simulated_pooled"][k, s],
                        "simulation_minus_theory": found["gap"][k, s],
                        "settled": bool(found["settled"][k, s]),
                    }
                )
    return write_run(out, cfg, rows, claims, _figure(cfg, etas, curves))


def _variant(cfg: dict[str, Any], extra: dict[str, Any]) -> dict[str, np.ndarray]:
    """Play one variant over every ``(eta, seed)``; every value ``(etas, seeds)``, relative to
    ``max(1, |pooled LS|)``: the theory's limit ``v*`` and the simulated final output ``s_T``
    of ``B`` against the ``H``-weighted mean of the least-squares targets (the closed form)
    and the pooled least-squares solution (a direct solve of both prompts), ``|s_T - v*|``,
    whether the play settled (``rounds_to(compare_below) <= rounds``) and ``rho``."""
    configs = []
    for eta in cfg["etas"]:
        for s in range(cfg["seeds"]):
            base = {"n": cfg["n"], "noise": cfg["noise"], "preconditioner": "identity", "eta": eta}
            agents = {"A": base, "B": base | extra["B"]}
            configs.append(
                parse_config({"seed": s, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents})
            )
    game = setup(configs)
    trajectory = simulate(game)
    prediction = predict(game)
    names = ("A", "B")
    ls = {n: np.stack([p.least_squares() for p in game.prompts[n]]) for n in names}
    H = {n: game.agents[n].affine().H for n in names}
    pulled = sum(np.einsum("bij,bj->bi", H[n], ls[n]) for n in names)
    weighted = np.linalg.solve(H["A"] + H["B"], pulled[..., None])[..., 0]
    X = {n: np.stack([p.X for p in game.prompts[n]]) for n in names}
    y = {n: np.stack([p.y for p in game.prompts[n]]) for n in names}
    gram = sum(np.einsum("bki,bkj->bij", X[n], X[n]) for n in names)
    moment = sum(np.einsum("bki,bk->bi", X[n], y[n]) for n in names)
    pooled = np.linalg.solve(gram, moment[..., None])[..., 0]
    scale = np.maximum(1.0, np.linalg.norm(pooled, axis=-1))
    limit, final = prediction.fixed_point["B"], trajectory.outputs("B")[-1]
    values = {
        "to_weighted": limit - weighted,
        "to_pooled": limit - pooled,
        "simulated_weighted": final - weighted,
        "simulated_pooled": final - pooled,
        "gap": final - limit,
    }
    shape = (len(cfg["etas"]), cfg["seeds"])
    found = {k: (np.linalg.norm(v, axis=-1) / scale).reshape(shape) for k, v in values.items()}
    found["settled"] = (prediction.rounds_to(cfg["compare_below"]) <= cfg["rounds"]).reshape(shape)
    found["rho"] = prediction.rho.reshape(shape)
    return found


def _slope(etas: np.ndarray, distance: np.ndarray, settled: np.ndarray) -> np.ndarray:
    """Per seed, the log-log slope of the simulated ``distance`` (``(etas, seeds)``) against
    ``eta``; ``nan`` for a seed with a play that has not settled."""
    slope = np.polyfit(np.log(etas), np.log(distance), 1)[0]
    return np.where(settled.all(axis=0), slope, np.nan)


def _claims(cfg, variant, etas, found) -> list[Claim]:
    """A variant's claims, all on the simulated final outputs (``nan`` where a play has not
    settled, so that the claim fails)."""
    settled = found["settled"]
    slope = _slope(etas, found["simulated_weighted"], settled)
    claims = [
        Claim(
            f"{variant}: |log-log slope of simulated |s_T - H-weighted mean| against eta - 1|"
            " (closed form: error ~ eta), max over seeds",
            worst(np.abs(slope - 1)),
            0.05,
        ),
        Claim(
            f"{variant}: |s_T - v*| / max(1, |pooled LS|), max over plays (nan: one unsettled)",
            worst(np.where(settled, found["gap"], np.nan)),
            1e-7,
        ),
    ]
    if variant == "same G":
        pooled = _slope(etas, found["simulated_pooled"], settled)
        claims.append(
            Claim(
                "same G: |log-log slope of simulated |s_T - pooled LS| against eta - 1| (the"
                " limit tends to pooled least squares, a direct solve), max over seeds",
                worst(np.abs(pooled - 1)),
                0.05,
            )
        )
    else:
        ratio = found["simulated_weighted"][0] / found["simulated_pooled"][0]
        claims.append(
            Claim(
                "different G: simulated |s_T - weighted mean| / |s_T - pooled LS| at the"
                " smallest eta, max over seeds (the pooled solution is not the limit)",
                worst(np.where(settled[0], ratio, np.nan)),
                0.1,
            )
        )
    return claims


def _figure(cfg, etas, curves):
    from misalign.outputs.figure import new_figure

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
        title=f"small steps: limit against eta ({plural(cfg['seeds'], 'seed')})",
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="as eta -> 0 the limit tends to pooled least squares (same G only), error ~ eta",
    typical="2.3 s",
    config=config,
    run=run,
    compares=(
        "same G: log-log slope of simulated |s_T - H-weighted mean| vs eta against 1",
        "same G: simulated s_T vs the theory's fixed point v*",
        "same G: log-log slope of simulated |s_T - pooled LS (direct solve)| vs eta against 1",
        "different G: log-log slope of simulated |s_T - H-weighted mean| vs eta against 1",
        "different G: simulated s_T vs the theory's fixed point v*",
        "different G: simulated |s_T - weighted mean| vs |s_T - pooled LS| at the smallest eta",
    ),
)
