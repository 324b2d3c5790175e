"""``schedules``: with three agents, in any turn order and whoever reads whom, the play ends
on the theory's fixed point at the rate ``rho`` of the round map (docs/theory.md §2).

Three noise-free agents (``d = 6``; the agents of ``examples/three_agents.toml`` with smaller
steps, so that some plays are slow) play each of a few schedules: the orders ``A, B, C``,
``A, C, B`` and ``A, B, A, C`` (each agent reading the previous turn) and ``A, B, A, C`` with
``C`` reading ``B``. Per play, the final outputs are compared with the predicted fixed
points, and the rate at which the round-to-round moves ``|s_t - s_(t-1)|`` shrink
(``two_mode_rate``, as in ``stability``) with ``rho``, over the plays with ``rho >= 0.8`` and
the slowest play (the largest ``rho``: the claim is never over no play). Plays whose two
leading eigenvalues are nearly equal reach that rate late: ``A, B, C`` with ``C`` reading
``A`` (``rho`` up to 0.98) has 3 plays in 100 that miss the 1e-3 tolerance (up to 5e-3), so
it is not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, two_mode_rate, worst, write_run
from misalign.runtime.text import plural

NAME = "schedules"
AGENTS = {
    "A": {
        "n": 20,
        "spectrum": [4.0, 2.0, 1.0, 1.0, 0.5, 0.25],
        "rotate": True,
        "preconditioner": "identity",
        "eta": 0.05,
    },
    "B": {"n": 30, "preconditioner": "lsa-optimal", "eta": 0.4},
    "C": {"n": 8, "preconditioner": "lsa-optimal", "eta": 0.2},
}
SCHEDULES = {
    "A,B,C": (["A", "B", "C"], {}),
    "A,C,B": (["A", "C", "B"], {}),
    "A,B,A,C": (["A", "B", "A", "C"], {}),
    "A,B,A,C; C reads B": (["A", "B", "A", "C"], {"C": "B"}),
}


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 6,
        "agents": AGENTS,
        "schedules": {k: {"order": o, "reads": r} for k, (o, r) in SCHEDULES.items()},
        "seeds": seeds or (6 if quick else 100),
        "rounds": 2000,
        "rate_from": 0.8,
        "floor": 1e-12,
        "window": 30,
        "plotted_rounds": 150,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """One batch per schedule over the seeds."""
    cfg = config(quick, seeds)
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    curves = {}
    for label, spec in cfg["schedules"].items():
        agents = {
            name: {**agent, **({"reads": spec["reads"][name]} if name in spec["reads"] else {})}
            for name, agent in cfg["agents"].items()
        }
        play = parse_config(
            {
                "seed": 0,
                "d": cfg["d"],
                "rounds": cfg["rounds"],
                "schedule": spec["order"],
                "agents": agents,
            }
        )
        game = setup(play, seeds=range(cfg["seeds"]))
        trajectory = simulate(game)
        prediction = predict(game)
        rho = prediction.rho
        names = sorted(cfg["agents"])
        outputs = np.concatenate([trajectory.outputs(n) for n in names], axis=-1)
        fixed = np.concatenate([prediction.fixed_point[n] for n in names], axis=-1)
        converging = rho < 1
        with np.errstate(invalid="ignore"):
            relative = np.linalg.norm(outputs[-1] - fixed, axis=-1) / np.linalg.norm(fixed, axis=-1)
        distance = np.linalg.norm(outputs - fixed, axis=-1)  # (rounds, seeds)
        scaled = distance / distance[0]
        rate = two_mode_rate(np.diff(outputs, axis=0), floor=cfg["floor"], window=cfg["window"])
        slow = converging & ((rho >= cfg["rate_from"]) | (rho == rho.max()))
        claims += [
            Claim(
                f"{label}: max |s_T - s*| / |s*| over plays (nan: one with rho >= 1)",
                worst(np.where(converging, relative, np.nan)),
                1e-8,
            ),
            Claim(
                f"{label}: |measured rate - rho| / rho, max over plays with rho >="
                f" {cfg['rate_from']} and the slowest",
                worst(np.abs(rate / rho - 1)[slow]),
                1e-3,
            ),
        ]
        curves[label] = (scaled[: cfg["plotted_rounds"]], rho)
        for s in range(cfg["seeds"]):
            rows.append(
                {
                    "schedule": label,
                    "seed": s,
                    "rho": rho[s],
                    "measured_rate": rate[s],
                    "final_relative_error": relative[s],
                }
            )
    return write_run(out, cfg, rows, claims, _figure(cfg, curves))


def _figure(cfg, curves):
    from misalign.outputs.figure import new_figure

    fig, axes = new_figure(len(curves), (4.0 * len(curves), 4.2))
    for ax, (label, (scaled, rho)) in zip(axes, curves.items(), strict=True):
        t = np.arange(scaled.shape[0])
        with np.errstate(divide="ignore"):
            theory = np.log10(rho[None, :] ** t[:, None])
            simulated = np.log10(scaled)
        mean, std = theory.mean(axis=1), theory.std(axis=1)
        ax.plot(t, 10**mean, "-", color="C0", label="theory rho^t (geometric mean)")
        ax.fill_between(t, 10 ** (mean - std), 10 ** (mean + std), color="C0", alpha=0.2)
        every = max(1, len(t) // 25)
        m, sd = simulated.mean(axis=1), simulated.std(axis=1)
        lower, upper = 10**m - 10 ** (m - sd), 10 ** (m + sd) - 10**m
        ax.errorbar(
            t[::every],
            10 ** m[::every],
            [lower[::every], upper[::every]],
            fmt="o",
            ms=3,
            color="C1",
            capsize=2,
            label="simulation |s_t - s*| / |s_0 - s*| ± std",
        )
        ax.set(
            xlabel="round t",
            yscale="log",
            ylabel="distance to the predicted equilibrium",
            title=f"{label} ({plural(cfg['seeds'], 'seed')})",
        )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="three agents in any turn order and reads end on the predicted fixed point at rate rho",
    typical="2.5 s",
    config=config,
    run=run,
    compares=tuple(
        f"{label}: {what}"
        for label in SCHEDULES
        for what in (
            "simulated final outputs vs the predicted fixed points",
            "simulated rate of |s_t - s_(t-1)| vs the round map's rho (rho >= 0.8 and the slowest)",
        )
    ),
)
