"""``one_sided``: each condition of one-sided success (docs/theory.md §3) puts ``B`` exactly on
its target while ``A`` stays biased, in simulation.

Two noise-free agents alternate (``d = 4``; ``A`` reads ``B`` and ``B`` reads ``A``); ``A``'s
target is ``w_A* = e_1`` and ``B``'s is ``w_A* + g delta`` with ``|delta| = 1``. ``B`` ends
exactly on target iff ``(I - H_B) H_A delta = 0``; the three cases:

- ``newton``: ``B`` takes a full Newton step (``n_B = 10 >= d``, ``H_B = I``), any ``delta``;
- ``invisible``: ``A``'s prompt is short (``n_A = 2 < d``); a ``delta`` in the null space of
  ``H_A`` has ``H_A delta = 0``;
- ``seen-full-step``: ``B`` is a Newton agent with a short prompt (``n_B = 2``, so ``H_B`` is
  the projection on its prompt's row space, not ``I``); ``delta = H_A^{-1} x`` for ``x`` in
  that row space has ``(I - H_B) H_A delta = 0``.

The gaps are random: in every case, odd seeds draw a Gaussian direction (which meets the last
two conditions with probability 0), even seeds a Gaussian direction in the case's subspace.
The prompts of a seed do not depend on the targets, so each case is set up once to read the
step matrices, ``delta`` is drawn per play, and the play is set up again with the targets.
Per play and agent, the verdict of ``misalign.model.theory.exactness`` (on target or biased) is
compared with the simulated play's final residual, the simulated residuals with the
predicted ones, and where ``exactness`` calls a play one-sided the partner must stay biased.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from misalign.api import predict, setup, simulate
from misalign.config import parse_config
from misalign.experiments.base import Claim, Experiment, Result, worst, write_run
from misalign.model.theory import exactness
from misalign.runtime.text import plural

NAME = "one-sided"
HONEST = {"n": 20, "preconditioner": "lsa-optimal", "eta": 0.5}
CASES = {
    "newton": (
        HONEST,
        {"n": 10, "preconditioner": "newton", "eta": 1.0},
        "full Newton step",
    ),
    "invisible": (
        {"n": 2, "preconditioner": "lsa-optimal", "eta": 0.5},
        HONEST,
        "gap invisible",
    ),
    "seen-full-step": (
        HONEST,
        {"n": 2, "preconditioner": "newton", "eta": 1.0},
        "full step along the gap",
    ),
}


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "d": 4,
        "cases": {k: {"A": a, "B": b, "reason": r} for k, (a, b, r) in CASES.items()},
        "target_A": [1.0, 0.0, 0.0, 0.0],
        "gap": 1.0,
        "seeds": seeds or (6 if quick else 100),
        "rounds": 2000,
        "bias_margin": 0.01,
        "exact": 1e-8,
    }


def _delta(
    case: str, H_A: np.ndarray, H_B: np.ndarray, rng: np.random.Generator, anywhere: bool
) -> np.ndarray:
    """A random unit gap direction for one play: ``anywhere``, a Gaussian direction, else a
    Gaussian one in the subspace the case is about (the null space of ``H_A``, or ``H_A^{-1}``
    of the row space of ``H_B``; any direction for ``newton``)."""
    d = len(H_A)
    delta = rng.standard_normal(d)
    if anywhere or case == "newton":
        return delta / np.linalg.norm(delta)
    if case == "invisible":
        _, sv, vt = np.linalg.svd(H_A)
        null = vt[sv <= 1e-10 * sv.max()]
        delta = null.T @ rng.standard_normal(len(null))
    else:
        u, sv, _ = np.linalg.svd(H_B)
        row = u[:, sv > 1e-10 * sv.max()]
        delta = np.linalg.solve(H_A, row @ rng.standard_normal(row.shape[1]))
    return delta / np.linalg.norm(delta)


def _configs(cfg: dict[str, Any], spec: dict[str, Any], targets_b: list) -> list:
    return [
        parse_config(
            {
                "seed": s,
                "d": cfg["d"],
                "rounds": cfg["rounds"],
                "agents": {
                    "A": {**spec["A"], "target": cfg["target_A"]},
                    "B": {**spec["B"], "target": targets_b[s]},
                },
            }
        )
        for s in range(cfg["seeds"])
    ]


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """Per case: one batch to read the step matrices, one with the chosen gaps."""
    cfg = config(quick, seeds)
    target_a = np.array(cfg["target_A"])
    rows: list[dict[str, Any]] = []
    claims: list[Claim] = []
    results = {}
    for case, spec in cfg["cases"].items():
        probe = setup(_configs(cfg, spec, [cfg["target_A"]] * cfg["seeds"]))
        H_A, H_B = (probe.agents[n].affine().H for n in ("A", "B"))
        rng = np.random.default_rng(0)
        deltas = np.array(
            [_delta(case, H_A[s], H_B[s], rng, s % 2 == 1) for s in range(cfg["seeds"])]
        )
        targets_b = (target_a + cfg["gap"] * deltas).tolist()
        game = setup(_configs(cfg, spec, targets_b))
        H_A2, H_B2 = (game.agents[n].affine().H for n in ("A", "B"))  # read again
        trajectory = simulate(game)
        prediction = predict(game)
        residual = {
            n: np.linalg.norm(trajectory.outputs(n)[-1] - game.targets[n], axis=-1)
            for n in ("A", "B")
        }
        predicted = {n: np.linalg.norm(prediction.residual[n], axis=-1) for n in ("A", "B")}
        reasons = {
            "A": [exactness(H_A2[s], H_B2[s], deltas[s]) for s in range(cfg["seeds"])],
            "B": [exactness(H_B2[s], H_A2[s], deltas[s]) for s in range(cfg["seeds"])],
        }
        results[case] = (residual, predicted)
        claims += _claims(cfg, case, residual, predicted, reasons)
        for s in range(cfg["seeds"]):
            rows.append(
                {
                    "case": case,
                    "seed": s,
                    "rho": prediction.rho[s],
                    "residual_A_simulated": residual["A"][s],
                    "residual_A_predicted": predicted["A"][s],
                    "residual_B_simulated": residual["B"][s],
                    "residual_B_predicted": predicted["B"][s],
                    "reason_A": reasons["A"][s] or "",
                    "reason_B": reasons["B"][s] or "",
                }
            )
    return write_run(out, cfg, rows, claims, _figure(cfg, results))


def _claims(cfg, case, residual, predicted, reasons) -> list[Claim]:
    """A case's claims: per play and agent, ``exactness()``'s verdict (exact or biased)
    against the simulated play (``|e_i| < exact g``), the simulated residuals against the
    predicted ones, and the plays exactness() calls one-sided where the partner does not stay
    biased in simulation; ``nan`` over no exact play."""
    gap = cfg["gap"]
    on_target = {n: residual[n] / gap < cfg["exact"] for n in ("A", "B")}
    verdict = {n: np.array([r is not None for r in reasons[n]]) for n in ("A", "B")}
    one_sided = verdict["A"] ^ verdict["B"]
    partner = np.where(verdict["B"], residual["A"], residual["B"]) / gap
    return [
        Claim(
            f"{case}: plays x agents where exactness() and the simulation (|e_i| <"
            f" {cfg['exact']:g} g) disagree on who ends on target ({int(verdict['B'].sum())}"
            " of B's plays called exact)",
            sum(int((verdict[n] != on_target[n]).sum()) for n in ("A", "B")),
            0,
        ),
        Claim(
            f"{case}: max ||e_i| simulated - |e_i| predicted| over agents and plays",
            worst([np.abs(residual[n] - predicted[n]) for n in ("A", "B")]),
            1e-8,
        ),
        Claim(
            f"{case}: plays called one-sided by exactness() whose partner ends within"
            f" {cfg['bias_margin']} g of its target in simulation (nan: none called exact)",
            int((partner[one_sided] < cfg["bias_margin"]).sum()) if one_sided.any() else np.nan,
            0,
        ),
    ]


def _figure(cfg, results):
    from misalign.outputs.figure import new_figure

    fig, ax = new_figure(1, (7.5, 4.2))
    x = np.arange(len(results))
    floor = 1e-18
    for k, name in enumerate(("A", "B")):
        shift = (k - 0.5) * 0.3
        sim = [np.maximum(results[c][0][name], floor) for c in results]
        theory = [np.maximum(results[c][1][name], floor) for c in results]
        ax.errorbar(
            x + shift,
            [np.mean(v) for v in sim],
            [np.std(v) for v in sim],
            fmt="o",
            color=f"C{k}",
            capsize=3,
            label=f"simulation |e_{name}| ± std",
        )
        ax.plot(
            x + shift,
            [np.mean(v) for v in theory],
            "_",
            ms=20,
            mew=2,
            color=f"C{k}",
            label=f"theory |e_{name}| (mean)",
        )
    ax.set_xticks(x, list(results))
    ax.set(
        yscale="log",
        ylabel=f"final residual |e_i| (floored at {floor:g})",
        xlabel="condition of one-sided success (docs/theory.md §3)",
        title=f"one-sided success: B exact, A biased ({plural(cfg['seeds'], 'seed')})",
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="each condition of one-sided success puts one agent on target, the other biased",
    typical="1.7 s",
    config=config,
    run=run,
    compares=tuple(
        f"{case}: {what}"
        for case in CASES
        for what in (
            "exactness() verdict (on target or biased) vs the simulated final residual, per"
            " play and agent, on random gaps",
            "simulated final residuals |e_A|, |e_B| vs the predicted ones",
            "simulated partner residual vs 'biased' where exactness() calls a play one-sided",
        )
    ),
)
