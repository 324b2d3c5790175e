"""``direction``: across directions the prompt geometry decides how much of the objective gap
each agent feels; a larger gap along a direction ``A`` barely sees costs ``B`` less than a
smaller one along a direction ``A`` sees well (docs/theory.md §2, residuals from the gap).

Two noise-free agents alternate (``d = 4``, ``n = 100``, ``Gamma = eta I``). ``A``'s inputs
are anisotropic, ``Lambda_A = diag(4, 1, 0.25, 0.0625)`` with ``eta_A = 0.25``, so
``H_A ~ diag(1, 0.25, 0.0625, 0.0156)``: it sees ``e_1`` fully and ``e_4`` barely. ``B``'s
are isotropic, ``eta_B = 0.5`` (``H_B ~ 0.5 I``). ``A``'s target is ``w_A* = e_1``; ``B``'s is
``w_A* + g u(theta)`` with ``u(theta) = cos(theta) e_1 + sin(theta) e_4`` sweeping from the
well-seen to the barely-seen eigendirection, for gaps ``g`` on a grid. With
``delta = w_A* - w_B* = -g u`` the residuals are ``e_i = K_i delta``,

    K_B = (I - M_B)^{-1} (I - H_B) H_A,    K_A = -(I - M_A)^{-1} (I - H_A) H_B,

so the response per unit gap along ``u`` is ``|e_i| / g = |K_i u| = sqrt(u^T K_i^T K_i u)``,
whatever ``g``. In the scalar picture (population ``H_A = eta_A Lambda_A``, ``H_B = h_B I``)
``K_B`` has ``(1 - h_B) h_A / (h_A + h_B - h_A h_B)`` along each eigendirection: about 0.5
per unit gap along ``e_1`` and 0.015 along ``e_4``; ``-K_A`` has
``(1 - h_A) h_B / (h_A + h_B - h_A h_B)``: about 0 along ``e_1`` and 0.97 along ``e_4``.
Along a direction ``A`` barely sees, ``A`` hardly pulls toward its target: ``B`` ends near its
own and ``A`` absorbs nearly the whole gap; along a direction ``A`` sees fully it is the
other way round. So a gap 8 times larger along ``e_4`` costs ``B`` less than the small one
along ``e_1``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, theory_and_simulation, write_run
from misalign.model.theory import two_agent_residuals
from misalign.runtime.text import plural

NAME = "direction"


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 4,
        "n": 100,
        "preconditioner": "identity",
        "spectrum_A": [4.0, 1.0, 0.25, 0.0625],
        "spectrum_B": [1.0, 1.0, 1.0, 1.0],
        "eta": {"A": 0.25, "B": 0.5},
        "target_A": [1.0, 0.0, 0.0, 0.0],
        "well_seen": 0,
        "barely_seen": 3,
        "angles_deg": np.linspace(0.0, 90.0, 5 if quick else 13).tolist(),
        "gaps": [0.25, 0.5, 1.0, 2.0] if quick else [0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
        "gap_small": 0.25,
        "gap_big": 2.0,
        "seeds": seeds or (6 if quick else 100),
        "rounds": 200,
    }


def directions(cfg: dict[str, Any]) -> np.ndarray:
    """``u(theta) = cos(theta) e_well + sin(theta) e_barely`` per angle, ``(angles, d)``."""
    theta = np.radians(cfg["angles_deg"])
    u = np.zeros((len(theta), cfg["d"]))
    u[:, cfg["well_seen"]] = np.cos(theta)
    u[:, cfg["barely_seen"]] = np.sin(theta)
    return u


def population_response(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per agent, ``|K_i u(theta)|`` per angle with the population step matrices
    ``H_i = eta_i Lambda_i`` (the scalar formula along each eigendirection)."""
    h = {n: cfg["eta"][n] * np.array(cfg[f"spectrum_{n}"]) for n in ("A", "B")}
    common = h["A"] + h["B"] - h["A"] * h["B"]
    k = {"B": (1 - h["B"]) * h["A"] / common, "A": (1 - h["A"]) * h["B"] / common}
    u = directions(cfg)
    return {n: np.linalg.norm(u * k[n], axis=-1) for n in ("A", "B")}


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """Every ``(angle, gap, seed)`` in one batch."""
    cfg = config(quick, seeds)
    u = directions(cfg)
    gaps = np.array(cfg["gaps"])
    seeds_ = cfg["seeds"]
    target_a = np.array(cfg["target_A"])
    grid = [(a, g, s) for a in range(len(u)) for g in gaps for s in range(seeds_)]
    configs = []
    for a, g, s in grid:
        agents = {
            name: {
                "n": cfg["n"],
                "preconditioner": cfg["preconditioner"],
                "spectrum": cfg[f"spectrum_{name}"],
                "eta": cfg["eta"][name],
                "target": (target_a + g * u[a] * (name == "B")).tolist(),
            }
            for name in ("A", "B")
        }
        configs.append(
            parse_config({"seed": s, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents})
        )
    game = setup(configs)
    trajectory = simulate(game)
    prediction = predict(game)
    shape = (len(u), len(gaps), seeds_)
    # the theory's response per unit gap, |K_i u|, from the agents' step matrices
    H = {n: game.agents[n].affine().H for n in ("A", "B")}
    unit = np.repeat(u, len(gaps) * seeds_, axis=0)  # u of every play, (B, d)
    K_A_u, K_B_u = two_agent_residuals(H["A"], H["B"], unit)  # K_i applied to u itself
    response = {
        "A": np.linalg.norm(K_A_u, axis=-1).reshape(shape),
        "B": np.linalg.norm(K_B_u, axis=-1).reshape(shape),
    }
    simulated, predicted = {}, {}
    for name in ("A", "B"):
        final = trajectory.outputs(name)[-1] - game.targets[name]
        simulated[name] = np.linalg.norm(final, axis=-1).reshape(shape)
        predicted[name] = np.linalg.norm(prediction.residual[name], axis=-1).reshape(shape)
    per_gap = {n: simulated[n] / gaps[None, :, None] for n in ("A", "B")}
    well, barely = 0, len(u) - 1  # theta = 0 and theta = 90 degrees
    small = int(np.flatnonzero(gaps == cfg["gap_small"])[0])
    big = int(np.flatnonzero(gaps == cfg["gap_big"])[0])
    crossing = simulated["B"][barely, big] / simulated["B"][well, small]  # per seed
    flips = int(
        (
            (per_gap["B"][well, small] <= per_gap["A"][well, small])
            | (per_gap["A"][barely, small] <= per_gap["B"][barely, small])
        ).sum()
    )
    claims = [
        Claim(
            "max ||e_i| simulated - |e_i| predicted| over agents, angles, gaps, seeds",
            max(float(np.abs(simulated[n] - predicted[n]).max()) for n in ("A", "B")),
            1e-8,
        ),
        Claim(
            "max ||e_i| / g - |K_i u(theta)|| (the response per unit gap is the theory's"
            " quadratic form sqrt(u^T K_i^T K_i u), whatever g)",
            max(float(np.abs(per_gap[n] - response[n]).max()) for n in ("A", "B")),
            1e-8,
        ),
        Claim(
            f"max over seeds of |e_B| for g = {cfg['gap_big']:g} along the barely-seen direction"
            f" / |e_B| for g = {cfg['gap_small']:g} along the well-seen one (< 1: the larger gap"
            " costs B less)",
            float(crossing.max()),
            0.999,
        ),
        Claim(
            "seeds where B does not feel more of the gap than A along the well-seen direction,"
            " or A not more than B along the barely-seen one",
            flips,
            0,
        ),
    ]
    rows = []
    for i, (a, g, s) in enumerate(grid):
        k, j = i // (len(gaps) * seeds_), (i // seeds_) % len(gaps)
        for name in ("A", "B"):
            rows.append(
                {
                    "angle_deg": cfg["angles_deg"][a],
                    "gap": g,
                    "seed": s,
                    "agent": name,
                    "rho": prediction.rho[i],
                    "residual_simulated": simulated[name][k, j, s],
                    "residual_predicted": predicted[name][k, j, s],
                    "response_per_gap_theory": response[name][k, j, s],
                }
            )
    return write_run(
        out, cfg, rows, claims, _figure(cfg, gaps, per_gap, response, simulated, small)
    )


def _figure(cfg, gaps, per_gap, response, simulated, small):
    from misalign.outputs.figure import new_figure

    fig, axes = new_figure(3, (15, 4.4))
    angles = np.array(cfg["angles_deg"])
    population = population_response(cfg)
    ax = axes[0]
    for k, name in enumerate(("A", "B")):
        theory_and_simulation(
            ax,
            angles,
            response[name][:, 0],  # (angles, seeds); the same for every gap
            per_gap[name].reshape(len(angles), -1),  # every gap and seed
            f"C{k}",
            (f"theory |K_{name} u| (mean ± std)", f"simulation |e_{name}| / g ± std"),
        )
        ax.plot(angles, population[name], ":", color=f"C{k}", label="population H = eta Lambda")
    ax.set(
        xlabel="angle theta of u from the well-seen e_1 to the barely-seen e_4 (degrees)",
        ylabel="residual per unit gap |e_i| / g",
        title=f"response per unit gap against direction ({plural(cfg['seeds'], 'seed')})",
    )
    for ax, name in zip(axes[1:], ("B", "A"), strict=True):
        for k, (index, what) in enumerate(((0, "well-seen e_1"), (-1, "barely-seen e_4"))):
            theory_and_simulation(
                ax,
                gaps,
                response[name][index] * gaps[:, None],
                simulated[name][index],
                f"C{k + 2}",
                (f"theory, gap along {what}", f"simulation ± std, along {what}"),
            )
        # the small gap along the direction where this agent feels the most of it
        index, what = (0, "e_1") if name == "B" else (-1, "e_4")
        level = simulated[name][index, small].mean()
        ax.axhline(level, color="k", lw=0.8, ls=":", label=f"g = {cfg['gap_small']:g} along {what}")
        ax.set(
            xlabel="objective gap g",
            ylabel=f"final residual |e_{name}|",
            title=f"agent {name}: residual against the gap, two directions",
        )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="the prompt geometry decides how much of the gap each agent feels, per direction",
    typical="2.5 s",
    config=config,
    run=run,
    compares=(
        "simulated final residuals |e_i| vs the predicted ones",
        "simulated residual per unit gap |e_i| / g vs the theory's |K_i u(theta)|",
        "simulated |e_B|, big gap along the barely-seen direction vs small gap along the"
        " well-seen one (theory: smaller)",
        "simulated share of the gap felt by A and B per direction vs the theory's order",
    ),
)
