"""Black-box theory for language-model and learned nonlinear agents (``BlackBox``): fit
``f(w) ~ A w + c`` from probes, globally and where the play goes (docs/theory.md §7).

A language model's or a learned model's map is affine only locally. So the fit is made twice:
**globally**, from
``probes`` estimates spread over the play's scale (around the agents' targets and the start),
and **locally**, from probes around the input the agent reads at the predicted equilibrium
(or, where the prediction has no equilibrium, around the inputs a short warm-up play visits),
refitted and re-predicted until the prediction is self-consistent. The prediction that is
reported is the one that was checked: the model's answer at the input it names for the
agent is the output it names (``confirmed``), one more probe after the last refit. With
``samples = k > 1`` each probe is answered ``k`` times and the answers' covariance ``Q``
around the fitted map feeds the stationary spread of docs/theory.md §6 and the check's
tolerance.

How well a fit fits is said three ways: ``r2`` on the answers it was fitted to (in-sample:
pure noise scores ``d / (m - 1)`` on average over ``m`` answers), ``r2_loo`` leaving each
probe out in turn (held out, closed form through the hat matrix), and after a play
``r2_play`` on the (input, answer) pairs of the play itself (``score``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from misalign.llm.store import Slot
from misalign.model.agent import AffineMap, BlackBox, Fitted, black_boxes
from misalign.model.play import mixed, play
from misalign.model.theory import Prediction

LOCAL = 0.25
"""The local probes' radius, as a fraction of the global one."""
CONFIRM = 0.02
"""A prediction is confirmed when the model's answer at the input it predicts for the agent is
within ``CONFIRM`` times the play's scale (the global probes' radius; or 1e-6 relative, if
larger) of the output it predicts, plus three standard errors of the mean answer when the
answers are sampled."""
WARMUP = 5
"""Rounds of the warm-up play whose inputs centre the local probes of a play whose
prediction has no equilibrium (its answers are stored: a play from the same start reads them
back)."""
SINGULAR = 1e-9
"""Leaving out a probe whose leverage leaves ``I - H`` with a singular value below this (the
rest cannot determine the map: ``d + 1`` probes) gives no held-out score."""


@dataclass(frozen=True)
class Fit:
    """A fitted map and how well it fits, per play.

    Attributes:
        map: the least-squares ``A w + c``, ``A`` of shape ``(B, d, d)``.
        r2: the fraction of the answers' variance the map explains, in-sample, ``(B,)``.
        r2_loo: the same, each probe's answers predicted by the fit to the other probes
            (``1 - PRESS / total``; NaN where a probe cannot be left out), ``(B,)``.
        rms: the residuals' root mean square per coordinate, ``(B,)``.
        probes: answers used (probes times samples).
        noise: the answers' covariance around the map, ``(B, d, d)`` (``samples > 1``).
    """

    map: AffineMap
    r2: np.ndarray
    r2_loo: np.ndarray
    rms: np.ndarray
    probes: int
    noise: np.ndarray | None


@dataclass(frozen=True)
class AgentFit:
    """An agent's global and local fits.

    Attributes:
        global_: the fit over the play's scale.
        local: the last fit around the predicted equilibrium, or around where the play goes
            (``None`` when ``refits`` is 0).
        iterations: local refits made (at most the agent's ``refits``).
        probes: answers used by every local refit and check together.
        confirmed: per play, whether the model's answer at the input the reported
            prediction names for the agent was the output it names (within ``tolerance``),
            for every refitted black-box agent of the play, ``(B,)``; false where the
            reported prediction itself was not checked (it names no equilibrium, or it came
            from a refit after the last check): a flag of an earlier prediction never stays.
        tolerance: per play, the distance the check of the reported prediction allowed
            (NaN where it was not checked).
        miss: per play, the distance of the model's mean answer at the checked input from
            the output the reported prediction names (NaN where it was not checked).
        noise_allowed: whether the check allowed for the answers' noise: ``True`` with
            ``samples > 1``, ``False`` with one sample at a temperature that is not 0 (or
            not set), ``None`` at temperature 0 (answers are not sampled).
    """

    global_: Fit
    local: Fit | None
    iterations: int
    probes: int
    confirmed: np.ndarray
    tolerance: np.ndarray
    miss: np.ndarray
    noise_allowed: bool | None


@dataclass(frozen=True)
class Fits:
    """Every black-box agent's fits, and the prediction the global fits give."""

    agents: dict[str, AgentFit]
    global_prediction: Prediction


def fit_answers(inputs: np.ndarray, answers: np.ndarray) -> Fit:
    """Least squares ``answers ~ A inputs + c`` per play, with its in-sample and
    leave-one-probe-out ``r2``, residual RMS and, with several samples per input, the
    answers' covariance around the map.

    Answers that are missing (NaN: a request that failed) are left out of their play's fit;
    a play left without ``d + 1`` affinely independent probes answered has no fit (NaN map,
    ``r2`` and RMS).

    Leave-one-out in closed form: with the design ``X`` (rows ``[w, 1]``) and the hat matrix
    ``H = X X^+``, the residuals of probe ``p``'s answers under the fit to the others are
    ``(I - H_pp)^{-1} e_p`` (``H_pp`` the block of its samples, ``e_p`` their in-sample
    residuals); ``r2_loo = 1 - sum |e_loo|^2 / sum |y - mean y|^2`` (the predicted residual
    sum of squares, PRESS; Allen 1974).

    Args:
        inputs: probe estimates, ``(P, B, d)``.
        answers: ``(S, P, B, d)``, ``S`` samples per probe (NaN where an answer is missing).

    Returns:
        The fit; ``Q = sum r r^T / (m - d - 1)`` over a play's ``m`` answers, for ``S > 1``.
    """
    samples, probes, batch, d = answers.shape
    X = np.broadcast_to(inputs, answers.shape).reshape(samples * probes, batch, d)
    Y = answers.reshape(samples * probes, batch, d)
    kept = np.isfinite(X).all(axis=-1) & np.isfinite(Y).all(axis=-1)  # (m, B)
    X, Y = np.where(kept[..., None], X, 0.0), np.where(kept[..., None], Y, 0.0)
    design = np.concatenate([X, kept[..., None].astype(float)], axis=-1).transpose(1, 0, 2)
    inverse = np.linalg.pinv(design)  # a zero row weighs nothing
    coef = inverse @ Y.transpose(1, 0, 2)
    known = np.linalg.matrix_rank(design) == d + 1  # d + 1 affinely independent answers
    coef[~known] = np.nan
    fitted = AffineMap(A=coef[:, :d, :].transpose(0, 2, 1), c=coef[:, d, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.where(
            kept[..., None], Y - np.einsum("bij,pbj->pbi", fitted.A, X) - fitted.c, 0.0
        )
    r2, rms = _explained(residual, Y, kept)
    r2_loo = _held_out(design @ inverse, residual, Y, kept, samples, probes)
    r2[~known], rms[~known], r2_loo[~known] = np.nan, np.nan, np.nan
    noise = None
    if samples > 1:
        dof = np.maximum(1, kept.sum(axis=0) - d - 1)[:, None, None]
        noise = np.einsum("pbi,pbj->bij", residual, residual) / dof
        noise[~known] = np.nan
    return Fit(fitted, r2, r2_loo, rms, len(Y), noise)


def score(fitted: AffineMap, inputs: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, ...]:
    """How well a fitted map predicts answers it was not fitted to (the play's own pairs).

    Args:
        fitted: the map, ``A`` of shape ``(B, d, d)``.
        inputs: the estimates the agent read, ``(m, B, d)``.
        answers: its answers, ``(m, B, d)`` (pairs with a NaN are left out).

    Returns:
        ``(r2, rms, count)`` per play: ``1 - sum |f - A w - c|^2 / sum |f - mean f|^2``,
        the residuals' RMS per coordinate, and the pairs scored (NaN scores without one).
    """
    kept = np.isfinite(inputs).all(axis=-1) & np.isfinite(answers).all(axis=-1)
    X, Y = np.where(kept[..., None], inputs, 0.0), np.where(kept[..., None], answers, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        residual = np.where(
            kept[..., None], Y - np.einsum("bij,pbj->pbi", fitted.A, X) - fitted.c, 0.0
        )
    r2, rms = _explained(residual, Y, kept)
    return r2, rms, kept.sum(axis=0)


def _explained(residual: np.ndarray, Y: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, ...]:
    """``r2`` (1 where the answers do not vary and are fitted exactly, 0 where they do not
    vary and are not) and the residuals' RMS per coordinate, per play."""
    count = kept.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = Y.sum(axis=0) / count[:, None]
        total = (np.where(kept[..., None], Y - mean, 0.0) ** 2).sum(axis=(0, 2))
        squared = (residual**2).sum(axis=(0, 2))
        r2 = np.where(total > 0, 1 - squared / total, np.where(squared > 0, 0.0, 1.0))
        rms = np.sqrt(squared / (count * Y.shape[-1]))
    r2[count == 0], rms[count == 0] = np.nan, np.nan
    return r2, rms


def _held_out(
    hat: np.ndarray,
    residual: np.ndarray,
    Y: np.ndarray,
    kept: np.ndarray,
    samples: int,
    probes: int,
) -> np.ndarray:
    """``r2_loo`` per play: each probe's answers (all its samples) left out in turn.

    Args:
        hat: ``H = X X^+`` per play, ``(B, m, m)``, rows ordered sample-major.
        residual: in-sample residuals, ``(m, B, d)`` (0 where an answer is missing).
        Y: answers, ``(m, B, d)`` (0 where missing); kept: ``(m, B)``.
        samples, probes: ``m = samples x probes``.
    """
    rows = np.arange(samples)[None, :] * probes + np.arange(probes)[:, None]  # (P, S)
    block = hat[:, rows[:, :, None], rows[:, None, :]]  # (B, P, S, S)
    eye = np.eye(samples) - block
    singular = np.linalg.svd(eye, compute_uv=False).min(axis=-1) < SINGULAR  # (B, P)
    eye[singular] = np.eye(samples)
    e = residual.transpose(1, 0, 2)[:, rows]  # (B, P, S, d)
    loo = np.linalg.solve(eye, e)
    press = (loo**2).sum(axis=(1, 2, 3))
    count = kept.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = Y.sum(axis=0) / count[:, None]
        total = (np.where(kept[..., None], Y - mean, 0.0) ** 2).sum(axis=(0, 2))
        r2 = np.where(total > 0, 1 - press / total, np.where(press > 0, 0.0, 1.0))
    r2[singular.any(axis=1) | (count == 0)] = np.nan
    return r2


def fit_game(game, predict) -> Fits:
    """Fit every black-box agent of a game, globally then locally, and check the
    prediction that is reported.

    The loop, per play with a global map (a play with too few answered probes is not asked
    again): (1) check the current prediction: ask every refitted agent at the input the
    prediction names for it (the first probe of the next refit); a play whose agents all
    answer the outputs it names is done, its prediction confirmed; (2) refit the others
    around that input (or, without an equilibrium, around the mean input of a
    ``WARMUP``-round warm-up play), re-predict, and go on; after the last refit one more
    check of the last prediction.

    Args:
        game: the game (``misalign.api.Game``).
        predict: ``predict(game) -> Prediction`` with the agents' current maps.

    Returns:
        The fits; each agent is left holding its local fit (its global one where no local
        fit could be made).
    """
    agents = black_boxes(game.agents)
    refitted = {name: a for name, a in agents.items() if a.config.refits > 0}
    reads = dict(game.schedule.turns)
    centre, radius = play_scale(game)
    batch = game.start.shape[0]
    asked: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per agent, the last probes and answers
    fits: dict[str, Fit] = {}
    for name, agent in agents.items():
        W = centre + radius[:, None] * _directions(game, name, 0, _count(agent, game))
        asked[name] = W, _answers(agent, W, 0, np.ones(batch, bool))
        fits[name] = _fit(agent, *asked[name])
    global_prediction = prediction = predict(game)
    locals_: dict[str, Fit | None] = dict.fromkeys(agents)
    used = dict.fromkeys(agents, 0)
    done = dict.fromkeys(agents, 0)
    confirmed = {name: np.zeros(batch, bool) for name in agents}
    tolerance = {name: np.full(batch, np.nan) for name in agents}
    miss = {name: np.full(batch, np.nan) for name in agents}
    # plays whose prediction is not yet confirmed; a play without a global map (too few of its
    # probes answered) is not asked again
    pending = np.logical_and.reduce([np.isfinite(f.map.c).all(axis=-1) for f in fits.values()])
    visited: dict[str, np.ndarray] | None = None  # the warm-up's mean and farthest inputs
    warmed = np.zeros(batch, bool)
    around = np.zeros(batch, bool)  # plays refitted around where their warm-up went
    current = np.zeros(batch, bool)  # plays whose flags are of the prediction now held
    last = max((a.config.refits for a in refitted.values()), default=0)
    for k in range(1, last + 2):
        at = {name: mixed(reads[name], prediction.fixed_point) for name in agents}
        finite = np.logical_and.reduce([np.isfinite(x).all(axis=-1) for x in at.values()])
        checking = pending & finite
        first: dict[str, np.ndarray] = {}  # each agent's answers at the predicted input
        for name, agent in refitted.items():
            first[name] = _answers(agent, at[name][None], k, checking)
            used[name] += int(checking.sum()) * agent.config.samples
            gap, tol = _check(agent, first[name][:, 0], prediction.fixed_point[name], radius)
            confirmed[name] = np.where(checking, gap <= tol, confirmed[name])
            tolerance[name] = np.where(checking, tol, tolerance[name])
            miss[name] = np.where(checking, gap, miss[name])
        current |= checking
        agree = np.logical_and.reduce([confirmed[n] for n in refitted]) if refitted else pending
        pending &= ~(checking & agree) & ~(~finite & around)  # probed where it went: done
        live = {n: pending if k <= a.config.refits else None for n, a in refitted.items()}
        if k > last or not any(p is not None and p.any() for p in live.values()):
            break
        need = pending & ~finite & ~warmed
        if need.any():
            fresh = _warm_up(game, need)
            visited = (
                fresh
                if visited is None
                else {n: np.where(need[:, None], fresh[n], visited[n]) for n in visited}
            )
            warmed |= need
        for name, agent in refitted.items():
            plays = live[name]
            if plays is None or not plays.any():
                continue
            done[name] = k
            W, F = (x.copy() for x in asked[name])
            here, scale = at[name], LOCAL * radius
            if visited is not None:  # without an equilibrium: where the warm-up went
                spread = np.linalg.norm(visited[name][1] - visited[name][0], axis=-1)
                here = np.where(finite[:, None], here, visited[name][0])
                scale = np.where(finite, scale, np.maximum(scale, spread))
            local = here + scale[:, None] * _directions(game, name, k, len(W))
            local[0] = here  # the first probe is the predicted input itself
            W[:, plays] = local[:, plays]
            around |= plays & ~finite
            new = _answers(agent, W[1:], k, plays, first=1)
            F[:, 1:, plays] = new[:, :, plays]
            F[:, 0, plays & finite] = first[name][:, 0, plays & finite]
            unseen = plays & ~finite  # the warm-up centre has not been asked yet
            if unseen.any():
                F[:, 0, unseen] = _answers(agent, here[None], k, unseen)[:, 0, unseen]
            used[name] += (int(plays.sum()) * (len(W) - 1) + int(unseen.sum())) * F.shape[0]
            lost = plays & ~np.isfinite(fit_answers(W, F).map.c).all(axis=-1)
            if lost.any():  # too few local answers: keep the last map, ask no more
                W[:, lost], F[:, :, lost] = asked[name][0][:, lost], asked[name][1][:, :, lost]
                pending &= ~lost
            asked[name] = W, F
            locals_[name] = _fit(agent, W, F)
            current &= ~(plays & ~lost)  # refitted: a new prediction, not yet checked
        prediction = predict(game)
    for name in refitted:  # no flag of a prediction other than the one reported
        confirmed[name] &= current
        tolerance[name] = np.where(current, tolerance[name], np.nan)
        miss[name] = np.where(current, miss[name], np.nan)
    return Fits(
        {
            name: AgentFit(
                fits[name],
                locals_[name],
                done[name],
                used[name],
                confirmed[name],
                tolerance[name],
                miss[name],
                _noise_allowed(agent),
            )
            for name, agent in agents.items()
        },
        global_prediction,
    )


def _check(agent: BlackBox, answers: np.ndarray, expected: np.ndarray, radius: np.ndarray):
    """Whether the mean of an agent's answers at the predicted input is the predicted output,
    per play: within ``CONFIRM`` of the play's scale (1e-6 relative at least), plus three
    standard errors of the mean where the answers are sampled (their covariance ``Q`` as the
    last fit estimated it).

    Args:
        answers: ``(S, B, d)``; expected: ``(B, d)``; radius: the play's scale, ``(B,)``.

    Returns:
        ``(miss, tolerance)``, each ``(B,)``: the distance of the mean answer from the
        expected output (NaN where not answered), and the distance allowed.
    """
    samples = answers.shape[0]
    tol = np.maximum(CONFIRM * radius, 1e-6 * (1 + np.linalg.norm(expected, axis=-1)))
    noise = agent.noise_covariance()
    if samples > 1 and noise is not None:
        tol = tol + 3 * np.sqrt(np.trace(noise, axis1=1, axis2=2)) / np.sqrt(samples)
    return np.linalg.norm(answers.mean(axis=0) - expected, axis=-1), tol


def _noise_allowed(agent: BlackBox) -> bool | None:
    """``True`` with several samples per probe; ``None`` for an agent whose answers do not
    vary (a learned model, a language model at temperature 0); else ``False``."""
    if agent.deterministic:
        return None
    if agent.config.samples > 1:
        return True
    temperature = agent.config.request.get("temperature")
    return None if temperature == 0 else False


def _warm_up(game, plays: np.ndarray) -> dict[str, np.ndarray]:
    """Play ``WARMUP`` rounds of the plays in the mask ``plays`` (the others start from NaN
    and ask nothing) and return, per black-box agent, the mean input it read over them
    and the input farthest from it: ``(2, B, d)`` each (NaN for the other plays)."""
    start = np.where(plays[:, None], game.start, np.nan)
    play(game.agents, game.schedule, WARMUP, start)
    out = {}
    for name, agent in black_boxes(game.agents).items():
        inputs = np.stack([w for w, _ in agent.history])  # (turns, B, d)
        seen = np.isfinite(inputs).all(axis=-1, keepdims=True)
        count = seen.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(seen, inputs, 0.0).sum(axis=0) / count
        away = np.where(seen[..., 0], np.linalg.norm(np.where(seen, inputs - mean, 0), axis=-1), -1)
        far = np.take_along_axis(inputs, away.argmax(axis=0)[None, :, None], axis=0)[0]
        out[name] = np.stack([mean, np.where(count > 0, far, np.nan)])
    return out


def play_scale(game) -> tuple[np.ndarray, np.ndarray]:
    """The play's scale per play: the centre and radius of the targets and the start (the
    radius at least ``1e-3 (1 + |centre|)``), each ``(B, d)`` and ``(B,)``: the global probes'
    spread, and what ``misalign.experiments.transformer`` measures errors against."""
    points = np.stack([*game.targets.values(), game.start])  # (k, B, d)
    centre = points.mean(axis=0)
    spread = np.linalg.norm(points - centre, axis=-1).max(axis=0)
    return centre, np.maximum(spread, 1e-3 * (1 + np.linalg.norm(centre, axis=-1)))


def _directions(game, name: str, fit: int, probes: int) -> np.ndarray:
    """Unit probe offsets, ``(probes, B, d)``: ``+q_1, ..., +q_d, -q_1, ..., -q_d`` for the
    rows ``q_k`` of a random rotation, then of another, as many as needed. Any ``d + 1`` of
    the first ``2 d`` are affinely independent, so the least-squares design is well
    conditioned (Gaussian offsets sometimes nearly align and spoil a fit). Play ``b``'s come
    from its own seed, so that play ``b`` of a batch asks what a single run of its seed asks."""
    d = game.start.shape[1]
    tag = zlib.crc32(name.encode())
    rotations = -(-probes // (2 * d))
    out = []
    for config in game.configs:
        rng = np.random.default_rng([config.seed, tag, 7, fit])
        star = [np.linalg.qr(rng.standard_normal((d, d)))[0].T for _ in range(rotations)]
        out.append(np.concatenate([x for q in star for x in (q, -q)])[:probes])
    return np.stack(out, axis=1)


def _count(agent: BlackBox, game) -> int:
    """The agent's probes per fit: ``probes``, default ``BlackBox.default_probes``."""
    return agent.config.probes or agent.default_probes(game.start.shape[1])


def most_answers(game) -> int:
    """The most answers ``fit_game`` asks for (``answers_per_agent``, every agent)."""
    return sum(answers_per_agent(game).values())


def answers_per_agent(game) -> dict[str, int]:
    """The most answers ``fit_game`` asks each black-box agent for, over every play:
    ``probes x samples`` for the global fit and for each of its ``refits``, ``samples`` for
    each check that is not the first probe of a refit (``R + 1 - refits``, ``R`` the most
    refits of any agent), and, when any agent refits, one per turn of a ``WARMUP``-round
    warm-up (fewer when plays confirm early or have an equilibrium)."""
    plays = game.start.shape[0]
    agents = black_boxes(game.agents)
    last = max((a.config.refits for a in agents.values()), default=0)
    per_round = {name: sum(taker == name for taker, _ in game.schedule.turns) for name in agents}
    out = {}
    for name, agent in agents.items():
        samples, refits = agent.config.samples, agent.config.refits
        fits = _count(agent, game) * samples * (1 + refits)
        checks = samples * (last + 1 - refits) if refits else 0
        warm_up = WARMUP * per_round[name] if last else 0
        out[name] = (fits + checks + warm_up) * plays
    return out


def _answers(
    agent: BlackBox, W: np.ndarray, fit: int, plays: np.ndarray, first: int = 0
) -> np.ndarray:
    """The agent's answers to every probe of ``W`` (``(P, B, d)``; probe ``p`` is the fit's
    probe ``first + p``), ``samples`` times, for the plays in the mask ``plays`` (NaN
    elsewhere, where a probe is not finite, and where a play failed): ``(S, P, B, d)``."""
    samples = agent.config.samples
    probes, batch, d = W.shape
    F = np.full((samples, probes, batch, d), np.nan)
    finite = np.isfinite(W).all(axis=-1) & plays
    index = [(s, p, b) for s in range(samples) for p in range(probes) for b in range(batch)]
    index = [(s, p, b) for s, p, b in index if finite[p, b]]
    answers = agent.ask(
        [
            (b, W[p, b], Slot(agent.name, agent.seeds[b], "probe", fit, first + p, s))
            for s, p, b in index
        ]
    )
    for (s, p, b), answer in zip(index, answers, strict=True):
        if answer is not None:
            F[s, p, b] = answer
    return F


def _fit(agent: BlackBox, W: np.ndarray, F: np.ndarray) -> Fit:
    """Fit the answers and leave the agent holding the fitted map (and noise)."""
    fit = fit_answers(W, F)
    agent.fitted = Fitted(fit.map, fit.noise)
    return fit
