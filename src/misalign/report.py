"""The JSON report of a play (the ``--json`` contract) and the batch summary of ``run --seeds``."""

from __future__ import annotations

from typing import Any

import numpy as np

from misalign.config import AttackConfig
from misalign.experiment import Game
from misalign.play import Trajectory
from misalign.theory import Prediction, exactness


def report(
    game: Game, prediction: Prediction, trajectory: Trajectory | None = None, play: int = 0
) -> dict[str, Any]:
    """The JSON report of one play of the batch (the ``--json`` contract).

    Keys: ``config`` (resolved), ``config_hash``, ``agents.<name>`` (``X``, ``y``,
    ``gamma``, ``target``), ``prediction`` (``<name>`` fixed point, ``rho``,
    ``converges``, ``rounds_to_tol``, ``covariance.<name>`` (the stationary covariance of
    the output, with sampled agents), ``residual.<name>`` predicted distance to
    target, ``on_target.<name>``, ``one_sided`` (the one agent that ends exactly on
    target while another does not, else ``null``), ``why.<name>`` for exact agents);
    with a trajectory also ``outputs.<name>`` (one list of ``d`` floats per
    round), ``residual.<name>`` (distance of the final output to its target),
    ``rounds_played``, ``diverged_at`` (round, or ``null``) and ``rounds_to_prediction``
    (from which round every output stays within 1e-8 of its prediction). With an attack,
    ``attack`` (its table, plus ``probe_turns`` for the gray box); with a
    defence after a run, ``defence`` (``flagged_at``, ``score``, ``refused_at``).
    """
    config = game.configs[play]
    converges = bool(prediction.converges[play])
    out: dict[str, Any] = {
        "config": config.model_dump(mode="json", exclude_none=True),
        "config_hash": config.digest(),
        "agents": {},
        "prediction": {
            "rho": float(prediction.rho[play]),
            "converges": converges,
            "rounds_to_tol": int(prediction.rounds_to()[play]) if converges else None,
            "residual": {
                name: float(np.linalg.norm(prediction.residual[name][play]))
                if converges and name in prediction.residual
                else None
                for name in game.schedule.agents
            },
        },
    }
    for name, agent in game.agents.items():
        prompt = game.prompts[name][play] if name in game.prompts else None  # helpers have none
        gamma = agent.gamma
        out["agents"][name] = {
            "X": None if prompt is None else prompt.X.tolist(),
            "y": None if prompt is None else prompt.y.tolist(),
            "gamma": None if gamma is None else gamma[play].tolist(),
            "target": None if prompt is None else prompt.target.tolist(),
        }
        fixed = prediction.fixed_point[name][play]
        out["prediction"][name] = fixed.tolist() if converges else None
    if converges:
        out["prediction"].update(_one_sided(game, prediction, play))
    if converges and prediction.covariance:
        out["prediction"]["covariance"] = {
            name: sigma[play].tolist() for name, sigma in prediction.covariance.items()
        }
    if config.attack is not None:
        out["attack"] = config.attack.model_dump(mode="json")
        probes = getattr(game.agents[config.attack.agent], "probe_turns", None)
        if probes is not None:
            out["attack"]["probe_turns"] = probes
    if trajectory is not None and config.defence is not None:
        guard = game.agents[config.defence.agent]
        out["defence"] = {
            key: _play_value(getattr(guard, key), play)
            for key in ("flagged_at", "score", "refused_at")
            if hasattr(guard, key)
        }
    if trajectory is not None and converges:
        out["rounds_to_prediction"] = _rounds_to_prediction(game, prediction, trajectory, play)
    if trajectory is not None:
        targets = game.targets
        stop = trajectory.diverged_at[play]
        rounds = trajectory.rounds if stop < 0 else int(stop)  # keep only finite rounds
        out["rounds_played"] = rounds
        out["diverged_at"] = None if stop < 0 else int(stop)
        out["outputs"] = {
            name: trajectory.outputs(name)[:rounds, play].tolist() for name in game.schedule.agents
        }
        out["residual"] = {
            name: float(trajectory.distance(name, targets[name])[rounds - 1, play])
            if rounds and name in targets
            else None
            for name in game.schedule.agents
        }
    return out


def _rounds_to_prediction(
    game: Game, prediction: Prediction, trajectory: Trajectory, play: int, tol: float = 1e-8
) -> int | None:
    """The round (from 1) after which every output stays within ``tol`` (relative) of its
    predicted limit: the measured counterpart of ``rounds_to_tol``; ``None`` if never."""
    close = np.ones(trajectory.rounds, dtype=bool)
    for name in game.schedule.agents:
        fixed = prediction.fixed_point[name][play]
        error = np.linalg.norm(trajectory.outputs(name)[:, play] - fixed, axis=-1)
        close &= error <= tol * max(1.0, np.linalg.norm(fixed))
    if not close[-1]:
        return None
    far = np.flatnonzero(~close)
    return int(far[-1] + 2) if len(far) else 1


def _describe(attack: AttackConfig) -> str:
    """``decoy (gray-box)``, ``per-turn``: the knowledge matters to the decoy only."""
    return f"{attack.method} ({attack.knowledge})" if attack.method == "decoy" else attack.method


def _play_value(values: np.ndarray | None, play: int) -> float | int | None:
    """One play's entry of a per-play statistic, ``None`` where absent or negative (never)."""
    if values is None or values[play] < 0:
        return None
    return values[play].item()


EXACT = 1e-9
"""A predicted residual below ``EXACT * max(1, |w*|)`` counts as exactly on target."""


def _one_sided(game: Game, prediction: Prediction, play: int) -> dict[str, Any]:
    """Which agents the theory puts exactly on target, and why (MODEL.md section 3)."""
    targets = game.targets
    names = [n for n in game.schedule.agents if n in targets]
    exact = {
        name: bool(
            np.linalg.norm(prediction.residual[name][play])
            <= EXACT * max(1.0, np.linalg.norm(targets[name][play]))
        )
        for name in names
    }
    attack = game.configs[play].attack
    why: dict[str, str] = {}
    helpers = {
        a.serves: (n, a.mode) for n, a in game.configs[play].agents.items() if a.kind == "helper"
    }
    for name in (n for n in names if exact[n]):
        if attack is not None and attack.agent == name:
            why[name] = f"attack: {_describe(attack)}"
            continue
        if name in helpers:
            why[name] = "the {1} helper {0} feeds it Newton steps".format(*helpers[name])
            continue
        reason = None
        if len(names) == 2 and attack is None:
            other = names[1 - names.index(name)]
            one = slice(play, play + 1)
            mine, theirs = game.agents[name].affine()[one], game.agents[other].affine()[one]
            # The gap between the targets the maps pull towards, H^+ b (w* when noise-free;
            # the prompt's least-squares solution otherwise, MODEL.md section 2).
            pulled = [np.linalg.pinv(f.H[0]) @ f.c[0] for f in (theirs, mine)]
            reason = exactness(mine.H[0], theirs.H[0], pulled[0] - pulled[1])
        why[name] = reason or "its predicted residual vanishes"
    winners = [n for n in names if exact[n]]
    return {
        "on_target": exact,
        "one_sided": winners[0] if len(winners) == 1 and len(names) > 1 else None,
        "why": why,
    }


def spread(game: Game, prediction: Prediction, trajectory: Trajectory) -> dict[str, Any]:
    """The batch at a glance (``run --seeds``): per agent with a target, the final and the
    predicted distance to it, per seed and as mean and standard deviation over the plays
    that stayed finite and converge."""
    ok = (trajectory.diverged_at < 0) & prediction.converges
    residual = {}
    for name in (n for n in game.schedule.agents if n in game.targets):
        simulated = trajectory.distance(name, game.targets[name])[-1]
        predicted = np.linalg.norm(prediction.residual[name], axis=-1)
        residual[name] = {
            "simulated": [float(x) if k else None for x, k in zip(simulated, ok, strict=True)],
            "predicted": [float(x) if k else None for x, k in zip(predicted, ok, strict=True)],
            "simulated_mean": float(simulated[ok].mean()) if ok.any() else None,
            "simulated_std": float(simulated[ok].std()) if ok.any() else None,
            "predicted_mean": float(predicted[ok].mean()) if ok.any() else None,
        }
    return {
        "seeds": [c.seed for c in game.configs],
        "converged": int(ok.sum()),
        "residual": residual,
    }
