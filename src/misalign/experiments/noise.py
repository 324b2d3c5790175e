"""``noise``: sampled agents settle into a stationary spread around the predicted limit, of the
size the Lyapunov equation predicts (docs/theory.md §6).

The two agents of ``examples/two_agents.toml`` (``d = 4``, ``n = 12``) answer with
``N(0, sigma^2 I)`` added to every answer (``sampling_std = sigma``). After the play has
mixed, the final output ``s_T`` of each agent is a draw from the stationary law, mean the
predicted limit ``s*`` and covariance ``Sigma`` solving ``Sigma = R Sigma R^T + Q``. Over
seeds (each its own prompts), the observed RMS distance ``sqrt(mean |s_T - s*|^2)`` is
compared with the predicted ``sqrt(mean tr Sigma)``; the tolerance is four standard errors
of that mean, measured from the seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.config import parse_config
from misalign.experiment import predict, setup, simulate
from misalign.experiments import Claim, Experiment, Result, write_run

NAME = "noise"


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    base = {"n": 12, "preconditioner": "lsa-optimal"}
    return {
        "experiment": NAME,
        "d": 4,
        "agents": {
            "A": base | {"spectrum": [1.0, 0.5, 2.0, 1.0], "target": [1.0, 0.0, 0.0, 0.0]},
            "B": base | {"rotate": True, "eta": 0.5, "target": [0.0, 1.0, 0.0, 0.0]},
        },
        "sigmas": [0.05, 0.2] if quick else [0.025, 0.05, 0.1, 0.2, 0.4],
        "seeds": seeds or (400 if quick else 4000),
        "rounds": 200,
        "standard_errors": 4.0,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """One batch per ``sigma`` over the seeds."""
    cfg = config(quick, seeds)
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    points: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
    for sigma in cfg["sigmas"]:
        agents = {n: a | {"sampling_std": sigma} for n, a in cfg["agents"].items()}
        config_ = parse_config(
            {"seed": 0, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents}
        )
        game = setup(config_, seeds=range(cfg["seeds"]))
        trajectory = simulate(game)
        prediction = predict(game)
        ok = prediction.converges & (trajectory.diverged_at < 0)
        for name in ("A", "B"):
            squared = ((trajectory.outputs(name)[-1] - prediction.fixed_point[name]) ** 2).sum(-1)
            squared = squared[ok]
            sigma_ = prediction.covariance[name][ok]
            trace = np.trace(sigma_, axis1=-2, axis2=-1)
            observed, predicted = np.sqrt(squared.mean()), np.sqrt(trace.mean())
            # standard error of the ratio observed / predicted, from the predicted law of
            # mean |s_T - s*|^2: for Gaussian x ~ N(0, Sigma), Var |x|^2 = 2 tr(Sigma^2)
            # (defined for any number of seeds, one included)
            spread = np.sqrt(2 * np.einsum("bij,bji->", sigma_, sigma_)) / len(trace)
            error = spread / trace.mean() / 2
            relative = abs(observed / predicted - 1)
            claims.append(
                Claim(
                    f"sigma = {sigma}, agent {name}: |observed / predicted spread - 1|",
                    float(relative),
                    float(cfg["standard_errors"] * error),
                )
            )
            points[name].append((sigma, observed, predicted, observed * error))
            rows.append(
                {
                    "sigma": sigma,
                    "agent": name,
                    "plays": int(ok.sum()),
                    "rho_median": float(np.median(prediction.rho)),
                    "spread_observed": observed,
                    "spread_predicted": predicted,
                    "standard_error": observed * error,
                    "relative_error": relative,
                }
            )
    return write_run(out, cfg, rows, claims, _figure(cfg, points))


def _figure(cfg, points):
    from misalign.plot import new_figure

    fig, ax = new_figure(1, (6, 4.2))
    for k, (name, values) in enumerate(points.items()):
        sigma, observed, predicted, error = (np.array(v) for v in zip(*values, strict=True))
        ax.plot(sigma, predicted, "-", color=f"C{k}", label=f"theory sqrt(mean tr Sigma_{name})")
        ax.errorbar(
            sigma,
            observed,
            4 * error,
            fmt="os"[k],
            mfc="none",
            color=f"C{k}",
            capsize=3,
            label=f"simulation RMS |s_T - s*| ({name}) ± 4 s.e.",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sampling standard deviation sigma",
        ylabel="stationary spread around the predicted limit",
        title=f"stationary spread vs Lyapunov ({cfg['seeds']} seeds)",
    )
    ax.set_xticks(cfg["sigmas"], [f"{s:g}" for s in cfg["sigmas"]])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="sampled agents' stationary spread matches the Lyapunov prediction",
    typical="8.5 s",
    config=config,
    run=run,
)
