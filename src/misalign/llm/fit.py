"""Black-box theory for language-model agents: fit ``f(w) ~ A w + c`` from probes, globally and
where the play goes (docs/theory.md §7).

A language model's map is affine only locally. So the fit is made twice: **globally**, from
``probes`` estimates spread over the play's scale (around the agents' targets and the start),
and **locally**, from probes around the input the agent reads at the predicted equilibrium,
refitted and re-predicted until the prediction is self-consistent: the model's answer at
that input is the predicted equilibrium output (``confirmed``). With ``samples = k > 1``
each probe is answered ``k`` times and the answers' covariance ``Q`` around the fitted map
feeds the stationary spread of docs/theory.md §6.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from misalign.agent import AffineMap
from misalign.experiment import language_models
from misalign.llm.agent import Fitted, LLMAgent
from misalign.llm.store import Slot
from misalign.play import mixed
from misalign.theory import Prediction

LOCAL = 0.25
"""The local probes' radius, as a fraction of the global one."""
CONFIRM = 0.02
"""A prediction is confirmed when the model's answer at the input it predicts for the agent is
within ``CONFIRM`` times the play's scale (the global probes' radius; or 1e-6 relative, if
larger) of the output it predicts, plus three standard errors of the mean answer when the
answers are sampled."""


@dataclass(frozen=True)
class Fit:
    """A fitted map and how well it fits, per play.

    Attributes:
        map: the least-squares ``A w + c``, ``A`` of shape ``(B, d, d)``.
        r2: the fraction of the answers' variance the map explains, ``(B,)``.
        rms: the residuals' root mean square per coordinate, ``(B,)``.
        probes: answers used (probes times samples).
        noise: the answers' covariance around the map, ``(B, d, d)`` (``samples > 1``).
    """

    map: AffineMap
    r2: np.ndarray
    rms: np.ndarray
    probes: int
    noise: np.ndarray | None


@dataclass(frozen=True)
class AgentFit:
    """An agent's global and local fits.

    Attributes:
        global_: the fit over the play's scale.
        local: the last fit around the predicted equilibrium (``None`` when the global
            prediction does not converge or ``refits`` is 0).
        iterations: local refits made (at most the agent's ``refits``).
        probes: answers used by every local refit together.
        confirmed: per play, whether the model's answer at the input a prediction names for
            the agent was the output that prediction names (within ``CONFIRM``), for every
            language-model agent of the play: the last refit probed an equilibrium that
            holds, ``(B,)``.
    """

    global_: Fit
    local: Fit | None
    iterations: int
    probes: int
    confirmed: np.ndarray


@dataclass(frozen=True)
class Fits:
    """Every language-model agent's fits, and the prediction the global fits give."""

    agents: dict[str, AgentFit]
    global_prediction: Prediction


def fit_answers(inputs: np.ndarray, answers: np.ndarray) -> Fit:
    """Least squares ``answers ~ A inputs + c`` per play, with its ``r2``, residual RMS and,
    with several samples per input, the answers' covariance around the map.

    Answers that are missing (NaN: a request that failed) are left out of their play's fit;
    a play left without ``d + 1`` affinely independent probes answered has no fit (NaN map,
    ``r2`` and RMS).

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
    count = kept.sum(axis=0)
    X, Y = np.where(kept[..., None], X, 0.0), np.where(kept[..., None], Y, 0.0)
    design = np.concatenate([X, kept[..., None].astype(float)], axis=-1).transpose(1, 0, 2)
    coef = np.linalg.pinv(design) @ Y.transpose(1, 0, 2)  # a zero row weighs nothing
    known = np.linalg.matrix_rank(design) == d + 1  # d + 1 affinely independent answers
    coef[~known] = np.nan
    fitted = AffineMap(A=coef[:, :d, :].transpose(0, 2, 1), c=coef[:, d, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = np.where(
            kept[..., None], Y - np.einsum("bij,pbj->pbi", fitted.A, X) - fitted.c, 0.0
        )
        mean = Y.sum(axis=0) / count[:, None]
        total = (np.where(kept[..., None], Y - mean, 0.0) ** 2).sum(axis=(0, 2))
        squared = (residual**2).sum(axis=(0, 2))
        r2 = np.where(total > 0, 1 - squared / total, np.where(squared > 0, 0.0, 1.0))
        rms = np.sqrt(squared / (count * d))
    r2[~known], rms[~known] = np.nan, np.nan
    noise = None
    if samples > 1:
        dof = np.maximum(1, count - d - 1)[:, None, None]
        noise = np.einsum("pbi,pbj->bij", residual, residual) / dof
        noise[~known] = np.nan
    return Fit(fitted, r2, rms, len(Y), noise)


def fit_game(game, predict) -> Fits:
    """Fit every language-model agent of a game, globally then locally.

    Args:
        game: the game (``misalign.experiment.Game``).
        predict: ``predict(game) -> Prediction`` with the agents' current maps.

    Returns:
        The fits; each agent is left holding its local fit (its global one where no local
        fit could be made).
    """
    agents = language_models(game)
    reads = dict(game.schedule.turns)
    centre, radius = _scale(game)
    batch = game.start.shape[0]
    every = np.ones(batch, bool)
    asked: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per agent, the last probes and answers
    fits: dict[str, Fit] = {}
    for name, agent in agents.items():
        W = centre + radius[:, None] * _directions(game, name, 0, _count(agent, game))
        asked[name] = W, _answers(agent, W, 0, every)
        fits[name] = _fit(agent, *asked[name])
    global_prediction = predict(game)
    locals_: dict[str, Fit | None] = dict.fromkeys(agents)
    used = dict.fromkeys(agents, 0)
    done = dict.fromkeys(agents, 0)
    confirmed = {name: np.zeros(batch, bool) for name in agents}
    prediction = global_prediction
    for k in range(1, max((a.config.refits for a in agents.values()), default=0) + 1):
        # the equilibrium the last prediction names: each agent's input and output there
        at = {name: mixed(reads[name], prediction.fixed_point) for name in agents}
        expected = {name: prediction.fixed_point[name] for name in agents}
        known = np.logical_and.reduce([np.isfinite(x).all(axis=-1) for x in at.values()])
        checked = [confirmed[n] for n, a in agents.items() if a.config.refits > 0]
        known &= ~np.logical_and.reduce(checked)  # every refitted agent of a play agrees
        refitted = False
        for name, agent in agents.items():
            live = known if k <= agent.config.refits else ~every
            if not live.any():
                continue
            refitted, done[name] = True, k
            W, F = (x.copy() for x in asked[name])
            local = at[name] + LOCAL * radius[:, None] * _directions(game, name, k, len(W))
            local[0] = at[name]  # the first probe is the predicted input itself
            W[:, live] = local[:, live]
            F[:, :, live] = _answers(agent, W, k, live)[:, :, live]
            asked[name] = W, F
            locals_[name] = fit = _fit(agent, W, F)
            used[name] += int(live.sum()) * F.shape[0] * F.shape[1]
            # confirmed: the model's answer at the predicted input is the predicted output
            answer = F[:, 0].mean(axis=0)
            spread = 0.0 if fit.noise is None else np.sqrt(np.trace(fit.noise, axis1=1, axis2=2))
            tol = np.maximum(CONFIRM * radius, 1e-6 * (1 + np.linalg.norm(expected[name], axis=-1)))
            tol = tol + 3 * spread / np.sqrt(F.shape[0])
            near = np.linalg.norm(answer - expected[name], axis=-1) <= tol
            confirmed[name] = np.where(live, near, confirmed[name])
        if not refitted:
            break
        prediction = predict(game)
    return Fits(
        {
            name: AgentFit(fits[name], locals_[name], done[name], used[name], confirmed[name])
            for name in agents
        },
        global_prediction,
    )


def _scale(game) -> tuple[np.ndarray, np.ndarray]:
    """The play's scale per play: the centre and radius of the targets and the start."""
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


def _count(agent: LLMAgent, game) -> int:
    """The agent's probes per fit: ``probes``, default ``2 d``."""
    return agent.config.probes or 2 * game.start.shape[1]


def most_answers(game) -> int:
    """The most answers ``fit_game`` asks for: every agent's probes times samples, for every
    play, in the global fit and each of its ``refits`` (fewer when plays confirm early)."""
    return sum(answers_per_agent(game).values())


def answers_per_agent(game) -> dict[str, int]:
    """The most answers ``fit_game`` asks each language-model agent for:
    ``probes x samples x (1 + refits) x plays``."""
    plays = game.start.shape[0]
    return {
        name: _count(agent, game) * agent.config.samples * plays * (1 + agent.config.refits)
        for name, agent in language_models(game).items()
    }


def _answers(agent: LLMAgent, W: np.ndarray, fit: int, plays: np.ndarray) -> np.ndarray:
    """The agent's answers to every probe of ``W`` (``(P, B, d)``), ``samples`` times, for the
    plays in the mask ``plays`` (NaN elsewhere, and where a play failed): ``(S, P, B, d)``."""
    samples = agent.config.samples
    probes, batch, d = W.shape
    F = np.full((samples, probes, batch, d), np.nan)
    index = [
        (s, p, b) for s in range(samples) for p in range(probes) for b in np.flatnonzero(plays)
    ]
    answers = agent.ask(
        [(b, W[p, b], Slot(agent.name, agent.seeds[b], "probe", fit, p, s)) for s, p, b in index]
    )
    for (s, p, b), answer in zip(index, answers, strict=True):
        if answer is not None:
            F[s, p, b] = answer
    return F


def _fit(agent: LLMAgent, W: np.ndarray, F: np.ndarray) -> Fit:
    """Fit the answers and leave the agent holding the fitted map (and noise)."""
    fit = fit_answers(W, F)
    agent.fitted = Fitted(fit.map, fit.noise)
    return fit
