"""``lsa``: plays between trained linear self-attention agents end where the theory, with the
``Gamma`` read off the weights, predicts (docs/theory.md §1-2).

``misalign.experiments.lsa_study`` trains a single-layer LSA per input geometry (``d = 4``, ``n =
20``;
isotropic and anisotropic ``Lambda``), cached in the run directory (``train-<geometry>/``,
resumed when there), then plays two copies of it against each other, ``B``'s target offset
from ``A``'s by a gap along a random unit direction, over gaps and seeds. Checked:

- each play's final outputs equal the fixed point predicted from the extracted ``Gamma``
  (the LSA is exactly linear in its labels, so it takes the gradient step of its ``Gamma``);
- ``Gamma`` read off the weights equals ``Gamma`` probed with basis queries;
- the residuals vanish at gap 0 and are linear in the gap;
- full run only (3000 training steps): the extracted ``Gamma`` is within 2% of ``Gamma*``
  and the residuals predicted from ``Gamma*`` are within 2% of the simulated ones (median over
  plays; a play's can be a few percent off, its prompt amplifying the difference). The quick
  run trains 200 steps, too few for that (the anisotropic ``Gamma`` is about 50% off);
  its plays still land on their own ``Gamma``'s prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.experiments.base import Claim, Experiment, Result, worst, write_run
from misalign.experiments.lsa_study import (
    GAPS,
    GEOMETRIES,
    N,
    lsa_study_figure,
    run_lsa_study,
    train_models,
)
from misalign.runtime.optional import require_torch

NAME = "lsa"


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters (the full run is ``misalign lsa-study``'s defaults)."""
    return {
        "experiment": NAME,
        "geometries": GEOMETRIES,
        "n": N,
        "gaps": list(GAPS),
        "steps": 200 if quick else 3000,
        "seeds": seeds or (4 if quick else 20),
        "rounds": 200,
        "probes": 16,
    }


def gammas(checkpoint: Path, probes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A trained model's ``Gamma`` read off its weights and by probing, and ``Gamma*``."""
    from misalign.agents.lsa import gamma_by_probing, gamma_from_weights
    from misalign.agents.train import covariance, load_model
    from misalign.model.agent import lsa_optimal_gamma

    model, trained = load_model(checkpoint)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((probes, trained.n, trained.d))
    y = rng.standard_normal((probes, trained.n))
    return {
        "weights": gamma_from_weights(model),
        "probed": gamma_by_probing(model, X, y),
        "optimal": lsa_optimal_gamma(covariance(trained), trained.n),
    }


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """Train (or reuse) the models in ``out``, play them and compare with the theory.

    Raises:
        ConfigError: torch is not installed (one line saying what to install).
    """
    require_torch("reproduce lsa")
    cfg = config(quick, seeds)
    out = Path(out)
    checkpoints = train_models(out, cfg["steps"])
    found = run_lsa_study(checkpoints, seeds=cfg["seeds"], gaps=cfg["gaps"])
    read = {g: gammas(path, cfg["probes"]) for g, path in checkpoints.items()}
    error = {
        g: float(np.linalg.norm(m["weights"] - m["optimal"]) / np.linalg.norm(m["optimal"]))
        for g, m in read.items()
    }
    rows = []
    for row in found:
        for name in ("A", "B"):
            for s in range(cfg["seeds"]):
                rows.append(
                    {
                        "geometry": row["geometry"],
                        "gap": row["gap"],
                        "agent": name,
                        "seed": s,
                        "simulated": row[name]["simulated"][s],
                        "predicted_extracted": row[name]["predicted_extracted"][s],
                        "predicted_optimal": row[name]["predicted_optimal"][s],
                        "rho_max": row["rho_max"],
                        "gamma_error": error[row["geometry"]],
                    }
                )
    return write_run(
        out, cfg, rows, _claims(cfg, found, read, error, quick), lsa_study_figure(found)
    )


def _claims(cfg, found, read, error, quick) -> list[Claim]:
    agents = ("A", "B")
    off_fixed_point = worst([r[a]["max_relative_error"] for r in found for a in agents])
    probing = max(
        float(np.linalg.norm(m["probed"] - m["weights"]) / np.linalg.norm(m["weights"]))
        for m in read.values()
    )
    at_zero = worst([r[a]["simulated"] for r in found if r["gap"] == 0 for a in agents])
    linear = 0.0
    for geometry in cfg["geometries"]:
        mine = sorted((r for r in found if r["geometry"] == geometry), key=lambda r: r["gap"])
        gaps = np.array([r["gap"] for r in mine])
        for a in agents:
            size = np.array([r[a]["simulated"] for r in mine])  # (gaps, seeds)
            slope = size[-1] / gaps[-1]
            linear = max(
                linear,
                float(np.abs(size - gaps[:, None] * slope).max() / max(size.max(), 1e-300)),
            )
    claims = [
        Claim(
            "max |final output - fixed point from the extracted Gamma| / max(1, |fixed point|)",
            off_fixed_point,
            1e-10,
        ),
        Claim("max |Gamma probed - Gamma off the weights| / |Gamma|", probing, 1e-10),
        Claim("gap 0: max final distance to own target (nan: no gap-0 play)", at_zero, 1e-10),
        Claim("max ||e(g)| - g |e(g_max)| / g_max| / max |e| (linear in the gap)", linear, 1e-8),
    ]
    if not quick:
        apart = float(
            np.median(
                [
                    abs(o - e) / e
                    for r in found
                    if r["gap"] > 0
                    for a in agents
                    for o, e in zip(r[a]["predicted_optimal"], r[a]["simulated"], strict=True)
                ]
            )
        )
        claims += [
            Claim(f"{g}: |Gamma - Gamma*| / |Gamma*| after {cfg['steps']} steps", e, 0.02)
            for g, e in error.items()
        ]
        claims.append(
            Claim(
                "gap > 0: median over plays of |residual predicted from Gamma* - simulated| /"
                " simulated",
                apart,
                0.02,
            )
        )
    return claims


EXPERIMENT = Experiment(
    name=NAME,
    claim="trained LSA plays end on the theory's equilibrium for the Gamma read off the weights",
    typical="20.5 s",
    config=config,
    run=run,
    compares=(
        "simulated final outputs vs the fixed point predicted from the Gamma off the weights",
        "the model's answers to basis queries (Gamma probed) vs the Gamma off the weights",
        "simulated final distance to own target at gap 0 vs the theory's 0",
        "simulated residuals over gaps vs the theory's linear law e(g) = g e(1)",
        "isotropic: Gamma off the weights after training vs Gamma*",
        "anisotropic: Gamma off the weights after training vs Gamma*",
        "simulated residuals vs those predicted from Gamma* (median over plays, gap > 0)",
    ),
    full_only=3,
)
