"""``transformer``: plays with a trained softmax transformer, predicted through its fitted map
(docs/theory.md §7 and §10), and where that prediction stops holding.

The shipped checkpoint (``misalign/data/transformer.pt``, trained by ``misalign train
examples/training/transformer.toml``: d = 5, n = 20, label noise 0.25, Garg et al.'s
curriculum) plays agent ``A``; agent ``B`` is either an analytic ``gd`` agent with the
``lsa-optimal`` preconditioner (``transformer-vs-gd``) or a second copy of the transformer
(``transformer-vs-transformer``). ``B``'s target is ``A``'s moved by a gap ``g`` along a random
unit direction; both prompts hold ``n = 20`` examples with label noise 0.25, from isotropic,
anisotropic or rotated anisotropic inputs (the model was trained on isotropic ones only).

For every play the prediction is made first: the transformer's map is fitted from probes,
globally and then locally around the predicted equilibrium, and the prediction is checked
where it points (``misalign.api.fit``, ``predict``). Then the play runs, and what it did is
compared with what was predicted:

- the equilibrium: ``|observed tail mean - predicted fixed point|`` over the play's scale
  (the radius of the targets and the start, as the fit uses), per agent, the larger;
- the rate: the observed geometric rate of ``|s_t - s_T|`` against the predicted ``rho``;
- the fit's held-out r2 (leave one probe out) and its r2 on the play's own turns.

Per pairing and geometry the boundary is the largest scanned gap up to which the median
equilibrium error stays within ``TOLERANCE``. The claims state it as measured, not a pass at
every gap: each boundary is at least the training scale (``IN_DISTRIBUTION``), and for two
transformers the largest one lies inside the scan (past it the prediction stops holding: the
residual tasks are many times the training tasks, and the two models' answers leave any affine
map). With an analytic partner the prediction held at every scanned gap (measured, reported in
the table, not claimed).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from misalign.experiments.base import Claim, Experiment, Result, measured_rate, write_run
from misalign.runtime.optional import require_torch

NAME = "transformer"
CHECKPOINT = "transformer.pt"
"""The shipped checkpoint's name in ``misalign/data``."""
D, N, NOISE = 5, 20, 0.25
GEOMETRIES = {
    "isotropic": {"spectrum": [1.0] * D, "rotate": False},
    "anisotropic": {"spectrum": [2.0, 1.4, 1.0, 0.7, 0.5], "rotate": False},
    "rotated": {"spectrum": [2.0, 1.4, 1.0, 0.7, 0.5], "rotate": True},
}
PAIRINGS = ("transformer-vs-gd", "transformer-vs-transformer")
TWO_TRANSFORMERS = PAIRINGS[1]
"""The pairing whose prediction stops holding within the scan (with an analytic partner it
held at every scanned gap: measured, not claimed)."""
GAPS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
QUICK_GAPS = (0.0, 2.0, 8.0, 16.0, 32.0, 64.0)
IN_DISTRIBUTION = 2.0
"""Gaps up to this keep both agents' residual tasks at the scale of the training tasks
(``w ~ N(0, I_5)``, ``|w|`` about 2.2)."""
TOLERANCE = 0.05
"""An equilibrium is predicted when it is within this fraction of the play's scale."""
ROUNDS = 150
TAIL = 10
"""The observed equilibrium: the mean output over the last ``TAIL`` rounds."""
ICL_FACTOR = 2.5
"""The shipped model's held-out ICL loss at ``n`` is within this factor of least squares'
(measured: 2.35 on fresh tasks; Garg et al.'s far larger models, trained far longer, come
within a few percent)."""


def config(quick: bool, seeds: int | None) -> dict[str, Any]:
    """The resolved parameters."""
    return {
        "experiment": NAME,
        "checkpoint": f"misalign/data/{CHECKPOINT}",
        "d": D,
        "n": N,
        "noise": NOISE,
        "geometries": GEOMETRIES,
        "pairings": list(PAIRINGS),
        "gaps": list(QUICK_GAPS if quick else GAPS),
        "in_distribution": IN_DISTRIBUTION,
        "tolerance": TOLERANCE,
        "seeds": seeds or (4 if quick else 16),
        "rounds": ROUNDS,
        "tail": TAIL,
        "probes": 2 * D + 1,
        "refits": 2,
        "icl_tasks": 2048 if quick else 8192,
    }


def play_config(
    cfg: dict[str, Any], checkpoint: Path, pairing: str, geometry: str, gap: float, seed: int
):
    """One play: ``A`` the transformer, ``B`` a ``gd`` agent or the transformer, targets
    ``gap`` apart along a random unit direction (``w_A* ~ N(0, I)``)."""
    from misalign.config import parse_config

    rng = np.random.default_rng([seed, 23])
    w_A = rng.standard_normal(D)
    direction = rng.standard_normal(D)
    w_B = w_A + gap * direction / np.linalg.norm(direction)
    fitted = {
        "kind": "transformer",
        "checkpoint": str(checkpoint),
        "probes": cfg["probes"],
        "refits": cfg["refits"],
    }
    other = fitted if pairing == "transformer-vs-transformer" else {"kind": "gd"}
    common = {"n": N, "noise": NOISE, **GEOMETRIES[geometry]}
    return parse_config(
        {
            "seed": seed,
            "d": D,
            "rounds": cfg["rounds"],
            "agents": {
                "A": fitted | common | {"target": w_A.tolist()},
                "B": other | common | {"target": w_B.tolist()},
            },
        }
    )


def play_batch(configs: Sequence[Any], tail: int) -> dict[str, np.ndarray]:
    """Predict a batch of plays from the fitted maps, then play them and measure.

    Args:
        configs: the plays (one pairing, geometry and gap; one per seed).
        tail: rounds whose mean output is the observed equilibrium.

    Returns:
        Per play (``(B,)`` each): ``error`` (the larger agent's ``|observed - predicted|``
        over the play's scale, the observed equilibrium being the tail mean of a play that
        settled on a fixed point, ``misalign.model.observe``; 0 where no equilibrium is
        predicted and none is reached, ``inf`` where one is and the other is not);
        ``settled``; ``rho`` (predicted); ``rate`` (observed); ``distance`` and
        ``predicted_distance`` (``A``'s observed and predicted distance to its target);
        ``r2_loo`` and ``r2_play`` (``A``'s reported fit, held out and on the play);
        ``confirmed`` (every fitted agent's prediction checked where it points).
    """
    from misalign.api import fit, predict, setup, simulate
    from misalign.llm.fit import play_scale, score
    from misalign.model.observe import FIXED, classify

    game = setup(list(configs))
    fits = fit(game)  # the prediction comes first: probes, refits, a check where it points
    prediction = predict(game)
    trajectory = simulate(game)
    names = game.schedule.agents
    outputs = {name: trajectory.outputs(name) for name in names}  # (T, B, d)
    observed = {name: x[-tail:].mean(axis=0) for name, x in outputs.items()}
    scale = play_scale(game)[1]
    settled = classify(trajectory).code == FIXED
    with np.errstate(invalid="ignore"):
        error = (
            np.max(
                [np.linalg.norm(observed[n] - prediction.fixed_point[n], axis=-1) for n in names],
                axis=0,
            )
            / scale
        )
    # no equilibrium predicted and none reached agree (0); one without the other is a miss
    error = np.where(settled & prediction.converges, error, np.inf)
    error[~settled & ~prediction.converges] = 0.0
    stacked = np.concatenate([outputs[n] for n in names], axis=-1)
    moving = np.linalg.norm(stacked - stacked[-1], axis=-1)[:-1]
    floor = 1e-9 * (1 + np.linalg.norm(stacked[-1], axis=-1))
    rate = measured_rate(moving / floor, floor=1.0, window=5)
    a = fits.agents["A"]
    reported = a.local if a.local is not None else a.global_
    inputs, answers = (np.stack([turn[i] for turn in game.agents["A"].history]) for i in (0, 1))
    r2_play = score(reported.map, inputs, answers)[0]
    target = game.targets["A"]
    return {
        "error": error,
        "settled": settled,
        "rho": prediction.rho,
        "rate": rate,
        "distance": np.linalg.norm(observed["A"] - target, axis=-1),
        "predicted_distance": np.linalg.norm(prediction.fixed_point["A"] - target, axis=-1),
        "r2_loo": reported.r2_loo,
        "r2_play": r2_play,
        "confirmed": np.logical_and.reduce([f.confirmed for f in fits.agents.values()]),
    }


def icl_losses(checkpoint: Path, tasks: int) -> dict[str, list[float]]:
    """The model's held-out ICL loss at every prompt length ``0 .. context`` beside Garg et
    al.'s baselines, on fresh tasks (the evaluation seed + 1, never seen in training)."""
    import torch

    from misalign.agents.train import HeldOut, load_model

    model, trained = load_model(checkpoint)
    fresh = trained.model_copy(update={"seed": trained.seed + 1, "eval_batch": tasks})
    model = model.float()
    return HeldOut(fresh, torch.device("cpu")).evaluate(model, fresh, 0).curve


def boundary(gaps: Sequence[float], errors: Sequence[float], tolerance: float) -> float:
    """The largest gap up to which every median error is within ``tolerance``; NaN when the
    smallest already misses (no gap is predicted).

    Args:
        gaps: ascending; errors: the median error at each.
    """
    reached = float("nan")
    for gap, error in zip(gaps, errors, strict=True):
        if not error <= tolerance:
            return reached
        reached = gap
    return reached


def run(quick: bool, seeds: int | None, out: Path) -> Result:
    """Play every pairing, geometry, gap and seed from the shipped checkpoint.

    Raises:
        ConfigError: torch is not installed, or the checkpoint is missing from this
            installation (one line each).
    """
    from misalign.runtime.shipped import shipped

    require_torch("reproduce transformer")
    cfg = config(quick, seeds)
    with ExitStack() as stack:
        try:
            (checkpoint,) = stack.enter_context(shipped(CHECKPOINT))
        except FileNotFoundError as exc:
            from misalign.config import ConfigError

            raise ConfigError(f"{exc.filename}: {exc.strerror}") from None
        curve = icl_losses(checkpoint, cfg["icl_tasks"])
        rows, cells = [], []
        for pairing in cfg["pairings"]:
            for geometry in cfg["geometries"]:
                for gap in cfg["gaps"]:
                    configs = [
                        play_config(cfg, checkpoint, pairing, geometry, gap, s)
                        for s in range(cfg["seeds"])
                    ]
                    found = play_batch(configs, cfg["tail"])
                    cells.append({"pairing": pairing, "geometry": geometry, "gap": gap} | found)
                    for s in range(cfg["seeds"]):
                        rows.append(
                            {"pairing": pairing, "geometry": geometry, "gap": gap, "seed": s}
                            | {key: value[s] for key, value in found.items()}
                        )
    return write_run(out, cfg, rows, _claims(cfg, cells, curve), figure(cfg, cells, curve))


def medians(cells: list[dict[str, Any]], pairing: str, geometry: str, key: str) -> np.ndarray:
    """The median of ``key`` over seeds at each gap of one pairing and geometry."""
    mine = [c for c in cells if c["pairing"] == pairing and c["geometry"] == geometry]
    with np.errstate(invalid="ignore"):
        return np.array([np.median(c[key]) for c in mine])


def _finite_mean(values: np.ndarray) -> float:
    """The mean of the finite values; NaN, quietly, when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _claims(cfg: dict[str, Any], cells: list[dict[str, Any]], curve: dict) -> list[Claim]:
    n, gaps = cfg["n"], cfg["gaps"]
    inside = [c for c in cells if c["gap"] <= IN_DISTRIBUTION]
    isotropic = [c for c in inside if c["geometry"] == "isotropic"]
    confirmed = np.concatenate([c["error"][c["confirmed"]] for c in cells])
    claims = [
        Claim(
            f"held-out ICL loss at n = {n} / least squares' (fresh tasks)",
            curve["transformer"][n] / curve["least_squares"][n],
            ICL_FACTOR,
        ),
        Claim(
            f"isotropic, gap <= {IN_DISTRIBUTION:g}: median over plays of |observed - predicted "
            "equilibrium| / the play's scale",
            float(np.median(np.concatenate([c["error"] for c in isotropic]))),
            cfg["tolerance"],
        ),
        Claim(
            f"isotropic, gap <= {IN_DISTRIBUTION:g}: median over plays of |observed rate - "
            "predicted rho|",
            float(np.median(np.concatenate([np.abs(c["rate"] - c["rho"]) for c in isotropic]))),
            0.05,
        ),
        Claim(
            "every gap and geometry, plays whose prediction was confirmed where it points: 90th "
            "percentile of the equilibrium error / the play's scale (nan: none confirmed)",
            float(np.quantile(confirmed, 0.9)) if confirmed.size else float("nan"),
            cfg["tolerance"],
        ),
    ]
    edges = {}
    for pairing in cfg["pairings"]:
        for geometry in cfg["geometries"]:
            edge = boundary(gaps, medians(cells, pairing, geometry, "error"), cfg["tolerance"])
            edges[pairing, geometry] = edge
            claims.append(
                Claim(
                    f"{pairing}, {geometry}: the boundary, the largest gap up to which the median "
                    f"equilibrium error is within {cfg['tolerance']:g} of the scale",
                    edge,
                    IN_DISTRIBUTION,
                    at_least=True,
                )
            )
    below = [g for g in gaps if g < max(gaps)][-1]
    farthest = max(edges[TWO_TRANSFORMERS, g] for g in cfg["geometries"])
    claims.append(
        Claim(
            f"{TWO_TRANSFORMERS}: the largest boundary over the geometries (the prediction "
            f"stops holding within the scan, up to gap {max(gaps):g})",
            farthest,
            below,
        )
    )
    return claims


def figure(cfg: dict[str, Any], cells: list[dict[str, Any]], curve: dict):
    """Three rows of panels, a column per geometry: ``A``'s distance to its target against
    the gap (observed: markers, mean and standard deviation over seeds; predicted from the
    fitted maps: lines); the equilibrium error over the play's scale (median, with the
    tolerance); the observed rate against the predicted ``rho``. Returns the figure, not yet
    saved."""
    from misalign.outputs.figure import new_figure

    geometries = list(cfg["geometries"])
    fig, axes = new_figure(len(geometries), (5.0 * len(geometries), 11.0), rows=3)
    gaps = np.array(cfg["gaps"])
    for column, geometry in enumerate(geometries):
        top, middle, bottom = axes[0][column], axes[1][column], axes[2][column]
        for k, pairing in enumerate(cfg["pairings"]):
            mine = [c for c in cells if c["pairing"] == pairing and c["geometry"] == geometry]
            color = f"C{k}"
            seen = np.array([c["distance"] for c in mine])
            top.errorbar(
                gaps,
                seen.mean(axis=1),
                yerr=seen.std(axis=1),
                fmt="o",
                color=color,
                capsize=3,
                label=f"{pairing}: observed",
            )
            top.plot(
                gaps,
                [_finite_mean(c["predicted_distance"]) for c in mine],
                "-",
                color=color,
                label=f"{pairing}: predicted (fitted map; plays with an equilibrium)",
            )
            middle.semilogy(
                gaps,
                np.maximum(medians(cells, pairing, geometry, "error"), 1e-16),
                "o-",
                color=color,
                label=pairing,
            )
            bottom.plot(
                gaps,
                medians(cells, pairing, geometry, "rate"),
                "o",
                color=color,
                label=f"{pairing}: observed rate",
            )
            bottom.plot(
                gaps,
                medians(cells, pairing, geometry, "rho"),
                "-",
                color=color,
                label=f"{pairing}: predicted rho",
            )
        middle.axhline(cfg["tolerance"], color="k", ls="--", lw=1, label="tolerance")
        middle.axvline(IN_DISTRIBUTION, color="0.6", ls=":", lw=1)
        top.set(title=f"{geometry} inputs (d = {D}, n = {N})", ylabel="A: distance to target")
        middle.set(ylabel="|observed - predicted| / scale (median)")
        bottom.set(xlabel="objective gap |w_A* - w_B*|", ylabel="rate (median over seeds)")
        for ax in (top, middle, bottom):
            ax.legend(fontsize=7)
    least = curve["least_squares"][cfg["n"]]
    fig.suptitle(
        f"shipped transformer: ICL loss at n = {cfg['n']} {curve['transformer'][cfg['n']]:.3f} "
        f"(least squares {least:.3f})"
    )
    return fig


EXPERIMENT = Experiment(
    name=NAME,
    claim="a trained softmax transformer's plays, predicted through its fitted map, and where "
    "that prediction stops holding",
    typical="640 s",
    config=config,
    run=run,
    compares=(
        "the shipped model's held-out ICL loss at n vs least squares' (fresh tasks)",
        "isotropic, in-distribution gaps: observed equilibrium vs the fitted maps' prediction",
        "isotropic, in-distribution gaps: observed rate vs the fitted maps' rho",
        "every gap, confirmed predictions: observed equilibrium vs predicted (90th percentile)",
        *(
            f"{p}, {g}: observed equilibria vs the prediction, gap by gap (the boundary)"
            for p in PAIRINGS
            for g in GEOMETRIES
        ),
        f"{TWO_TRANSFORMERS}: observed equilibria vs the prediction past the training scale "
        "(a boundary inside the scan)",
    ),
)
