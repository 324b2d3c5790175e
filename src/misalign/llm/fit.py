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

from misalign.agent import AffineMap, Wrapper, affine_lstsq
from misalign.llm.agent import Fitted, LLMAgent
from misalign.llm.store import Slot
from misalign.theory import Prediction

LOCAL = 0.25
"""The local probes' radius, as a fraction of the global one."""
CONFIRM = 3.0
"""A local prediction is confirmed when the model's answer at the predicted input is within
``CONFIRM`` residual RMS (per answer) of the predicted output (or 1e-6 relative, if larger)."""


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
        iterations: local refits made.
        probes: answers used by every local refit together.
        confirmed: per play, whether the model's answer at the predicted input confirms the
            predicted equilibrium, ``(B,)``.
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

    Args:
        inputs: probe estimates, ``(P, B, d)``.
        answers: ``(S, P, B, d)``, ``S`` samples per probe (NaN where a play failed).

    Returns:
        The fit; ``Q = sum r r^T / (S P - d - 1)`` for ``S > 1``.
    """
    samples, probes, batch, d = answers.shape
    X = np.broadcast_to(inputs, answers.shape).reshape(samples * probes, batch, d)
    Y = answers.reshape(samples * probes, batch, d)
    fitted = affine_lstsq(X, Y)
    residual = Y - np.einsum("bij,pbj->pbi", fitted.A, X) - fitted.c
    total = ((Y - Y.mean(axis=0)) ** 2).sum(axis=(0, 2))
    squared = (residual**2).sum(axis=(0, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1 - squared / total, np.where(squared > 0, 0.0, 1.0))
    noise = None
    if samples > 1:
        noise = np.einsum("pbi,pbj->bij", residual, residual) / max(1, len(Y) - d - 1)
    return Fit(fitted, r2, np.sqrt(squared / (len(Y) * d)), len(Y), noise)


def fit_game(game, predict) -> Fits:
    """Fit every language-model agent of a game, globally then locally.

    Args:
        game: the game (``misalign.experiment.Game``).
        predict: ``predict(game) -> Prediction`` with the agents' current maps.

    Returns:
        The fits; each agent is left holding its local fit (its global one where no local
        fit could be made).
    """
    agents = llm_agents(game)
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
    confirmed = {name: np.zeros(batch, bool) for name in agents}
    prediction, iterations = global_prediction, 0
    refits = max((agent.config.refits for agent in agents.values()), default=0)
    for k in range(1, refits + 1):
        at = {name: prediction.fixed_point[reads[name]] for name in agents}
        # refit the plays with an equilibrium to probe around that is not confirmed yet
        live = np.logical_and.reduce([np.isfinite(x).all(axis=-1) for x in at.values()])
        live &= ~np.logical_and.reduce(list(confirmed.values()))
        if not live.any():
            break
        iterations = k
        for name, agent in agents.items():
            W, F = (x.copy() for x in asked[name])
            local = at[name] + LOCAL * radius[:, None] * _directions(game, name, k, len(W))
            local[0] = at[name]  # the first probe is the predicted input itself
            W[:, live] = local[:, live]
            F[:, :, live] = _answers(agent, W, k, live)[:, :, live]
            asked[name] = W, F
            locals_[name] = _fit(agent, W, F)
            used[name] += int(live.sum()) * F.shape[0] * F.shape[1]
        prediction = predict(game)
        for name in agents:
            out = prediction.fixed_point[name]
            tol = np.maximum(
                CONFIRM * locals_[name].rms * np.sqrt(out.shape[-1]),
                1e-6 * (1 + np.linalg.norm(out, axis=-1)),
            )
            answer = asked[name][1][:, 0].mean(axis=0)  # the model's answer at the first probe
            near = np.linalg.norm(answer - out, axis=-1) <= tol
            confirmed[name] = np.where(live, near, confirmed[name])
    return Fits(
        {
            name: AgentFit(fits[name], locals_[name], iterations, used[name], confirmed[name])
            for name in agents
        },
        global_prediction,
    )


def llm_agents(game) -> dict[str, LLMAgent]:
    """The game's language-model agents, beneath any wrapper."""
    found = {}
    for name, agent in game.agents.items():
        while isinstance(agent, Wrapper):
            agent = agent.inner
        if isinstance(agent, LLMAgent):
            found[name] = agent
    return found


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
