"""The JSON report of a play (the ``--json`` contract); a batch's is ``misalign.outputs.batch``."""

from __future__ import annotations

import json
import math
import re
import secrets
from typing import Any

import numpy as np

from misalign.api import Game
from misalign.config import AttackConfig
from misalign.model.agent import AffineMap
from misalign.model.measure import rounds_to_prediction
from misalign.model.observe import classify
from misalign.model.philox import GENERATOR
from misalign.model.play import Trajectory
from misalign.model.theory import Prediction, exactness


def report(
    game: Game,
    prediction: Prediction,
    trajectory: Trajectory | None = None,
    play: int = 0,
    fits=None,
) -> dict[str, Any]:
    """The JSON report of one play of the batch (the ``--json`` contract: every key below is
    present in every case, ``null`` where it has no value; the key table of docs/json.md
    states it and ``report_test`` holds the two together).

    Keys: ``config`` (resolved), ``config_hash``, ``generator`` (of every seeded number,
    ``misalign.model.philox.GENERATOR``), ``agents.<name>`` (``X``, ``y``,
    ``gamma``, ``target``), ``prediction`` (``<name>`` fixed point, ``rho``,
    ``converges``, ``rounds_to_tol``, ``distance.<name>`` predicted distance ``|e_i|``
    to target, ``covariance.<name>`` (the stationary covariance of the output, with
    sampled agents), ``on_target.<name>``, ``one_sided`` (the one agent that ends exactly
    on target while another does not), ``why.<name>`` for exact agents), ``attack`` (its
    table, plus ``probe_turns`` for the gray box) and ``defence`` (after a run:
    ``flagged_at``, ``score``, ``refused_at``). With a trajectory also ``outputs.<name>``
    (one list of ``d`` floats per round), ``distance.<name>`` (of the final output to its
    target), ``rounds_played``, ``diverged_at`` (the round where outputs overflowed, or
    ``null``: also for a play that failed), ``failed_at`` (the round where an agent gave
    no answer, for a play observed ``failed``, else ``null``),
    ``rounds_to_prediction`` (from which round every output stays within 1e-8 of its
    prediction), ``agreement`` (``_agreement``: does the play end at the prediction? where
    it does not, no verdict is given: ``on_target`` and ``one_sided`` are ``null``) and
    ``batch`` (``null``; ``run --seeds`` fills it with ``batch``). With language-model
    agents, ``fit`` (``fit_report``: their global and local fitted maps and the equilibrium
    each predicts, against the observed play) and ``llm`` (``llm_report``: requests, retries,
    tokens, cost, failed plays); ``null`` otherwise. ``network`` (``network_report``): the
    agents that feed back, the pooled least-squares solution and each limit's distance to it.
    ``observed`` (``misalign.model.observe.classify``): what the play did, judged from its outputs
    alone (``class``, ``period``, ``tail``, per agent ``mean`` and ``spread`` over the tail);
    ``null`` without a trajectory.

    A prediction made after the play (``run``) is of the regime each agent ended in (the
    decoy a gray-box attacker fitted, a predictive victim that stopped reading its
    partner); before it (``theory``), ``prediction.scope`` says what it assumes.
    Numbers that are not finite are ``null`` once written by ``to_json``.
    """
    config = game.configs[play]
    names = game.schedule.agents
    converges = bool(prediction.converges[play])
    predicted = {
        name: float(np.linalg.norm(prediction.residual[name][play]))
        if converges and name in prediction.residual
        else None
        for name in names
    }
    out: dict[str, Any] = {
        "config": config.model_dump(mode="json", exclude_none=True),
        "config_hash": config.digest(),
        "generator": GENERATOR,
        "agents": {},
        "prediction": {
            "rho": float(prediction.rho[play]),
            "converges": converges,
            "depends_on_start": bool(prediction.depends_on_start[play]) if converges else None,
            "rounds_to_tol": int(prediction.rounds_to()[play]) if converges else None,
            "distance": predicted,
            "covariance": {
                name: sigma[play].tolist() for name, sigma in prediction.covariance.items()
            }
            if converges and prediction.covariance
            else None,
            "on_target": dict.fromkeys(n for n in names if n in game.targets),
            "one_sided": None,
            "why": {},
            "scope": None if trajectory is not None else _assumed(config),
        },
        "attack": None,
        "defence": None,
        "fit": None,
        "llm": llm_report(game),
        "network": network_report(game, prediction, play),
        "observed": None,
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
        out["prediction"][name] = prediction.fixed_point[name][play].tolist() if converges else None
    scope = out["prediction"]["scope"] or ""
    if converges and "no verdict" not in scope:
        out["prediction"].update(_one_sided(game, prediction, play))
    if config.attack is not None:
        out["attack"] = config.attack.model_dump(mode="json")
        probes = getattr(game.agents[config.attack.agent], "probe_turns", None)
        if probes is not None:
            out["attack"]["probe_turns"] = probes
    one = slice(play, play + 1)
    mine = None if trajectory is None else trajectory.select(one)  # this play alone
    observed = None if mine is None else classify(mine).as_json(0)
    if fits is not None:
        out["fit"] = fit_report(fits, prediction, observed, mine, game, play)
    if trajectory is None:
        return out
    if config.defence is not None:
        guard = game.agents[config.defence.agent]
        out["defence"] = {
            key: _play_value(getattr(guard, key, None), play)
            for key in ("flagged_at", "score", "refused_at")
        }
    stop = mine.diverged_at[0]
    rounds = mine.rounds if stop < 0 else int(stop)  # keep only finite rounds
    targets = game.targets
    fixed = {name: prediction.fixed_point[name][one] for name in names}
    out |= {
        "outputs": {name: mine.outputs(name)[:rounds, 0].tolist() for name in names},
        "distance": {
            name: float(mine.distance(name, targets[name][one])[rounds - 1, 0])
            if rounds and name in targets
            else None
            for name in names
        },
        "rounds_played": rounds,
        # the play engine stops a play at a NaN too: a failure is not an overflow
        "diverged_at": int(stop) if stop >= 0 and observed["class"] == "growing" else None,
        "failed_at": int(stop) if stop >= 0 and observed["class"] == "failed" else None,
        "rounds_to_prediction": _play_value(rounds_to_prediction(fixed, mine), 0),
        "agreement": _agreement(game, prediction, trajectory, play),
        "batch": None,
        "observed": observed,
    }
    if out["agreement"]["holds"] is not True:  # never a verdict the simulation contradicts
        p = out["prediction"]
        p["on_target"], p["one_sided"], p["why"] = dict.fromkeys(p["on_target"]), None, {}
    return out


def network_report(game: Game, prediction: Prediction, play: int = 0) -> dict[str, Any]:
    """Where a network ends (docs/theory.md §2, weighted reads and simultaneous rounds):
    ``feeds_back`` (the agents whose output carries into the next round,
    ``Schedule.feeds_back``), ``pooled`` (the pooled least-squares solution of every prompt,
    ``argmin sum_i |X_i w - y_i|^2 / n_i``, minimum-norm where the prompts together leave
    directions unseen), ``distance.<name>`` (of the agent's predicted limit to ``pooled``)
    and ``spread`` (the largest distance of an agent's limit from the agents' mean limit: 0
    at consensus); the last two ``null`` where the play does not converge."""
    names = game.schedule.agents
    prompts = [game.prompts[name][play] for name in names if name in game.prompts]
    pooled = None
    if prompts:
        S = sum(p.second_moment for p in prompts)
        m = sum(p.moment for p in prompts)
        pooled = np.linalg.lstsq(S, m, rcond=None)[0]
    converges = bool(prediction.converges[play])
    limits = {name: prediction.fixed_point[name][play] for name in names}
    distance = {
        name: float(np.linalg.norm(limits[name] - pooled))
        if converges and pooled is not None
        else None
        for name in names
    }
    spread = None
    if converges:
        mean = np.mean([limits[name] for name in names], axis=0)
        spread = max(float(np.linalg.norm(limits[name] - mean)) for name in names)
    return {
        "feeds_back": list(game.schedule.feeds_back),
        "pooled": None if pooled is None else pooled.tolist(),
        "distance": distance,
        "spread": spread,
    }


def fit_report(
    fits,
    prediction: Prediction,
    observed: dict[str, Any] | None,
    trajectory: Trajectory | None,
    game: Game,
    play: int,
) -> dict[str, Any]:
    """Per language-model agent, its global and local fits (``misalign.llm.fit``) and the
    check of the prediction that is reported.

    Per fit: ``A``, ``c``, ``r2`` (in-sample), ``r2_loo`` (each probe held out), ``rms``,
    ``probes``, ``equilibrium`` (the agent's output at the equilibrium those fits predict;
    ``null`` where they predict none), after a play ``r2_play`` and ``rms_play`` (the fit
    scored on the play's own inputs and answers: where the play went) and ``gap``,
    ``|observed - equilibrium|``; the local one also ``iterations``. Per agent: ``observed``
    (after a play that settled, cycled or stayed bounded: its mean output over the tail the
    play was judged on, ``observed.agents.<name>.mean``; ``null`` for a play that grew or
    failed), ``confirmed`` (the model's answer at the input the reported prediction names is
    the output it names, within ``tolerance``; ``null`` when the agent was not checked:
    ``refits = 0``; ``false``, with ``miss`` and ``tolerance`` NaN, when the reported
    prediction itself was not checked: it names no equilibrium), ``miss`` (the distance of
    that answer from the output named: ``null`` unchecked, NaN when not answered),
    ``tolerance`` and ``noise_allowed`` (``false``: one
    sample at a temperature that is not 0, so the check did not allow for the answers' noise).

    Args:
        fits: the ``misalign.llm.fit.Fits``.
        prediction: the prediction reported (from the last fits).
        observed: the play's ``observed`` JSON (``misalign.model.observe``), ``None`` before a play.
        trajectory: this play alone (batch of one), ``None`` before a play.
        game: the game (its agents hold the play's inputs and answers).
        play: the play's index in the batch.
    """
    from misalign.llm.fit import score
    from misalign.model.agent import black_boxes

    agents = black_boxes(game.agents)
    settled = observed is not None and observed["class"] not in ("growing", "failed")
    out = {}
    for name, agent_fit in fits.agents.items():
        tail = observed["agents"][name]["mean"] if settled else None
        seen = None if tail is None else np.asarray(tail)
        history = agents[name].history
        pairs = None
        if trajectory is not None and history:
            pairs = tuple(
                np.stack([turn[i] for turn in history])[:, play : play + 1] for i in (0, 1)
            )
        checked = agents[name].config.refits > 0
        row: dict[str, Any] = {
            "observed": None if seen is None else seen.tolist(),
            "confirmed": bool(agent_fit.confirmed[play]) if checked else None,
            "tolerance": float(agent_fit.tolerance[play]) if checked else None,
            "miss": float(agent_fit.miss[play]) if checked else None,
            "noise_allowed": agent_fit.noise_allowed,
        }
        for key, fit, predicted in (
            ("global", agent_fit.global_, fits.global_prediction),
            ("local", agent_fit.local, prediction if agent_fit.local is not None else None),
        ):
            if fit is None:
                row[key] = None
                continue
            equilibrium = predicted.fixed_point[name][play]
            if not predicted.converges[play]:
                equilibrium = None
            mine = AffineMap(fit.map.A[play : play + 1], fit.map.c[play : play + 1])
            r2_play, rms_play, _ = (None, None, None) if pairs is None else score(mine, *pairs)
            row[key] = {
                "A": fit.map.A[play].tolist(),
                "c": fit.map.c[play].tolist(),
                "r2": float(fit.r2[play]),
                "r2_loo": float(fit.r2_loo[play]),
                "r2_play": None if r2_play is None else float(r2_play[0]),
                "rms": float(fit.rms[play]),
                "rms_play": None if rms_play is None else float(rms_play[0]),
                "probes": fit.probes,
                "equilibrium": None if equilibrium is None else equilibrium.tolist(),
                "gap": None
                if seen is None or equilibrium is None
                else float(np.linalg.norm(seen - equilibrium)),
            }
        if row["local"] is not None:
            row["local"]["iterations"] = agent_fit.iterations
            row["local"]["probes"] = agent_fit.probes
        out[name] = row
    return out


def llm_report(game: Game) -> dict[str, Any] | None:
    """What the language-model agents' requests cost (``null`` without such agents):
    ``requests`` sent (retries included), ``cached`` (answers read from the store),
    ``retries`` by cause, ``tokens_in``, ``tokens_out``, ``cost`` (paid in this run: dollars,
    ``null`` without prices), ``cached_tokens_in``, ``cached_tokens_out``, ``cached_cost``
    (of the answers read from the store), ``format.<name>`` (the ``response_format`` the
    server accepted) and ``failed`` (per failed play: agent, seed, round, why)."""
    from misalign.llm import language_models

    agents = language_models(game)
    if not agents:
        return None
    session = next(iter(agents.values())).session
    stats = session.stats
    priced = any(
        a.config.price_in is not None or a.config.price_out is not None for a in agents.values()
    )
    return {
        "requests": stats.requests,
        "cached": stats.cached,
        "retries": dict(stats.retries),
        "tokens_in": stats.tokens_in,
        "tokens_out": stats.tokens_out,
        "cost": stats.cost if priced else None,
        "cached_tokens_in": stats.cached_tokens_in,
        "cached_tokens_out": stats.cached_tokens_out,
        "cached_cost": stats.cached_cost if priced else None,
        "format": {name: agent.format for name, agent in agents.items()},
        "failed": list(session.failed),
    }


AGREE = 1e-6
"""The final output agrees with a noise-free prediction within ``AGREE * max(1, |s*|)``."""
SPREAD = 4.0
"""A sampled output agrees within ``SPREAD`` stationary standard deviations (``sqrt(tr Sigma)``)."""


def _agreement(
    game: Game, prediction: Prediction, trajectory: Trajectory, play: int
) -> dict[str, Any]:
    """Whether the play ends where the prediction says: per agent, the gap between its final
    output and its predicted limit, against ``AGREE`` (plus ``SPREAD`` stationary standard
    deviations for sampled agents). ``holds`` is ``None`` when the theory predicts no limit."""
    names = game.schedule.agents
    if not prediction.converges[play]:
        return {"holds": None, "gap": dict.fromkeys(names), "tolerance": dict.fromkeys(names)}
    gap, tolerance = {}, {}
    for name in names:
        fixed = prediction.fixed_point[name][play]
        final = trajectory.outputs(name)[-1, play]
        with np.errstate(over="ignore", invalid="ignore"):
            gap[name] = float(np.linalg.norm(final - fixed))
        spread = 0.0
        if name in prediction.covariance:
            spread = SPREAD * float(np.sqrt(np.trace(prediction.covariance[name][play])))
        tolerance[name] = AGREE * max(1.0, float(np.linalg.norm(fixed))) + spread
    holds = all(gap[n] <= tolerance[n] for n in names)  # NaN gaps (overflow) do not hold
    if not all(np.isfinite(list(tolerance.values()))):  # outputs random-walk: nothing to check
        holds = None
    return {"holds": holds, "gap": gap, "tolerance": tolerance}


def _assumed(config) -> str | None:
    """What a prediction made before the play assumes of agents whose behaviour the play
    decides (``None``: the prediction is of the configured play as it will run)."""
    notes = []
    if config.attack is not None and config.attack.knowledge == "gray-box":
        victim = next(n for n in config.agents if n != config.attack.agent)
        damped = config.defence is not None and config.defence.method == "damping"
        if damped or config.agents[victim].sampling_std > 0:
            notes.append(
                "the gray-box attacker fits the victim exactly, which a "
                f"{'damped' if damped else 'sampled'} victim does not allow: no verdict "
                "before the play (run it for the decoy it really fits)"
            )
        else:
            notes.append("the gray-box attacker fits the victim exactly (it does here)")
    if config.defence is not None and config.defence.method == "predict":
        notes.append(
            "the predictive victim keeps reading its partner (whether it stops is known "
            "only after the play: no verdict before it)"
        )
    return "assumes " + "; and ".join(notes) if notes else None


def to_json(result: Any, indent: int | None = None) -> str:
    """Strict JSON text of a report: every number that is not finite becomes ``null`` (JSON has
    no ``Infinity`` or ``NaN``), numpy scalars become plain numbers and numpy arrays lists.

    With ``indent``, each numpy array (a batch's per-play list) is written on one line by the
    C encoder: the indented encoder is pure Python, 10x slower on ``10^5`` plays' lists."""
    if indent is None:
        return json.dumps(_finite(result), allow_nan=False)
    arrays: list[str] = []
    marker = f"\x00array-{secrets.token_hex(8)}-"

    def placed(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            arrays.append(json.dumps(_finite(value), allow_nan=False))
            return f"{marker}{len(arrays) - 1}"
        if isinstance(value, dict):
            return {key: placed(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [placed(item) for item in value]
        return value

    text = json.dumps(_finite(placed(result)), indent=indent, allow_nan=False)
    quoted = json.dumps(marker)[:-1]  # the marker as the encoder writes it, less its end quote
    return re.sub(re.escape(quoted) + r'(\d+)"', lambda k: arrays[int(k[1])], text)


def _finite(value: Any) -> Any:
    if isinstance(value, np.ndarray):  # a per-play list of a batch: converted in C
        if value.dtype.kind != "f":
            return value.tolist()
        plain = value.astype(object)
        plain[~np.isfinite(value)] = None
        return plain.tolist()
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
    """Which agents the theory puts exactly on target, and why (docs/theory.md §3)."""
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
    defence = game.configs[play].defence
    refused_at = getattr(game.agents[defence.agent], "refused_at", None) if defence else None
    for name in (n for n in names if exact[n]):
        if attack is not None and attack.agent == name:
            why[name] = f"attack: {_describe(attack)}"
            continue
        if refused_at is not None and name == defence.agent and refused_at[play] >= 0:
            why[name] = (
                f"predictive defence: it stopped reading its partner at round "
                f"{refused_at[play]} and answers its own estimate"
            )
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
            # the prompt's least-squares solution otherwise, docs/theory.md §2).
            pulled = [np.linalg.pinv(f.H[0]) @ f.c[0] for f in (theirs, mine)]
            reason = exactness(mine.H[0], theirs.H[0], pulled[0] - pulled[1])
        why[name] = reason or "its predicted residual vanishes"
    winners = [n for n in names if exact[n]]
    return {
        "on_target": exact,
        "one_sided": winners[0] if len(winners) == 1 and len(names) > 1 else None,
        "why": why,
    }
