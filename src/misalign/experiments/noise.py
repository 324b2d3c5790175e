"""``noise``: sampled agents settle into a stationary spread around the predicted limit, of the
size the Lyapunov equation predicts (docs/theory.md §6).

The two agents of ``examples/two_agents.toml`` (``d = 4``, ``n = 12``) answer with
``N(0, sigma^2 I)`` added to every answer (``sampling_std = sigma``). After the play has
mixed, the final output ``s_T`` of each agent is a draw from the stationary law, mean the
predicted limit ``s*`` and covariance ``Sigma`` solving ``Sigma = R Sigma R^T + Q``. Each
``sigma`` plays its own seeds (its own prompts and noise: one independent measurement per
``sigma``). Over them, the observed RMS distance ``sqrt(mean |s_T - s*|^2)`` is compared with
the predicted ``sqrt(mean tr Sigma)``, within four standard errors of that mean (from the
predicted law); and across sigmas, the log-log slope of the observed spread against ``sigma``
with that of the predicted one (1: the spread scales with ``sigma``), within four standard
errors of the fitted slope.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, worst, write_run
from misalign.runtime.text import plural

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
    """One batch per ``sigma``, each over its own seeds (its own prompts and noise)."""
    cfg = config(quick, seeds)
    rows: list[dict[str, Any]] = []
    points: dict[str, list[tuple[float, float, float, float]]] = {"A": [], "B": []}
    for k, sigma in enumerate(cfg["sigmas"]):
        for name, (observed, predicted, error, plays, rho) in _spread(cfg, k, sigma).items():
            points[name].append((sigma, observed, predicted, error))
            rows.append(
                {
                    "sigma": sigma,
                    "agent": name,
                    "plays": plays,
                    "rho_median": rho,
                    "spread_observed": observed,
                    "spread_predicted": predicted,
                    "standard_error": observed * error,
                    "relative_error": abs(observed / predicted - 1),
                }
            )
    claims = [c for name, values in points.items() for c in _claims(cfg, name, values)]
    figure = _figure(cfg, {n: [(s, o, p, o * e) for s, o, p, e in v] for n, v in points.items()})
    return write_run(out, cfg, rows, claims, figure)


def _spread(cfg: dict[str, Any], k: int, sigma: float) -> dict[str, tuple]:
    """Per agent, at ``sigma`` (the ``k``-th, played on seeds ``k S .. (k + 1) S - 1``): the
    observed and predicted RMS spread, the relative standard error of their ratio, the plays
    kept and the median ``rho``."""
    agents = {n: a | {"sampling_std": sigma} for n, a in cfg["agents"].items()}
    play = parse_config({"seed": 0, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents})
    count = cfg["seeds"]
    game = setup(play, seeds=range(k * count, (k + 1) * count))
    trajectory = simulate(game)
    prediction = predict(game)
    ok = prediction.converges & (trajectory.diverged_at < 0)
    found = {}
    for name in ("A", "B"):
        squared = ((trajectory.outputs(name)[-1] - prediction.fixed_point[name]) ** 2).sum(-1)
        sigma_ = prediction.covariance[name][ok]
        trace = np.trace(sigma_, axis1=-2, axis2=-1)
        # standard error of the ratio observed / predicted, from the predicted law of
        # mean |s_T - s*|^2: for Gaussian x ~ N(0, Sigma), Var |x|^2 = 2 tr(Sigma^2)
        # (defined for any number of seeds, one included)
        spread = np.sqrt(2 * np.einsum("bij,bji->", sigma_, sigma_)) / len(trace)
        found[name] = (
            float(np.sqrt(squared[ok].mean())),
            float(np.sqrt(trace.mean())),
            float(spread / trace.mean() / 2),
            int(ok.sum()),
            float(np.median(prediction.rho)),
        )
    return found


def _claims(cfg: dict[str, Any], name: str, values: list[tuple]) -> list[Claim]:
    """Agent ``name``'s two claims over the independent runs at every sigma: the worst
    observed/predicted spread in standard errors, and the log-log slope of the observed spread
    against sigma against the predicted spread's, within ``standard_errors`` of its own."""
    sigma, observed, predicted, error = (np.array(v) for v in zip(*values, strict=True))
    x = np.log(sigma) - np.log(sigma).mean()
    slope = {
        "observed": x @ np.log(observed) / (x @ x),
        "predicted": x @ np.log(predicted) / (x @ x),
    }
    slope_error = np.sqrt((x**2) @ error**2) / (x @ x)  # error: that of log(observed)
    return [
        Claim(
            f"agent {name}: |observed / predicted spread - 1| in standard errors, max over"
            f" sigma = {cfg['sigmas']} (independent seeds per sigma)",
            worst(np.abs(observed / predicted - 1) / error),
            cfg["standard_errors"],
        ),
        Claim(
            f"agent {name}: |log-log slope of the observed spread against sigma - that of the"
            f" predicted| (tolerance {cfg['standard_errors']:g} standard errors)",
            float(abs(slope["observed"] - slope["predicted"])),
            float(cfg["standard_errors"] * slope_error),
        ),
    ]


def _figure(cfg, points):
    from misalign.outputs.figure import new_figure

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
        title=f"stationary spread vs Lyapunov ({plural(cfg['seeds'], 'seed')})",
    )
    ax.set_xticks(cfg["sigmas"], [f"{s:g}" for s in cfg["sigmas"]])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="sampled agents' stationary spread matches the Lyapunov prediction",
    typical="4.9 s",
    config=config,
    run=run,
    compares=tuple(
        f"agent {n}: {what}"
        for n in ("A", "B")
        for what in (
            "observed RMS |s_T - s*| vs Lyapunov sqrt(mean tr Sigma), per sigma (own seeds)",
            "log-log slope of the observed spread against sigma vs the predicted spread's",
        )
    ),
)
