"""``gap``: the residuals are linear in the objective gap and grow monotonically along a
fixed direction, for isotropic, anisotropic and rotated geometries (docs/theory.md §2).

Two noise-free agents alternate (``d = 4``, ``n = 20``, ``lsa-optimal`` preconditioners,
``eta_A = 1``, ``eta_B = 0.5``). ``A``'s target is ``w_A* = e_1`` and ``B``'s is
``w_A* + g u`` for a fixed unit direction ``u`` and gaps ``g`` on a grid; the prompts of a
seed do not change with ``g`` (explicit targets leave the inputs unchanged). The theory says
each agent's residual is ``e_i = M_i (w_B* - w_A*)`` for a matrix ``M_i`` of the prompts, so
``e_i(g) = g e_i(1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, theory_and_simulation, write_run
from misalign.runtime.text import plural

NAME = "gap"
GEOMETRIES = {
    "isotropic": ([1.0, 1.0, 1.0, 1.0], False),
    "anisotropic": ([4.0, 1.0, 0.5, 0.25], False),
    "rotated": ([4.0, 1.0, 0.5, 0.25], True),
}


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 4,
        "n": 20,
        "geometries": {k: {"spectrum": s, "rotate": r} for k, (s, r) in GEOMETRIES.items()},
        "eta": {"A": 1.0, "B": 0.5},
        "target_A": [1.0, 0.0, 0.0, 0.0],
        "direction": (np.array([1.0, 1.0, 1.0, 1.0]) / 2).tolist(),
        "gaps": np.linspace(0.0, 2.0, 5 if quick else 11).tolist(),
        "seeds": seeds or (6 if quick else 100),
        "rounds": 400,
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """One batch per geometry over every ``(gap, seed)``."""
    cfg = config(quick, seeds)
    gaps = np.array(cfg["gaps"])
    grid = [(g, s) for g in cfg["gaps"] for s in range(cfg["seeds"])]
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    curves = {}
    for geometry, spec in cfg["geometries"].items():
        target_a = np.array(cfg["target_A"])
        configs = []
        for g, s in grid:
            agents = {
                name: {
                    "n": cfg["n"],
                    **spec,
                    "eta": cfg["eta"][name],
                    "target": (target_a + g * np.array(cfg["direction"]) * (name == "B")).tolist(),
                }
                for name in ("A", "B")
            }
            configs.append(
                parse_config({"seed": s, "d": cfg["d"], "rounds": cfg["rounds"], "agents": agents})
            )
        game = setup(configs)
        trajectory = simulate(game)
        prediction = predict(game)
        shape = (len(cfg["gaps"]), cfg["seeds"])
        linearity, theory_gap, decreasing = 0.0, 0.0, 0
        for name in ("A", "B"):
            simulated = (trajectory.outputs(name)[-1] - game.targets[name]).reshape(*shape, -1)
            predicted = prediction.residual[name].reshape(*shape, -1)
            size = np.linalg.norm(simulated, axis=-1)
            size_predicted = np.linalg.norm(predicted, axis=-1)
            slope = simulated[-1] / gaps[-1]  # e_i(g_max) / g_max, per seed
            scale = max(size.max(), 1e-300)
            linearity = max(
                linearity,
                float(np.abs(simulated - gaps[:, None, None] * slope).max() / scale),
            )
            theory_gap = max(theory_gap, float(np.abs(size - size_predicted).max()))
            decreasing += int((np.diff(size, axis=0) <= 0).sum())
            curves[geometry, name] = (size, size_predicted)
            for k, g in enumerate(cfg["gaps"]):
                for s in range(cfg["seeds"]):
                    rows.append(
                        {
                            "geometry": geometry,
                            "agent": name,
                            "gap": g,
                            "seed": s,
                            "rho": prediction.rho[k * cfg["seeds"] + s],
                            "residual_simulated": size[k, s],
                            "residual_predicted": size_predicted[k, s],
                        }
                    )
        claims += [
            Claim(f"{geometry}: max |e(g) - g e(g_max)/g_max| / max|e|", linearity, 1e-8),
            Claim(f"{geometry}: max ||e| simulated - |e| predicted|", theory_gap, 1e-8),
            Claim(f"{geometry}: steps where |e| does not grow with g", decreasing, 0),
        ]
    return write_run(out, cfg, rows, claims, _figure(cfg, curves))


def _figure(cfg, curves):
    from misalign.outputs.figure import new_figure

    fig, axes = new_figure(len(cfg["geometries"]), (13, 4.2))
    gaps = np.array(cfg["gaps"])
    for ax, geometry in zip(axes, cfg["geometries"], strict=True):
        for k, name in enumerate(("A", "B")):
            size, predicted = curves[geometry, name]
            labels = (f"theory |e_{name}| (mean)", f"simulation |e_{name}| ± std")
            theory_and_simulation(ax, gaps, predicted, size, f"C{k}", labels)
        ax.set(
            xlabel="objective gap g (w_B* - w_A* = g u)",
            ylabel="final residual |e_i|",
            title=f"{geometry} ({plural(cfg['seeds'], 'seed')})",
        )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="residuals are linear in the objective gap and grow along a fixed direction",
    typical="1.8 s",
    config=config,
    run=run,
    compares=tuple(
        f"{geometry}: {what}"
        for geometry in GEOMETRIES
        for what in (
            "simulated residuals over gaps vs the theory's linear law e(g) = g e(1)",
            "simulated final residuals |e_i| vs the predicted ones",
            "simulated |e_i| along the gap grid vs the predicted monotone growth",
        )
    ),
)
