"""The LSA study: plays between trained transformers against the theory (docs/theory.md §1-2).

For each input geometry it trains a single-layer LSA (``misalign.agents.train``), then plays two
copies of it against each other, agent ``B``'s target offset from ``A``'s by a gap ``g``
along a random unit direction, over seeds. Each play's final residuals are compared
with the equilibrium predicted from the ``Gamma`` read off the trained weights, and with
the one predicted from the ideal ``Gamma*`` (the same prompts, analytic agents).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import PlayConfig, TrainConfig, parse_config

GEOMETRIES = {"isotropic": [1.0, 1.0, 1.0, 1.0], "anisotropic": [2.0, 1.0, 0.5, 0.25]}
GAPS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
N = 20


def train_models(out: Path, steps: int, progress: bool = False) -> dict[str, Path]:
    """Train (or resume, so a finished run is reused) one model per geometry."""
    from misalign.agents.train import train

    paths = {}
    for name, spectrum in GEOMETRIES.items():
        config = TrainConfig(d=len(spectrum), n=N, spectrum=spectrum, steps=steps, eval_every=steps)
        train(config, out / f"train-{name}", resume=True, progress=progress)
        paths[name] = out / f"train-{name}" / "checkpoint.pt"
    return paths


def play_config(
    kind: str, checkpoint: Path, spectrum: list[float], gap: float, seed: int
) -> PlayConfig:
    """Two agents of ``kind`` (``lsa``, or ``gd`` with ``Gamma*``), targets ``gap`` apart."""
    rng = np.random.default_rng(seed)
    w_A = rng.standard_normal(len(spectrum))
    direction = rng.standard_normal(len(spectrum))
    w_B = w_A + gap * direction / np.linalg.norm(direction)
    agent = (
        {"kind": "lsa", "checkpoint": str(checkpoint)}
        if kind == "lsa"
        else {"kind": "gd", "preconditioner": "lsa-optimal"}
    )
    common = {"n": N, "spectrum": spectrum}
    return parse_config(
        {
            "seed": seed,
            "d": len(spectrum),
            "rounds": 200,
            "agents": {
                "A": agent | common | {"target": w_A.tolist()},
                "B": agent | common | {"target": w_B.tolist()},
            },
        }
    )


def run_lsa_study(
    checkpoints: dict[str, Path], seeds: int = 20, gaps: Sequence[float] = GAPS
) -> list[dict[str, Any]]:
    """Play every geometry, gap and seed; one row per (geometry, gap) with per-seed arrays.

    Returns:
        Rows with, per agent, the simulated final distance to target, the distance
        predicted from the extracted ``Gamma`` and from ``Gamma*``, and the largest
        relative gap between simulation and the extracted-``Gamma`` prediction.
    """
    rows = []
    for geometry, spectrum in GEOMETRIES.items():
        grid = [(gap, seed) for gap in gaps for seed in range(seeds)]
        trained = setup(
            [play_config("lsa", checkpoints[geometry], spectrum, g, s) for g, s in grid]
        )
        ideal = setup([play_config("gd", checkpoints[geometry], spectrum, g, s) for g, s in grid])
        trajectory, extracted, optimal = simulate(trained), predict(trained), predict(ideal)
        targets = trained.targets
        for gap in gaps:
            mine = np.array([g == gap for g, _ in grid])
            row: dict[str, Any] = {
                "geometry": geometry,
                "gap": gap,
                "rho_max": float(extracted.rho[mine].max()),
            }
            for name in ("A", "B"):
                final = trajectory.outputs(name)[-1][mine]
                fixed = extracted.fixed_point[name][mine]
                scale = np.maximum(1.0, np.linalg.norm(fixed, axis=-1))
                row[name] = {
                    "simulated": np.linalg.norm(final - targets[name][mine], axis=-1).tolist(),
                    "predicted_extracted": np.linalg.norm(
                        extracted.residual[name][mine], axis=-1
                    ).tolist(),
                    "predicted_optimal": np.linalg.norm(
                        optimal.residual[name][mine], axis=-1
                    ).tolist(),
                    "max_relative_error": float(
                        (np.linalg.norm(final - fixed, axis=-1) / scale).max()
                    ),
                }
            rows.append(row)
    return rows


def lsa_study_figure(rows: list[dict[str, Any]]):
    """Residual against objective gap, a panel per geometry: the simulation as markers
    (mean, standard-deviation error bars) over the theory as lines, the extracted-``Gamma``
    prediction (dashed; the simulation lands on it) and ``Gamma*`` (dotted). Returns the
    matplotlib figure (``misalign.outputs.figure.new_figure``), not yet saved."""
    from misalign.outputs.figure import new_figure

    geometries = list(dict.fromkeys(r["geometry"] for r in rows))
    fig, axes = new_figure(len(geometries), (5.5 * len(geometries), 4.2))
    for ax, geometry in zip(np.atleast_1d(axes), geometries, strict=True):
        mine = [r for r in rows if r["geometry"] == geometry]
        gaps = np.array([r["gap"] for r in mine])
        for k, name in enumerate(("A", "B")):
            sim = np.array([r[name]["simulated"] for r in mine])
            mean, std = sim.mean(axis=1), sim.std(axis=1)
            ax.errorbar(
                gaps,
                mean,
                yerr=std,
                fmt="o",
                color=f"C{k}",
                capsize=3,
                zorder=3,
                label=f"{name}: trained LSA play",
            )
            for key, style, what in (
                ("predicted_extracted", "--", "extracted Gamma"),
                ("predicted_optimal", ":", "Gamma*"),
            ):
                ax.plot(
                    gaps,
                    [np.mean(r[name][key]) for r in mine],
                    style,
                    color=f"C{k}",
                    label=f"{name}: theory, {what}",
                )
        ax.set(
            xlabel="objective gap |w_A* - w_B*|",
            ylabel="final distance to own target",
            title=f"{geometry} inputs (d = 4, n = {N})",
        )
    return fig
